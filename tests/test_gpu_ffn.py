"""wgpu FFN backend: forward and backward with LoRA (and dropout) against the float64 reference
of tests/test_ffn_cpu.py; streaming vs resident weights; row chunking; device selection."""
from __future__ import annotations

import numpy as np
import pytest

from test_ffn_cpu import check_backend, fake_state, make_lora

pytestmark = pytest.mark.gpu


H, I = 40, 72


@pytest.mark.parametrize("nf4", [True, False])
@pytest.mark.parametrize("resident", [False, True])
@pytest.mark.parametrize("max_rows", [None, 5])
def test_gpu_ffn_matches_float64(gpu_ctx, nf4, resident, max_rows):
    from qlora_ext.gpu.ffn import WgpuFfnBackend

    state = fake_state(H, I, n_layers=3, nf4=nf4)
    be = WgpuFfnBackend(gpu_ctx, resident=resident, max_rows=max_rows)
    be.prepare(state)
    loras = [make_lora(H, I, 4), None, make_lora(H, I, 3, targets=("up_proj", "down_proj"))]
    # the streaming slots and staging buffers must follow the layer order forward and back
    for layer, lora in zip((0, 1, 2, 2, 1, 0), loras + loras[::-1]):
        check_backend(be, state, layer, 13, lora, tol=1e-5)


@pytest.mark.parametrize("max_rows", [None, 4])
def test_gpu_ffn_dropout_same_masks_as_cpu(gpu_ctx, max_rows):
    from qlora_ext.cpu.ffn import CpuFfnBackend
    from qlora_ext.gpu.ffn import WgpuFfnBackend

    state = fake_state(H, I, n_layers=2)
    lora = make_lora(H, I, 4, dropout=0.25, seed=2**40 + 3)
    be = WgpuFfnBackend(gpu_ctx, max_rows=max_rows)
    be.prepare(state)
    y, g = check_backend(be, state, 1, 11, lora, tol=1e-5)
    cpu = CpuFfnBackend()
    cpu.prepare(state)
    y_cpu, g_cpu = check_backend(cpu, state, 1, 11, lora, tol=1e-5)
    np.testing.assert_allclose(y, y_cpu, rtol=0, atol=1e-5 * np.abs(y_cpu).max())


def test_gpu_ffn_interleaved_layers_and_forward_only(gpu_ctx):
    """Several forwards before their backwards (a real step), and forward without backward."""
    from qlora_ext.gpu.ffn import WgpuFfnBackend
    from test_ffn_cpu import ref_ffn, rel_err

    state = fake_state(H, I, n_layers=4)
    be = WgpuFfnBackend(gpu_ctx)
    be.prepare(state)
    lora = make_lora(H, I, 2)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((6, H)).astype(np.float32) for _ in range(4)]
    ctxs = [be.ffn_forward(l, xs[l], lora)[1] for l in range(4)]
    y_only, none_ctx = be.ffn_forward(2, xs[2], lora, need_backward=False)
    assert none_ctx is None
    for l in reversed(range(4)):
        dy = rng.standard_normal((6, H)).astype(np.float32)
        g = be.ffn_backward(l, ctxs[l], dy)
        y_ref, dx_ref, _ = ref_ffn(state, l, xs[l], dy, lora)
        assert rel_err(g.dx, dx_ref) <= 1e-5
    assert rel_err(y_only, ref_ffn(state, 2, xs[2], np.zeros((6, H), np.float32), lora)[0]) <= 1e-5
    with pytest.raises(ValueError, match="already used"):
        be.ffn_backward(0, ctxs[0], np.zeros((6, H), np.float32))


def test_gpu_ffn_bad_input(gpu_ctx):
    from qlora_ext.gpu.ffn import WgpuFfnBackend

    be = WgpuFfnBackend(gpu_ctx)
    with pytest.raises(ValueError, match="prepare"):
        be.ffn_forward(0, np.zeros((2, H), np.float32), None)
    be.prepare(fake_state(H, I, n_layers=1))
    with pytest.raises(ValueError, match=r"expected \[N, 40\]"):
        be.ffn_forward(0, np.zeros((2, 41), np.float32), None)
    with pytest.raises(ValueError, match="out of range"):
        be.ffn_forward(3, np.zeros((2, H), np.float32), None)


def test_select_backend_and_adapter_info(gpu_ctx):
    from qlora_ext.cpu.ffn import CpuFfnBackend
    from qlora_ext.device import adapter_info, select_backend
    from qlora_ext.gpu.ffn import WgpuFfnBackend

    info = adapter_info()
    assert info is not None and {"name", "backend", "type"} <= set(info)
    assert isinstance(select_backend("cpu"), CpuFfnBackend)
    assert isinstance(select_backend("gpu"), WgpuFfnBackend)
    auto = select_backend("auto")
    # auto takes wgpu only on a real GPU, never on a CPU rasterizer such as lavapipe
    assert isinstance(auto, CpuFfnBackend if info["software"] else WgpuFfnBackend)
    with pytest.raises(ValueError, match="device must be"):
        select_backend("tpu")


def test_gpu_ffn_per_shape_tiles(gpu_ctx):
    """Different tiles for different GEMMs of one layer (the TileChooser on a real GPU)."""
    from qlora_ext.gpu.ffn import WgpuFfnBackend
    from qlora_ext.gpu.kernels import GemmTiles, TileChooser

    state = fake_state(H, I, n_layers=1)
    chooser = TileChooser(gpu_ctx, big=GemmTiles(8, 8, 8, 8, 8), small=GemmTiles(4, 8, 4, 4, 8), min_groups=2)
    assert chooser(13, 144) is chooser.big and chooser(13, 4) is chooser.small
    be = WgpuFfnBackend(gpu_ctx, tiles=chooser)
    be.prepare(state)
    check_backend(be, state, 0, 13, make_lora(H, I, 4), tol=1e-5)
