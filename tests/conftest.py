"""Shared fixtures: SIMD-path parametrisation so every kernel test runs on each path the CPU has."""
import os

import pytest

import qlora_ext


def _available_levels():
    best = qlora_ext.cpu_features()["best"]
    order = {"scalar": ["scalar"], "avx2": ["scalar", "avx2"], "avx512": ["scalar", "avx2", "avx512"],
             "avx512_bf16": ["scalar", "avx2", "avx512", "avx512_bf16"], "neon": ["scalar", "neon"]}
    return order[best]


@pytest.fixture(params=_available_levels())
def simd_level(request, monkeypatch):
    """Runs the test once per SIMD path (QLORA_EXT_CPU caps the dispatch)."""
    monkeypatch.setenv("QLORA_EXT_CPU", request.param)
    feats = qlora_ext.refresh_cpu_features()
    assert feats["active"] == request.param
    yield request.param
    monkeypatch.delenv("QLORA_EXT_CPU", raising=False)
    qlora_ext.refresh_cpu_features()


@pytest.fixture(autouse=True)
def _restore_cpu_level():
    yield
    if "QLORA_EXT_CPU" not in os.environ:
        qlora_ext.refresh_cpu_features()


@pytest.fixture(scope="module")
def gpu_ctx():
    """A wgpu context on the best adapter (lavapipe where there is no GPU); skips the module's
    GPU tests, with the reason, where wgpu has no usable adapter."""
    from qlora_ext.gpu.runtime import GpuContext, GpuError, pick_adapter

    if pick_adapter(allow_software=True) is None:
        pytest.skip("no wgpu adapter (install a Vulkan driver such as Mesa lavapipe)")
    try:
        return GpuContext()
    except GpuError as e:
        pytest.skip(f"wgpu adapter unusable: {e}")


@pytest.fixture(scope="module")
def ctx():
    """The GPU tests' shared GpuContext (gpu_support.gpu_context: skips, with the reason, where
    wgpu has no adapter); a module may define its own."""
    from gpu_support import gpu_context

    return gpu_context()
