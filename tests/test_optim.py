import numpy as np
import pytest

from qlora_ext.train.optim import AdamW


def reference_adamw(p, grads, lr, b1, b2, eps, wd):
    """float64 AdamW as written in torch.optim.AdamW's documentation."""
    p = p.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p


@pytest.mark.parametrize("shape", [(1,), (7, 13), (3, 5, 2)])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_matches_float64_reference(shape, wd):
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(shape).astype(np.float32)
    grads = [rng.standard_normal(shape).astype(np.float32) * 10 ** rng.uniform(-3, 1) for _ in range(6)]
    p = p0.copy()
    opt = AdamW({"p": p}, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd)
    for g in grads:
        opt.step({"p": g})
    ref = reference_adamw(p0, [g.astype(np.float64) for g in grads], 1e-2, 0.9, 0.99, 1e-6, wd)
    np.testing.assert_allclose(p, ref, rtol=1e-5, atol=1e-6)
    assert opt.exp_avg["p"].dtype == np.float32 and opt.exp_avg_sq["p"].dtype == np.float32


def test_adamw_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal((11, 3)).astype(np.float32)
    grads = [rng.standard_normal((11, 3)).astype(np.float32) for _ in range(5)]
    p = p0.copy()
    opt = AdamW({"p": p}, lr=3e-3, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.05)
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    topt = torch.optim.AdamW([tp], lr=3e-3, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.05, foreach=False)
    for i, g in enumerate(grads):
        lr = 3e-3 * (i + 1) / 5  # a changing lr, as a schedule gives
        opt.step({"p": g}, lr=lr)
        topt.param_groups[0]["lr"] = lr
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=2e-6, atol=2e-7)


def test_adamw_state_roundtrip_is_bit_exact():
    rng = np.random.default_rng(3)
    shape = (5, 4)
    grads = [rng.standard_normal(shape).astype(np.float32) for _ in range(8)]
    a = rng.standard_normal(shape).astype(np.float32)
    b = a.copy()
    oa = AdamW({"w": a}, lr=1e-2, weight_decay=0.01)
    ob = AdamW({"w": b}, lr=1e-2, weight_decay=0.01)
    for g in grads[:4]:
        oa.step({"w": g})
        ob.step({"w": g})
    state = {k: v.copy() for k, v in ob.state_dict().items()}
    b_saved = b.copy()
    # A fresh optimizer on a fresh array, restored from the state, continues identically.
    c = b_saved.copy()
    oc = AdamW({"w": c}, lr=1e-2, weight_decay=0.01)
    oc.load_state_dict(state)
    for g in grads[4:]:
        oa.step({"w": g})
        oc.step({"w": g})
    assert oc.step_count == 8
    np.testing.assert_array_equal(a, c)


def test_adamw_rejects_bad_input():
    p = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="float32"):
        AdamW({"x": np.zeros(3)})
    with pytest.raises(ValueError, match="betas"):
        AdamW({"p": p}, betas=(1.0, 0.9))
    opt = AdamW({"p": p})
    with pytest.raises(ValueError, match="no gradient for 'p'"):
        opt.step({})
    with pytest.raises(ValueError, match="shape"):
        opt.step({"p": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="lacks 'p.exp_avg'"):
        opt.load_state_dict({"step": np.array(1)})
    with pytest.raises(ValueError, match="unknown parameters"):
        opt.load_state_dict({**opt.state_dict(), "q.exp_avg": np.zeros(1)})
