"""NaN/Inf checks shared by loading, training and saving (the policy is in README.md,
"What is checked").

One pass per array and no temporary as large as it: min and max propagate a NaN and expose
an Inf, so both are finite exactly when every element is."""
from __future__ import annotations

import math

import numpy as np


class NonFiniteError(ValueError):
    """A NaN or Inf where a finite number is required (weights, loss, gradient, a setting)."""


def is_finite_array(a) -> bool:
    a = np.asarray(a)
    if a.size == 0 or a.dtype.kind != "f":
        return True
    return bool(np.isfinite(a.min()) and np.isfinite(a.max()))


def first_nonfinite(named) -> str | None:
    """The name of the first array holding a NaN or Inf in `named` ({name: array} or an
    iterable of (name, array) pairs, checked in order), or None."""
    for name, a in (named.items() if isinstance(named, dict) else named):
        if not is_finite_array(a):
            return name
    return None


def base_weight_arrays(state):
    """(HF name, array) for every floating-point array of a qlora_ext ModelState: embeddings,
    norms, biases, the LM head, and each projection (its NF4 block scales, or the float32
    weight when not quantized).  NF4 codes index a finite table, so the scales suffice."""
    yield "model.embed_tokens.weight", state.embed_tokens
    for i, layer in enumerate(state.layers):
        prefix = f"model.layers.{i}."
        yield prefix + "input_layernorm.weight", layer.input_layernorm
        yield prefix + "post_attention_layernorm.weight", layer.post_attention_layernorm
        for norm in ("q_norm", "k_norm"):
            if getattr(layer, norm, None) is not None:
                yield prefix + f"self_attn.{norm}.weight", getattr(layer, norm)
        for proj, w in layer.proj.items():
            module = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            absmax = getattr(w, "absmax", None)
            if absmax is not None:
                yield prefix + f"{module}.{proj}.weight (NF4 block scales)", absmax
            else:
                yield prefix + f"{module}.{proj}.weight", w
        for proj, b in layer.bias.items():
            yield prefix + f"self_attn.{proj}.bias", b
    yield "model.norm.weight", state.norm
    if state.lm_head is not None:
        yield "lm_head.weight", state.lm_head


def check_base_weights(state) -> None:
    """NonFiniteError naming the first base weight with a NaN or Inf (training from it would
    only produce NaN; the file is damaged or was saved after a diverged run)."""
    bad = first_nonfinite(base_weight_arrays(state))
    if bad is not None:
        source = getattr(state, "source", "") or "the model"
        raise NonFiniteError(f"{source}: base weight {bad} holds NaN or Inf values; the model file is damaged")


def json_safe(obj):
    """obj with every non-finite float replaced by None (so json.dumps(allow_nan=False)
    writes valid JSON: NaN and Infinity are not JSON)."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
