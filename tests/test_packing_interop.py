"""Packed rows against outside references: transformers' own packed path (position_ids that
restart at 0, DataCollatorWithFlattening's labels) gives the loss and LoRA grads of our
segment_ids; the numpy fallback's segments (what runs without the C build) match the C kernel."""
import numpy as np
import pytest

from gpu_support import rel_err
from hf_reference import hf_from_checkpoint, peft_twin, randomize_lora
from model_factory import make_tiny_checkpoint

from qlora_ext.api import load_model
from qlora_ext.model.lora import LoraConfig

V = 97


def test_hf_packed_path_matches(tmp_path):
    """transformers builds a block-diagonal causal mask from position_ids that restart at 0 (no
    attention_mask, no cache, on the CPU) and DataCollatorWithFlattening's labels put
    -100 on each document's first token: the same loss and LoRA grads as segment_ids here."""
    torch = pytest.importorskip("torch")
    path = make_tiny_checkpoint(tmp_path / "ckpt", model_type="qwen3", seed=3, vocab_size=V)
    model = load_model(path, lora=LoraConfig(r=4, alpha=8), quantize="nf4", device="cpu")
    randomize_lora(model, seed=1)
    pm = peft_twin(hf_from_checkpoint(path, model.state), model)
    lengths = (1, 7, 15)        # 1, a prime, the rest: one row without padding, as the collator makes
    ids = np.random.default_rng(2).integers(0, V, (1, sum(lengths)))
    segs = np.repeat(np.arange(len(lengths)), lengths)[None]
    pos = np.concatenate([np.arange(n) for n in lengths])[None]
    hf_labels = np.where(pos == 0, -100, ids)
    pm.zero_grad()
    # use_cache=False: transformers looks for packed position_ids only without a cache
    out = pm(input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(pos), labels=torch.from_numpy(hf_labels),
             use_cache=False)
    out.loss.backward()
    ref = {n.replace(".default", ""): p.grad.numpy() for n, p in pm.named_parameters() if p.grad is not None}
    loss, grads = model.loss_and_grads(ids, ids, segment_ids=segs)
    ref_loss = float(out.loss.detach())
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for name, g in grads.items():
        assert rel_err(g, ref[name]) <= 1e-3, name


@pytest.mark.parametrize("B,T,Hq,Hkv,D,cuts", [(1, 1, 1, 1, 2, ()), (2, 67, 4, 2, 6, (1, 8, 30)), (1, 131, 2, 1, 8, (64, 67))])
def test_reference_attention_segments_match_the_kernel(B, T, Hq, Hkv, D, cuts):
    """The numpy fallback's segments (what a build without the C kernels runs) against the C
    kernel, forward and backward, on awkward sizes and runs."""
    from qlora_ext.cpu import kernels
    from qlora_ext.model import reference_kernels as ref

    rng = np.random.default_rng(T)
    q, dout = (rng.standard_normal((B, T, Hq, D)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((B, T, Hkv, D)).astype(np.float32) for _ in range(2))
    segs = np.zeros((B, T), np.int32)
    for c in cuts:
        segs[:, c:] += 1
    segs[-1] = segs[-1][::-1].copy()        # ids need not increase
    o, lse = kernels.attention_forward(q, k, v, segments=segs)
    ro, rlse = ref.attention_forward(q, k, v, segments=segs)
    assert rel_err(o, ro) <= 1e-5 and rel_err(lse, rlse) <= 1e-5
    got = kernels.attention_backward(q, k, v, o, lse, dout, segments=segs)
    want = ref.attention_backward(q, k, v, ro, rlse, dout, segments=segs)
    for g, w in zip(got, want):
        # scale at least 1: with one key per query, dq is 0 up to rounding
        assert rel_err(g, w, scale=max(np.abs(w).max(), 1.0)) <= 1e-4
