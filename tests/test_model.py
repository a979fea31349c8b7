"""Model internals without torch: chunked cross-entropy against a float64 reference, sum vs
mean, gradient checkpointing, LoRA dropout (finite differences), the compiled kernels
against the numpy reference kernels, bad input."""
import numpy as np
import pytest
from model_factory import make_tiny_checkpoint

from qlora_ext.cpu.base_matmul import fused_nf4_available
from qlora_ext.model import loss as loss_mod
from qlora_ext.model import reference_kernels
from qlora_ext.api import load_model
from qlora_ext.model.lora import LoraConfig
from qlora_ext.engine.model import Model

V = 101


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("m") / "qwen3", model_type="qwen3", seed=2)


def _model(ckpt, **kw):
    lora = kw.pop("lora", LoraConfig(r=4, alpha=8))
    m = load_model(ckpt, lora=lora, device="cpu", **kw)
    rng = np.random.default_rng(9)
    m.set_parameters({k: (0.2 * rng.standard_normal(v.shape)).astype(np.float32)
                      for k, v in m.parameters().items()})
    return m


def _batch(seed=0, B=2, T=13):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T))
    labels = ids.copy()
    labels[:, :2] = -100
    mask = np.ones_like(ids)
    mask[-1, -4:] = 0
    labels[-1, -4:] = -100
    return ids, labels, mask


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("M,H,Vs,budget", [(1, 8, 5, 1 << 20), (37, 16, 53, 4 * 53 * 16), (64, 7, 300, 4 * 300 * 16),
                                           (101, 9, 31, 4 * 31 * 16)])
def test_chunked_cross_entropy(monkeypatch, M, H, Vs, budget, threads):
    """Chunked and, with threads, cut into row parts computed at once (the shared dW under a
    lock): the same sums and gradients as a float64 reference."""
    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", budget)          # force several chunks
    rng = np.random.default_rng(M)
    h = rng.standard_normal((M, H)).astype(np.float32)
    W = rng.standard_normal((Vs, H)).astype(np.float32)
    t = rng.integers(0, Vs, M)
    dW = np.zeros_like(W)
    total, dh = loss_mod.cross_entropy(h, W, t, 0.5, dW=dW, threads=threads)
    z = h.astype(np.float64) @ W.T.astype(np.float64)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    ref = float(np.sum(lse - z[np.arange(M), t]))
    p = np.exp(z - lse[:, None])
    p[np.arange(M), t] -= 1
    assert abs(total - ref) <= 1e-5 * abs(ref)
    np.testing.assert_allclose(dh, 0.5 * p @ W, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dW, 0.5 * p.T @ h, rtol=1e-4, atol=1e-5)
    total2, none = loss_mod.cross_entropy(h, W, t, None, threads=threads)
    assert none is None and total2 == pytest.approx(total, rel=1e-6)


def test_sum_mean_and_count(ckpt):
    m = _model(ckpt)
    ids, labels, mask = _batch()
    n = m.count_tokens(labels)
    assert n == int(((labels[:, 1:]) != -100).sum())
    lm, gm = m.loss_and_grads(ids, labels, mask)
    ls, gs = m.loss_and_grads(ids, labels, mask, reduction="sum")
    assert ls == pytest.approx(lm * n, rel=1e-6)
    for k in gm:
        np.testing.assert_allclose(gs[k], gm[k] * n, rtol=1e-4, atol=1e-6 * np.abs(gs[k]).max())
    assert m.loss(ids, labels, mask, reduction="sum") == pytest.approx(ls, rel=1e-6)
    # nothing to count: no mean (nan, as transformers), zero sum, zero grads
    none = np.full_like(labels, -100)
    assert np.isnan(m.loss_and_grads(ids, none, mask)[0])
    s, g = m.loss_and_grads(ids, none, mask, reduction="sum")
    assert s == 0.0 and all(not v.any() for v in g.values())


def test_one_dimensional_input_is_batch_of_one(ckpt):
    m = _model(ckpt)
    ids = np.arange(9) % V
    a = m.forward(ids)
    b = m.forward(ids[None])
    assert a.shape == (1, 9, V) and np.array_equal(a, b)


@pytest.mark.parametrize("recompute", [True, 1, 2])
def test_gradient_checkpointing_is_exact(ckpt, recompute):
    """Every layer, or only the first of the two, recomputing its activations: the same
    loss and gradients bit for bit."""
    ids, labels, mask = _batch(1)
    la, ga = _model(ckpt, quantize="nf4").loss_and_grads(ids, labels, mask)
    m = _model(ckpt, quantize="nf4", gradient_checkpointing=recompute)
    assert m.recompute_layers == (2 if recompute is True else recompute)
    lb, gb = m.loss_and_grads(ids, labels, mask)
    assert la == lb
    for k in ga:
        assert np.array_equal(ga[k], gb[k]), k


@pytest.mark.parametrize("bad", [3, -1, 1.5, "all"])
def test_gradient_checkpointing_count_is_checked(ckpt, bad):
    with pytest.raises(ValueError, match="gradient_checkpointing must be"):
        _model(ckpt, gradient_checkpointing=bad)


