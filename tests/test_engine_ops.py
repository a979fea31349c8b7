"""The layer program's ops on each device against float64 numpy references: the LoRA linear
(NF4 base, bias, LoRA with its scale; forward, input gradient, dA, dB) and SwiGLU, at row
counts 1, 7 and 37 and widths that are no multiple of a tile (hidden 40, FFN 72)."""
import numpy as np
import pytest
from model_factory import make_tiny_checkpoint

from qlora_ext.api import load_model
from qlora_ext.model.lora import LoraConfig, peft_name
from qlora_ext.nf4 import NF4Tensor, dequantize_nf4


@pytest.fixture(scope="module")
def cpu_model(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("ops") / "qwen2", model_type="qwen2", seed=8,
                                hidden_size=40, intermediate_size=72)
    m = load_model(path, lora=LoraConfig(r=3, alpha=5), device="cpu")
    g = np.random.default_rng(4)
    m.set_parameters({n: (0.3 * g.standard_normal(a.shape)).astype(np.float32) for n, a in m.parameters().items()})
    return m


class _Cpu:
    def __init__(self, model):
        self.model, self.dev = model, model.device

    def up(self, a):
        return np.ascontiguousarray(a, np.float32)

    def empty(self, shape):
        return np.zeros(shape, np.float32)

    def down(self, t):
        return np.asarray(t)

    def grads(self):
        return self.model.params.named(self.model.params.grads)


class _Gpu:
    def __init__(self, model, ctx):
        from gpu_support import gpu_twin

        self.model = gpu_twin(model, ctx)
        self.dev, self.ctx = self.model.device, ctx

    def up(self, a):
        return self.ctx.upload(np.ascontiguousarray(a, np.float32))

    def empty(self, shape):
        return self.ctx.zeros(shape)

    def down(self, t):
        return self.ctx.to_numpy(t)

    def grads(self):
        return self.model._grads()


def _side(request, cpu_model):
    if request.param == "cpu":
        return _Cpu(cpu_model)
    from gpu_support import gpu_context

    return _Gpu(cpu_model, gpu_context())


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def side(request, cpu_model):
    return _side(request, cpu_model)


def _rel(got, ref):
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


def _begin(side, N):
    d = side.model.dims(1, N)
    side.dev.prepare(d, np.arange(N), None, np.zeros((1, N), np.int64))
    side.dev.clear_grads()


@pytest.mark.parametrize("N", [1, 7, 37])
@pytest.mark.parametrize("proj", ["q_proj", "down_proj"])
def test_linear_forward_backward_float64(side, cpu_model, N, proj):
    l = 1
    st = cpu_model.state.layers[l]
    w = st.proj[proj]
    W = (dequantize_nf4(w) if isinstance(w, NF4Tensor) else w).astype(np.float64)
    out, inn = W.shape
    bias = st.bias.get(proj) if st.bias else None
    p = cpu_model.parameters()
    A = p[peft_name(l, proj, "A")].astype(np.float64)
    B = p[peft_name(l, proj, "B")].astype(np.float64)
    s = cpu_model.lora.get(l, proj).scale
    g = np.random.default_rng(N)
    x = g.standard_normal((N, inn)).astype(np.float32)
    dy = g.standard_normal((N, out)).astype(np.float32)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    u_ref = s * x64 @ A.T
    y_ref = x64 @ W.T + u_ref @ B.T + (0 if bias is None else bias.astype(np.float64))
    _begin(side, N)
    xs, ys, us = side.up(x), side.empty((N, out)), side.empty((N, 3))
    side.dev.linear_forward(l, proj, xs, ys, us)
    assert _rel(side.down(ys), y_ref) <= 2e-6 and _rel(side.down(us), u_ref) <= 2e-6
    dxs = side.empty((N, inn))
    side.dev.linear_backward(l, proj, side.up(dy), xs, us, dxs, False)
    du = s * dy64 @ B
    assert _rel(side.down(dxs), dy64 @ W + du @ A) <= 2e-6
    gr = side.grads()
    assert _rel(gr[peft_name(l, proj, "A")], du.T @ x64) <= 2e-6
    assert _rel(gr[peft_name(l, proj, "B")], dy64.T @ u_ref) <= 2e-6
    # accumulate adds the input gradient to what dx holds
    side.dev.linear_backward(l, proj, side.up(dy), xs, us, dxs, True)
    assert _rel(side.down(dxs), 2 * (dy64 @ W + du @ A)) <= 2e-6


@pytest.mark.parametrize("N", [1, 37])
def test_swiglu_forward_backward_float64(side, N):
    F = 72
    g = np.random.default_rng(N + 1)
    gate, up, dm = (3 * g.standard_normal((N, F))).astype(np.float32), g.standard_normal((N, F)).astype(np.float32), \
        g.standard_normal((N, F)).astype(np.float32)
    g64, u64, dm64 = gate.astype(np.float64), up.astype(np.float64), dm.astype(np.float64)
    sig = 1 / (1 + np.exp(-g64))
    _begin(side, N)
    gs, us, ms = side.up(gate), side.up(up), side.empty((N, F))
    side.dev.swiglu_forward(gs, us, ms)
    assert _rel(side.down(ms), g64 * sig * u64) <= 2e-6
    dgs, dus = side.empty((N, F)), side.empty((N, F))
    side.dev.swiglu_backward(gs, us, side.up(dm), dgs, dus)
    assert _rel(side.down(dus), dm64 * g64 * sig) <= 2e-6
    assert _rel(side.down(dgs), dm64 * u64 * sig * (1 + g64 * (1 - sig))) <= 2e-6
