"""The acceptance tests of the model: logits, loss and LoRA gradients against HF transformers +
PEFT (torch autograd) on tiny Qwen3 / Qwen2 / Llama models, fp32 and NF4 base, with adapters
on all 7 projections and non-zero B.  Tolerances: logits 1e-4 relative to the largest logit,
loss 1e-5 relative, grads 1e-3 relative to the largest grad of each tensor."""
from functools import partial

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from hf_reference import (batch_with_padding, check_parity as _check, hf_from_checkpoint,  # noqa: E402
                          peft_grads, peft_twin, randomize_lora, rel_to_max as _rel, state_from_hf,
                          tiny_hf_model)
from model_factory import make_tiny_checkpoint  # noqa: E402

from qlora_ext.api import load_model  # noqa: E402

from qlora_ext.model.lora import LoraConfig  # noqa: E402
from qlora_ext.engine.model import Model  # noqa: E402

V = 97
_batch = partial(batch_with_padding, vocab=V)


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("model_type", ["qwen3", "qwen2", "llama"])
def test_parity_logits_loss_grads(tmp_path, model_type, quantize):
    """Through the public path: make_tiny_checkpoint -> load_model -> HF from_pretrained."""
    path = make_tiny_checkpoint(tmp_path / "ckpt", model_type=model_type, seed=3, vocab_size=V)
    model = load_model(path, lora=LoraConfig(r=4, alpha=8), quantize=quantize, device="cpu")
    randomize_lora(model, seed=1)
    hf = hf_from_checkpoint(path, model.state)
    pm = peft_twin(hf, model)
    _check(model, pm, *_batch(0))


def test_parity_random_hf_weights():
    """Larger weights and biases than the checkpoint factory's (HF model as the source)."""
    hf = tiny_hf_model("qwen2", seed=7)
    model = Model(state_from_hf(hf, quantize="nf4"), LoraConfig(r=4, alpha=8))
    randomize_lora(model, seed=1)
    _check(model, peft_twin(hf, model), *_batch(0))


def test_parity_left_padding_and_double_quant():
    hf = tiny_hf_model("qwen3", seed=4)
    state = state_from_hf(hf, quantize="nf4", double_quant=True)
    model = Model(state, LoraConfig(r=3, alpha=5, use_rslora=True))
    randomize_lora(model, seed=2)
    _check(model, peft_twin(hf, model), *_batch(1, pad_right=False))


def test_parity_subset_targets_gradient_checkpointing_lm_head():
    hf = tiny_hf_model("llama", seed=5, tie=True)     # the trained head unties from the embedding
    state = state_from_hf(hf)
    model = Model(state, LoraConfig(r=2, alpha=4, target_modules=("q", "v", "down")),
                  gradient_checkpointing=True, train_lm_head=True)
    randomize_lora(model, seed=3, scale=0.05)
    pm = peft_twin(hf, model)
    ids, labels, mask = _batch(2)
    loss_ref, g_ref, _ = peft_grads(pm, ids, labels, mask)
    g_ref = {k.replace(".modules_to_save", ""): v for k, v in g_ref.items()}
    loss, grads = model.loss_and_grads(ids, labels, mask)
    assert abs(loss - loss_ref) <= 1e-5 * loss_ref
    assert set(grads) == set(g_ref) and "base_model.model.lm_head.weight" in grads
    for name, g in grads.items():
        assert _rel(g, g_ref[name]) <= 1e-3, name


def test_zero_b_equals_base_model_exactly():
    hf = tiny_hf_model("qwen2", seed=6)
    state = state_from_hf(hf, quantize="nf4")
    model = Model(state, LoraConfig(r=4, alpha=8))          # B starts at zero
    ids, _, mask = _batch(3)
    with_adapters = model.forward(ids, mask)
    pairs, model.lora.pairs = model.lora.pairs, {}
    base = model.forward(ids, mask)
    model.lora.pairs = pairs
    assert np.array_equal(with_adapters, base)
    ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.detach().numpy()
    assert _rel(base[mask.astype(bool)], ref[mask.astype(bool)]) <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("model_type,quantize,gc", [("qwen3", "nf4", True), ("llama", None, False)])
def test_parity_split_placement(tmp_path, model_type, quantize, gc):
    """The split placement (projections, FFN and LM head on wgpu -- lavapipe where no GPU --,
    norms, RoPE and attention on the CPU): same tolerances."""
    from qlora_ext.gpu.runtime import GpuError, pick_adapter

    if pick_adapter(allow_software=True) is None:
        pytest.skip("no wgpu adapter (install a Vulkan driver such as Mesa lavapipe)")
    path = make_tiny_checkpoint(tmp_path / "ckpt", model_type=model_type, seed=5, vocab_size=V)
    try:
        model = load_model(path, lora=LoraConfig(r=4, alpha=8), quantize=quantize, device="gpu",
                           gradient_checkpointing=gc, placement="split")
    except GpuError as e:
        pytest.skip(f"wgpu adapter unusable: {e}")
    assert model.placement == "split"
    randomize_lora(model, seed=1)
    _check(model, peft_twin(hf_from_checkpoint(path, model.state), model), *_batch(0))


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
])
def test_parity_rope_scaling(tmp_path, rope_scaling):
    path = make_tiny_checkpoint(tmp_path / "ckpt", model_type="llama", seed=9, vocab_size=V,
                                rope_scaling=rope_scaling, rope_theta=500000.0)
    model = load_model(path, lora=LoraConfig(r=2, alpha=4), quantize=None, device="cpu")
    randomize_lora(model, seed=4)
    _check(model, peft_twin(hf_from_checkpoint(path, model.state), model), *_batch(5, T=24))


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_parity_llama_attention_bias(tmp_path, quantize):
    """Llama with attention_bias=True: HF puts a bias on q, k, v AND o."""
    path = make_tiny_checkpoint(tmp_path / "ckpt", model_type="llama", seed=11, vocab_size=V, attention_bias=True)
    model = load_model(path, lora=LoraConfig(r=2, alpha=4), quantize=quantize, device="cpu")
    assert "o_proj" in model.state.layers[0].bias
    randomize_lora(model, seed=6)
    _check(model, peft_twin(hf_from_checkpoint(path, model.state), model), *_batch(2))


def test_smollm2_gguf_logits_match_transformers():
    """The packaged SmolLM2-135M GGUF (Q4_1): our loader (fp32 base, adapters at B = 0) against
    transformers reading the same file; same tokenizer ids for the same text."""
    pytest.importorskip("gguf")
    import transformers

    from qlora_ext.model.loading import resolve_model_path

    try:
        path = resolve_model_path("smollm2-135m")
    except OSError as e:
        pytest.skip(str(e))
    import os

    model = load_model(path, lora=LoraConfig(r=2, alpha=4), quantize=None, device="cpu")
    text = "The capital of France is Paris, and the capital of Italy is"
    hf_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    ids = model.tokenizer.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    ours = model.forward(np.array([ids]))
    assert _rel(ours, ref) <= 1e-4
    assert int(ours[0, -1].argmax()) == int(ref[0, -1].argmax())
