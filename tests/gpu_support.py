"""Shared pieces of the GPU placement tests: the wgpu context (skip with a reason when no adapter
exists), the attention tests' random inputs and the error measure used against float64
references."""
import numpy as np
import pytest


def gpu_context():
    """A GpuContext on the first adapter (lavapipe in CI), or skip with the reason."""
    from qlora_ext.gpu.runtime import shared_context, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    return shared_context()


def attention_inputs(seed, B, T, Hq, Hkv, D):
    """Seeded float32 q [B, T, Hq, D], k, v [B, T, Hkv, D] and an output gradient do."""
    g = np.random.default_rng(seed)
    q = g.standard_normal((B, T, Hq, D)).astype(np.float32)
    k = g.standard_normal((B, T, Hkv, D)).astype(np.float32)
    v = g.standard_normal((B, T, Hkv, D)).astype(np.float32)
    do = g.standard_normal((B, T, Hq, D)).astype(np.float32)
    return q, k, v, do


def rel_err(got, ref, scale=None) -> float:
    """max |got - ref| / max |ref|: the error relative to the output's scale (elementwise
    relative error is meaningless where a value crosses zero).  `scale` replaces max |ref|
    where the result is a small difference of larger terms (then the terms set the scale)."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if ref.size == 0:
        return 0.0
    if scale is None:
        scale = float(np.abs(ref).max())
    scale = max(float(scale), 1e-30)
    return float(np.abs(got - ref).max()) / scale


def gpu_twin(model, ctx, **kw):
    """A GpuModel on the CPU `model`'s base and LoRA config, holding its current weights and
    step (kw: gradient_checkpointing, weights, gemm)."""
    from qlora_ext.engine.gpu_model import GpuModel

    gpu = GpuModel(model.state, model.lora_config, ctx=ctx, train_lm_head=model.train_lm_head, seed=model.seed,
                   **kw)
    gpu.set_parameters(model.parameters())
    gpu.step = model.step
    return gpu


def gpu_train_step(update, ids, labels) -> float:
    """Forward, backward and AdamW of the mean loss without clipping, through the Trainer's
    GpuAdamW `update`; returns the mean loss."""
    loss_sum = update.accumulate(ids, labels, None, first=True)
    n = update.model.count_tokens(labels)
    update.scaled_norm(1.0 / n)
    update.step(update.optimizer.lr, None)
    return loss_sum / n


def poison_scratch(ctx, n: int) -> None:
    """Fill the context's scratch (at least n floats) with NaN: kernels that keep partials there
    must not read what they did not write."""
    t = ctx.scratch(n)
    ctx.write(t, np.full(t.size, np.nan, np.float32))


@pytest.fixture(params=[True, False], ids=["stored-dS", "recomputed-P"])
def attention_ds_mode(request, monkeypatch):
    """Both attention backward forms: dq from the dS that dk/dv stored, and dq recomputing P
    (tuning.attn_stored_ds on the shared context)."""
    import dataclasses

    ctx = gpu_context()
    monkeypatch.setattr(ctx, "tuning", dataclasses.replace(ctx.tuning, attn_stored_ds=request.param))
    return request.param
