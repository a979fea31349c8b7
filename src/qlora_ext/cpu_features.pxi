cdef extern from "qx_common.h" nogil:
    int qx_cpu_level()
    int qx_cpu_hw_level()
    void qx_cpu_refresh()
    const char *qx_cpu_level_name(int level)


def cpu_level_name():
    """Name of the SIMD path the kernels take now: 'avx512_bf16', 'avx512', 'avx2', 'neon' or 'scalar'."""
    return qx_cpu_level_name(qx_cpu_level()).decode()


def cpu_hw_level_name():
    """Best SIMD path this CPU and OS support, ignoring QLORA_EXT_CPU."""
    return qx_cpu_level_name(qx_cpu_hw_level()).decode()


def refresh_cpu_features():
    """Re-read QLORA_EXT_CPU (it caps the SIMD path; tests change it between calls)."""
    qx_cpu_refresh()


cdef int _check(int rc, str what) except -1:
    if rc == -2:
        raise ValueError(f"{what}: array sizes do not match")
    if rc == -3:
        raise ValueError(f"{what}: invalid argument")
    if rc != 0:
        raise ValueError(f"{what}: kernel failed with code {rc}")
    return 0


cdef int _check_mem(int rc, str what) except -1:
    """_check, plus the kernels' QX_E_NOMEM (for kernels that allocate work buffers)."""
    if rc == -4:
        raise MemoryError(f"{what}: out of memory for the kernel's work buffers")
    return _check(rc, what)
