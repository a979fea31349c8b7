"""HF transformers + PEFT twins of a qlora_ext Model, for the parity tests.

tiny_hf_model() builds a random tiny HF model; state_from_hf() turns its weights into a
qlora_ext ModelState (optionally NF4, in which case the HF weights are replaced by the
dequantized NF4 values so both sides run the same base); peft_twin() wraps the HF model in
PEFT with the qlora_ext model's adapters copied in."""
from __future__ import annotations

import numpy as np

import qlora_ext
from qlora_ext.model.config import ModelConfig
from qlora_ext.model.lora import PROJECTIONS
from qlora_ext.model.state import LayerWeights, ModelState

TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
            rms_norm_eps=1e-6, rope_theta=10000.0)


def tiny_hf_model(model_type: str, seed: int = 0, tie: bool = False, **overrides):
    """A random fp32 HF model of `model_type` with non-trivial norm weights and biases."""
    import torch
    import transformers

    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "qwen3": transformers.Qwen3Config}[model_type]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "qwen3": transformers.Qwen3ForCausalLM}[model_type]
    kw = dict(TINY, tie_word_embeddings=tie, **overrides)
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    m = model_cls(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return m


def state_from_hf(m, quantize=None, blocksize=64, double_quant=False) -> ModelState:
    """qlora_ext ModelState with m's weights; for quantize='nf4' the projections are NF4 and
    m's projection weights are overwritten with their dequantized values."""
    import torch

    cfg = ModelConfig.from_hf(m.config.to_dict())
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in m.state_dict().items()}
    layers = []
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        proj, bias = {}, {}
        for p in PROJECTIONS:
            mod = "self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            w = np.ascontiguousarray(sd[f"{pre}{mod}.{p}.weight"])
            if quantize == "nf4":
                t = qlora_ext.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
                deq = qlora_ext.dequantize_nf4(t)
                with torch.no_grad():
                    getattr(getattr(m.model.layers[i], mod), p).weight.copy_(torch.from_numpy(deq))
                w = t
            proj[p] = w
            b = sd.get(f"{pre}{mod}.{p}.bias")
            if b is not None:
                bias[p] = b
        qn = sd.get(f"{pre}self_attn.q_norm.weight")
        kn = sd.get(f"{pre}self_attn.k_norm.weight")
        layers.append(LayerWeights(sd[f"{pre}input_layernorm.weight"], sd[f"{pre}post_attention_layernorm.weight"],
                                   proj, bias, qn, kn))
    lm = None if cfg.tie_word_embeddings else sd["lm_head.weight"]
    return ModelState(cfg, sd["model.embed_tokens.weight"], sd["model.norm.weight"], lm, layers,
                      quantize=quantize, double_quant=double_quant, blocksize=blocksize)


def hf_from_checkpoint(path, state):
    """transformers' model of checkpoint `path`, with the projections replaced by the
    dequantized NF4 values when `state` (qlora_ext's load of the same path) is quantized."""
    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    with torch.no_grad():
        for i, lw in enumerate(state.layers):
            for p in PROJECTIONS:
                mod = "self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                getattr(getattr(m.model.layers[i], mod), p).weight.copy_(torch.from_numpy(lw.weight(p)))
    return m


def randomize_lora(model, seed=0, scale=0.2):
    """Non-zero B (and fresh A) so that the adapters matter."""
    rng = np.random.default_rng(seed)
    model.set_parameters({k: (scale * rng.standard_normal(v.shape)).astype(np.float32)
                          for k, v in model.parameters().items()})


def peft_twin(hf_model, model):
    """PEFT model around hf_model with `model`'s LoRA config and weights (a trained LM head
    as PEFT's modules_to_save, which unties it from the embeddings)."""
    import peft
    import torch

    lc = model.lora_config
    pc = peft.LoraConfig(r=lc.r, lora_alpha=lc.alpha, target_modules=list(lc.target_modules),
                         lora_dropout=0.0, use_rslora=lc.use_rslora, bias="none", task_type="CAUSAL_LM",
                         modules_to_save=["lm_head"] if model.train_lm_head else None)
    pm = peft.get_peft_model(hf_model, pc)
    named = dict(pm.named_parameters())
    with torch.no_grad():
        for name, arr in model.parameters().items():
            key = (name.replace("lm_head.weight", "lm_head.modules_to_save.default.weight")
                   .replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"))
            named[key].copy_(torch.from_numpy(np.ascontiguousarray(arr)))
    return pm.eval()


def peft_grads(pm, input_ids, labels, attention_mask=None):
    """(loss, {PEFT name without '.default': grad}) from torch autograd."""
    import torch

    pm.zero_grad()
    out = pm(input_ids=torch.from_numpy(np.asarray(input_ids, dtype=np.int64)),
             attention_mask=None if attention_mask is None else torch.from_numpy(np.asarray(attention_mask, dtype=np.int64)),
             labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)))
    out.loss.backward()
    grads = {n.replace(".default", ""): p.grad.detach().numpy().copy()
             for n, p in pm.named_parameters() if p.requires_grad and p.grad is not None}
    return float(out.loss), grads, out.logits.detach().numpy()


def batch_with_padding(seed=0, B=2, T=11, pad_right=True, vocab=97):
    """ids, labels (with -100 on a prefix and on padding) and an attention mask with padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (B, T))
    labels = ids.copy()
    labels[0, :3] = -100
    mask = np.ones_like(ids)
    if B > 1:
        if pad_right:
            mask[1, T - 3:] = 0
        else:
            mask[1, :3] = 0
        labels[1][mask[1] == 0] = -100
        if not pad_right:
            # the first real token would be predicted from a pad position, whose attention
            # row sees no key: undefined (HF attends uniformly, we output zeros)
            labels[1, 3] = -100
    return ids, labels, mask


def rel_to_max(a, b):
    """max |a - b| relative to max |b|."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check_parity(model, pm, ids, labels, mask, grad_tol=1e-3):
    """The acceptance bounds against HF + PEFT (`pm`, torch autograd): logits 1e-4 of the
    largest logit on real tokens, loss 1e-5 (also through model.loss), every LoRA grad 1e-3 of
    its largest entry.  `model` is any placement's Model."""
    loss_ref, g_ref, logits_ref = peft_grads(pm, ids, labels, mask)
    logits = model.forward(ids, mask)
    real = mask.astype(bool)
    assert logits.dtype == np.float32 and logits.shape == logits_ref.shape
    assert rel_to_max(logits[real], logits_ref[real]) <= 1e-4
    loss, grads = model.loss_and_grads(ids, labels, mask)
    assert abs(loss - loss_ref) <= 1e-5 * abs(loss_ref)
    assert abs(model.loss(ids, labels, mask) - loss_ref) <= 1e-5 * abs(loss_ref)
    # a trained LM head is PEFT's modules_to_save copy; ours carries the plain name
    g_ref = {k.replace(".modules_to_save", ""): v for k, v in g_ref.items()}
    assert set(grads) == set(g_ref)
    for name, g in grads.items():
        assert g.dtype == np.float32
        assert rel_to_max(g, g_ref[name]) <= grad_tol, name
    return loss, grads