def test_compiled_kernels_match_reference_kernels(ckpt):
    ids, labels, mask = _batch(2)
    fast = _model(ckpt)
    slow = Model(fast.state, fast.lora_config, kernels=reference_kernels)
    slow.set_parameters(fast.parameters())
    np.testing.assert_allclose(fast.forward(ids, mask), slow.forward(ids, mask), rtol=1e-4, atol=1e-4)
    la, ga = fast.loss_and_grads(ids, labels, mask)
    lb, gb = slow.loss_and_grads(ids, labels, mask)
    assert la == pytest.approx(lb, rel=1e-5)
    for k in ga:
        assert np.abs(ga[k] - gb[k]).max() <= 1e-3 * np.abs(gb[k]).max(), k


def test_lora_dropout_gradients_by_finite_differences(ckpt):
    """With dropout the masks derive from (seed, step): rewinding `step` replays them, so a
    central difference of the training loss checks the analytic grads through the masks."""
    m = _model(ckpt, lora=LoraConfig(r=3, alpha=6, dropout=0.3), gradient_checkpointing=True)
    ids, labels, mask = _batch(3, B=1, T=10)
    ids, labels, mask = ids[:1], labels[:1], mask[:1]
    m.step = 5
    loss0, g = m.loss_and_grads(ids, labels, mask)
    rng = np.random.default_rng(0)
    params = {k: v.copy() for k, v in m.parameters().items()}
    direction = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}

    def at(h):
        m.set_parameters({k: params[k] + h * direction[k] for k in params})
        m.step = 5
        return m.loss_and_grads(ids, labels, mask, reduction="mean")[0]

    def central(eps):
        return (at(eps) - at(-eps)) / (2 * eps)

    # The loss is curved enough at these weights that a central difference at 1e-3 has a ~3%
    # truncation error, and a step small enough to hide it drowns in the float32 rounding of
    # the loss (GEMMs that sum in another order move it by ~0.5%): Richardson's combination
    # of two steps cancels the eps² term instead.
    eps = 1e-3
    fd = (4 * central(eps / 2) - central(eps)) / 3
    an = sum(float((g[k].astype(np.float64) * direction[k]).sum()) for k in g)
    assert fd == pytest.approx(an, rel=5e-3)
    m.set_parameters(params)
    m.step = 5
    # a different step draws different masks
    assert m.loss_and_grads(ids, labels, mask)[0] == loss0
    assert m.loss_and_grads(ids, labels, mask)[0] != loss0


def test_parameters_memory_and_phases(ckpt):
    m = _model(ckpt, train_lm_head=True)
    p = m.parameters()
    assert list(p)[-1] == "base_model.model.lm_head.weight"
    assert list(p)[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    rep = m.memory_report()
    assert rep["lora_bytes"] == sum(v.nbytes for k, v in p.items() if "lora_" in k)
    assert rep["nf4_codes"] > 0
    m.timer.reset()
    m.loss_and_grads(*_batch()[:2])
    times = m.timer.reset()
    # NF4 is decoded inside the GEMM where the fused kernel runs (AVX-512): no dequant phase
    dequant = () if fused_nf4_available() else ("dequant",)
    for phase in ("embed", "norms", "projections", "attention", "rope", "ffn", "loss", "lm_head", *dequant):
        assert times.get(phase, 0) > 0, phase


def test_bad_input(ckpt):
    m = _model(ckpt)
    ids, labels, mask = _batch()
    with pytest.raises(ValueError, match="input_ids must be in"):
        m.forward(ids + V)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        m.forward(ids, mask[:, 1:])
    with pytest.raises(ValueError, match="labels has shape"):
        m.loss_and_grads(ids, labels[:1])
    with pytest.raises(ValueError, match="labels must be -100 or in"):
        m.loss_and_grads(ids, labels - 200)
    with pytest.raises(ValueError, match="reduction"):
        m.loss_and_grads(ids, labels, reduction="avg")
    with pytest.raises(ValueError, match="input_ids must be integers"):
        m.forward(ids.astype(np.float32))
    with pytest.raises(ValueError, match="unknown parameter"):
        m.set_parameters({"nope": np.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        m.set_parameters({next(iter(m.parameters())): np.zeros(1)})
    with pytest.raises(ValueError, match="device"):
        load_model(ckpt, device="tpu")


def test_phases_reach_the_profiler_without_overlap(ckpt):
    from qlora_ext.profile import PROFILER

    m = _model(ckpt, quantize="nf4")
    ids, labels, mask = _batch()
    PROFILER.start()
    try:
        with PROFILER.step():
            m.loss_and_grads(ids, labels, mask)
    finally:
        PROFILER.stop()
    spans = sorted(PROFILER.spans, key=lambda s: s.start)
    names = {s.name for s in spans}
    dequant = set() if fused_nf4_available() else {"dequant"}
    assert {"projections", "attention", "ffn", "lm_head", "loss"} | dequant <= names
    for a, b in zip(spans, spans[1:]):
        assert a.end <= b.start + 1e-9            # exclusive segments: shares add up
    busy = sum(s.end - s.start for s in spans)
    step = PROFILER.steps[0][1] - PROFILER.steps[0][0]
    assert 0.5 * step < busy <= step
