"""CPU work overlapping GPU work in the split placement: while the wgpu backend computes a
layer's FFN, the model dequantizes the attention weights it needs next (the next layer's in
forward, the same layer's in backward); the profiler sees the overlap.  Below AVX-512 only:
there the CPU's NF4 products are dequantize + BLAS (on AVX-512 the fused kernel decodes NF4
inside the GEMM and there is nothing to prefetch), so the tests cap the SIMD level."""
import numpy as np
import pytest

import qlora_ext

from model_factory import make_tiny_checkpoint

from qlora_ext.model.api import load_model
from qlora_ext.model.lora import LoraConfig
from qlora_ext.profile import PROFILER


@pytest.fixture
def dequant_path(monkeypatch):
    monkeypatch.setenv("QLORA_EXT_CPU", "avx2")
    qlora_ext.refresh_cpu_features()


@pytest.mark.gpu
def test_attention_weight_dequant_overlaps_gpu_ffn(tmp_path, gpu_ctx, dequant_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", model_type="llama", seed=2, num_hidden_layers=3)
    cpu = load_model(ckpt, lora=LoraConfig(r=2, alpha=4), quantize="nf4", device="cpu")
    gpu = load_model(ckpt, lora=LoraConfig(r=2, alpha=4), quantize="nf4", device="gpu")
    ids = np.random.default_rng(0).integers(0, cpu.config.vocab_size, (2, 9))
    PROFILER.start()
    try:
        with PROFILER.step():
            loss, grads = gpu.loss_and_grads(ids, ids)
    finally:
        PROFILER.stop()
    ref_loss, ref_grads = cpu.loss_and_grads(ids, ids)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for name, g in ref_grads.items():
        assert np.abs(grads[name] - g).max() <= 1e-3 * max(np.abs(g).max(), 1e-12), name
    spans = PROFILER.spans
    gpu_spans = [(s.start, s.end) for s in spans if s.device == "gpu"]
    dequant = [(s.start, s.end) for s in spans if s.name == "dequant"]
    inside = [d for d in dequant if any(a <= d[0] and d[1] <= b for a, b in gpu_spans)]
    # forward: layers 1 and 2 prefetched during FFNs 0 and 1 (8); backward: layer 1 during its
    # FFN backward (4), layer 0 only o_proj (1); layer 2's weights are still held
    assert len(inside) >= 13
    assert PROFILER.summary()["totals"]["overlap_ms"] > 0


def test_cpu_backend_runs_the_prefetch_after_its_ffn(tmp_path, dequant_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", model_type="qwen3", seed=3, num_hidden_layers=2)
    model = load_model(ckpt, lora=LoraConfig(r=2, alpha=4), quantize="nf4", device="cpu")
    calls = []
    forward = model.backend.ffn_forward

    def spy(layer, x, lora, need_backward=True, while_waiting=None):
        calls.append((layer, while_waiting is not None))
        return forward(layer, x, lora, need_backward=need_backward, while_waiting=while_waiting)

    model.backend.ffn_forward = spy
    model.forward(np.arange(6).reshape(1, 6) % model.config.vocab_size)
    assert calls == [(0, True), (1, True)]
    assert model._layers._buffers["q_proj"][0] == 1  # the last layer's (there is no layer 2)
