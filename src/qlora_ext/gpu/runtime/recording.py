"""Recording one dispatch into a compute pass: set the pipeline, bind group 0, dispatch.

A training step records thousands of small dispatches, and wgpu-py's wrappers put each native
call behind an error-capturing proxy (and allocate a dynamic-offset array for every bind
group).  Compute-pass commands are only validated when the pass ends (wgpu-core records them
and checks the pass at wgpuComputePassEncoderEnd, which keeps going through wgpu-py and raises
there), so the three calls go straight to wgpu-native where the installed wgpu exposes it.
These are wgpu-py internals (as shaders.py's trusted modules): where a later wgpu moves them,
the public methods are used (slower, the same commands)."""
from __future__ import annotations


def _native():
    try:
        from wgpu.backends.wgpu_native import _api  # noqa: PLC0415
        lib, null = _api.lib, _api.ffi.NULL
        set_pipeline = lib.wgpuComputePassEncoderSetPipeline
        set_group = lib.wgpuComputePassEncoderSetBindGroup
        dispatch = lib.wgpuComputePassEncoderDispatchWorkgroups
    except (ImportError, AttributeError):
        return None

    def record(cpass, pipeline, group, gx: int, gy: int, gz: int) -> None:
        p = cpass._internal
        set_pipeline(p, pipeline._internal)
        set_group(p, 0, group._internal, 0, null)
        dispatch(p, gx, gy, gz)

    return record


def _public(cpass, pipeline, group, gx: int, gy: int, gz: int) -> None:
    cpass.set_pipeline(pipeline)
    cpass.set_bind_group(0, group)
    cpass.dispatch_workgroups(gx, gy, gz)


def dispatch_recorder(native: bool = True):
    """record(pass, pipeline, bind group, gx, gy, gz): the native one when available and wanted."""
    return (_native() if native else None) or _public
