"""GPU AdamW on a flat LoRA buffer against a float64 reference of torch.optim.AdamW's update
(and torch itself where installed)."""
import math

import numpy as np
import pytest

from gpu_support import rel_err

pytestmark = pytest.mark.gpu


def _reference(p, grads, lr, betas, eps, wd):
    p = p.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    b1, b2 = betas
    for t, g in enumerate(grads, 1):
        g = g.astype(np.float64)
        p *= 1 - lr * wd
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p -= lr / (1 - b1 ** t) * m / (np.sqrt(v) / math.sqrt(1 - b2 ** t) + eps)
    return p, m, v


@pytest.mark.parametrize("n", [1, 67, 4099])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_matches_reference(ctx, n, wd):
    from gpu_numpy_forms import adamw_steps

    g = np.random.default_rng(n)
    p0 = g.standard_normal(n).astype(np.float32)
    grads = [g.standard_normal(n).astype(np.float32) * 10 ** g.uniform(-3, 1) for _ in range(4)]
    p, m, v = adamw_steps(p0, grads, lr=1e-2, weight_decay=wd, ctx=ctx)
    p_ref, m_ref, v_ref = _reference(p0, grads, 1e-2, (0.9, 0.999), 1e-8, wd)
    # The update is a small change of p: its error is measured against the change itself,
    # plus the float32 rounding of p that each of the 4 steps adds (half an ulp of |p|).
    step_err = np.abs(p - p_ref).max()
    assert step_err <= 1e-5 * np.abs(p_ref - p0).max() + 4 * 2.0 ** -24 * np.abs(p_ref).max()
    assert rel_err(p, p_ref) <= 1e-6
    assert rel_err(m, m_ref) <= 1e-5
    assert rel_err(v, v_ref) <= 1e-5


def test_adamw_matches_torch(ctx):
    torch = pytest.importorskip("torch")
    from gpu_numpy_forms import adamw_steps

    g = np.random.default_rng(1)
    p0 = g.standard_normal(53).astype(np.float32)
    grads = [g.standard_normal(53).astype(np.float32) for _ in range(3)]
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = torch.optim.AdamW([tp], lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    for gr in grads:
        tp.grad = torch.from_numpy(gr)
        opt.step()
    p, m, v = adamw_steps(p0, grads, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, ctx=ctx)
    want = tp.detach().numpy()
    assert np.abs(p - want).max() <= 1e-5 * np.abs(want - p0).max() + 3 * 2.0 ** -23 * np.abs(want).max()
    assert rel_err(m, opt.state[tp]["exp_avg"].numpy()) <= 1e-6


def test_adamw_state_round_trip(ctx):
    """Saving after 2 steps and resuming in a new optimizer equals 4 unbroken steps."""
    from qlora_ext.gpu.bindings.adamw import AdamWGpu

    g = np.random.default_rng(2)
    p0 = g.standard_normal(31).astype(np.float32)
    grads = [g.standard_normal(31).astype(np.float32) for _ in range(4)]
    a = AdamWGpu(ctx, 31, lr=1e-2, weight_decay=0.01)
    pa, gb = ctx.upload(p0), ctx.empty((31,))
    for gr in grads:
        ctx.write(gb, gr)
        a.step(pa, gb)
    b = AdamWGpu(ctx, 31, lr=1e-2, weight_decay=0.01)
    pb = ctx.upload(p0)
    for gr in grads[:2]:
        ctx.write(gb, gr)
        b.step(pb, gb)
    state, p_mid = b.state_dict(), ctx.to_numpy(pb)
    c = AdamWGpu(ctx, 31, lr=1e-2, weight_decay=0.01)
    c.load_state_dict(state)
    pc = ctx.upload(p_mid)
    for gr in grads[2:]:
        ctx.write(gb, gr)
        c.step(pc, gb)
    np.testing.assert_array_equal(ctx.to_numpy(pc), ctx.to_numpy(pa))
    with pytest.raises(ValueError, match="exp_avg"):
        c.load_state_dict({"step": 1, "exp_avg": np.zeros(3), "exp_avg_sq": np.zeros(31)})
    with pytest.raises(ValueError, match="betas"):
        AdamWGpu(ctx, 3, betas=(1.0, 0.9))


@pytest.mark.parametrize("n", [1, 63, 64, 65, 4099, 70001])
def test_sq_norm_matches_float64(ctx, n):
    """The squared norm of (g * scale), n not a multiple of the workgroup or of the
    workgroup count, against float64; the same bits on a second run (fixed order)."""
    from qlora_ext.gpu.bindings.adamw import AdamWGpu

    g = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 3
    opt = AdamWGpu(ctx, n)
    t = ctx.upload(g)
    scale = 1.0 / 7.0
    got = opt.sq_norm(t, scale)
    ref = float(np.sum((g * np.float32(scale)).astype(np.float64) ** 2))
    assert abs(got - ref) <= 1e-6 * ref
    assert opt.sq_norm(t, scale) == got


def test_adamw_grad_scale_and_clip_are_the_cpu_trainers_products(ctx):
    """step(grad_scale=s, clip_coef=c) equals a plain step on (g * f32(s)) * f32(c)."""
    from qlora_ext.gpu.bindings.adamw import AdamWGpu

    rng = np.random.default_rng(3)
    n = 1031
    p0 = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32) * 50
    s, c = np.float32(1 / 37), np.float32(0.3)
    out = []
    for kw, grad in (({"grad_scale": float(s), "clip_coef": float(c)}, g), ({}, (g * s) * c)):
        opt = AdamWGpu(ctx, n, lr=1e-2)
        p = ctx.upload(p0)
        opt.step(p, ctx.upload(grad.astype(np.float32)), **kw)
        out.append(ctx.to_numpy(p))
    np.testing.assert_array_equal(out[0], out[1])
