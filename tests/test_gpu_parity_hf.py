"""The parity tests against HF + PEFT for the gpu placement: logits, loss and LoRA
gradients against HF transformers + PEFT (torch autograd) on tiny Qwen3 / Qwen2 / Llama
models, fp32 and NF4 base, all 7 projections, non-zero B (on lavapipe in CI).  Tolerances as
tests/test_parity_hf.py: logits 1e-4 of the largest logit, loss 1e-5, grads 1e-3."""
from functools import partial

import pytest

from gpu_support import gpu_twin

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from hf_reference import (batch_with_padding, check_parity as _check, hf_from_checkpoint,  # noqa: E402
                          peft_twin, randomize_lora, state_from_hf, tiny_hf_model)
from model_factory import make_tiny_checkpoint  # noqa: E402

from qlora_ext.api import load_model  # noqa: E402
from qlora_ext.model.lora import LoraConfig  # noqa: E402
from qlora_ext.engine.model import Model  # noqa: E402

pytestmark = pytest.mark.gpu
V = 97
_batch = partial(batch_with_padding, vocab=V)


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("model_type", ["qwen3", "qwen2", "llama"])
def test_gpu_parity_logits_loss_grads(ctx, tmp_path, model_type, quantize):

    path = make_tiny_checkpoint(tmp_path / "ckpt", model_type=model_type, seed=3, vocab_size=V)
    model = load_model(path, lora=LoraConfig(r=4, alpha=8), quantize=quantize, device="cpu")
    randomize_lora(model, seed=1)
    pm = peft_twin(hf_from_checkpoint(path, model.state), model)
    _check(gpu_twin(model, ctx), pm, *_batch(0))


def test_gpu_parity_left_padding_double_quant_rslora(ctx):

    hf = tiny_hf_model("qwen3", seed=4)
    model = Model(state_from_hf(hf, quantize="nf4", double_quant=True), LoraConfig(r=3, alpha=5, use_rslora=True))
    randomize_lora(model, seed=2)
    _check(gpu_twin(model, ctx, weights="streamed"), peft_twin(hf, model), *_batch(1, pad_right=False))


def test_gpu_parity_subset_targets_checkpointing_lm_head(ctx):

    hf = tiny_hf_model("llama", seed=5, tie=True)
    model = Model(state_from_hf(hf), LoraConfig(r=2, alpha=4, target_modules=("q", "v", "down")),
                  train_lm_head=True)
    randomize_lora(model, seed=3, scale=0.05)
    _check(gpu_twin(model, ctx, gradient_checkpointing=True), peft_twin(hf, model), *_batch(2))


def test_gpu_placement_from_load_model_parity(ctx, tmp_path):
    """The user's path: load_model(placement="gpu") gives a model whose forward, loss and
    grads (the Model API over the engine) match HF + PEFT."""
    path = make_tiny_checkpoint(tmp_path / "ckpt", model_type="qwen3", seed=6, vocab_size=V)
    model = load_model(path, lora=LoraConfig(r=4, alpha=8), quantize="nf4", device="gpu", placement="gpu")
    assert model.placement == "gpu"
    randomize_lora(model, seed=4)
    _check(model, peft_twin(hf_from_checkpoint(path, model.state), model), *_batch(3))


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_gpu_parity_llama_attention_bias(ctx, tmp_path, quantize):
    """Llama with attention_bias=True: HF puts a frozen bias on q, k, v and o."""

    path = make_tiny_checkpoint(tmp_path / "ckpt", model_type="llama", seed=11, vocab_size=V, attention_bias=True)
    model = load_model(path, lora=LoraConfig(r=2, alpha=4), quantize=quantize, device="cpu")
    assert "o_proj" in model.state.layers[0].bias
    randomize_lora(model, seed=6)
    _check(gpu_twin(model, ctx), peft_twin(hf_from_checkpoint(path, model.state), model), *_batch(2))
