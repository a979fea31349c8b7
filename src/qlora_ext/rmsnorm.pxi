# rmsnorm kernels: see csrc/rmsnorm.c (filled in by the CPU kernels work)
