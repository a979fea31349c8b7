"""The named buffers of the layer program: one layer's saved activations (`LayerActs`) and the
per-step scratch of the backward (`StepScratch`), with a shape per field.  `plan_*` give the
shapes; a device allocates them (numpy arrays on the CPU, GpuTensors on a GPU), so the memory
estimate and the allocation read the same table.

Shape letters: B batch, T tokens, N = B*T, H hidden, Hq/Hkv heads, D head dim, F FFN width,
r LoRA rank (per adapted projection)."""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Dims:
    B: int
    T: int
    H: int
    Hq: int
    Hkv: int
    D: int
    F: int
    qk_norm: bool

    @property
    def N(self) -> int:
        return self.B * self.T


@dataclass
class LayerActs:
    """What one layer's backward reads (float32).  q_pre/k_pre/q_rstd/k_rstd only with q/k norm."""

    x: object        # [N, H] layer input
    h1: object       # [N, H] input_layernorm(x)
    rstd1: object    # [N]
    q_pre: object    # [N, Hq*D] q before q_norm
    k_pre: object    # [N, Hkv*D]
    q_rstd: object   # [N*Hq]
    k_rstd: object   # [N*Hkv]
    q: object        # [B, T, Hq, D] after q_norm and RoPE
    k: object        # [B, T, Hkv, D]
    v: object        # [B, T, Hkv, D]
    attn: object     # [B, T, Hq, D] attention output
    lse: object      # [B, Hq, T] log-sum-exp of the scores
    x2: object       # [N, H] after the attention residual
    h2: object       # [N, H] post_attention_layernorm(x2)
    rstd2: object    # [N]
    g: object        # [N, F] gate projection
    u: object        # [N, F] up projection
    lora_u: dict     # proj -> [N, r] scale * xd Aᵀ (adapted projections only)


def plan_layer_acts(d: Dims, ranks: dict) -> dict:
    """{field: shape or None (absent)}; lora_u: {proj: shape}."""
    N = d.N
    qk = d.qk_norm
    return {
        "x": (N, d.H), "h1": (N, d.H), "rstd1": (N,),
        "q_pre": (N, d.Hq * d.D) if qk else None, "k_pre": (N, d.Hkv * d.D) if qk else None,
        "q_rstd": (N * d.Hq,) if qk else None, "k_rstd": (N * d.Hkv,) if qk else None,
        "q": (d.B, d.T, d.Hq, d.D), "k": (d.B, d.T, d.Hkv, d.D), "v": (d.B, d.T, d.Hkv, d.D),
        "attn": (d.B, d.T, d.Hq, d.D), "lse": (d.B, d.Hq, d.T),
        "x2": (N, d.H), "h2": (N, d.H), "rstd2": (N,),
        "g": (N, d.F), "u": (N, d.F),
        "lora_u": {p: (N, r) for p, r in ranks.items()},
    }


@dataclass
class StepScratch:
    """Buffers of one step that no layer keeps: the running hidden state, the final norm, the
    SwiGLU product, the gradients flowing back (reused by every layer), and the inputs saved
    for recompute.

    The SwiGLU product m = silu(g) * u is not kept per layer: the backward recomputes it from
    the kept g and u (one elementwise pass) into this one buffer, which saves an [N, F] buffer
    per layer (1.3 GiB for Qwen3-0.6B at 4 x 1024) for about 0.3% of the step's time.  Once
    the down projection's backward has read m, its buffer takes the gate's gradient dg."""

    x: object        # [N, H] hidden state between layers
    m: object        # [N, F] silu(g) * u of the layer being run, then its dg
    xf: object       # [N, H] final norm output
    rstdf: object    # [N]
    gy: object       # [N, H] gradient of a layer's output (ping-pong with gx)
    gx: object       # [N, H] gradient of a layer's input
    dx2: object      # [N, H]
    dh: object       # [N, H] gradient of a normed input
    dm: object       # [N, F]
    du: object       # [N, F]
    da: object       # [N, Hq*D] gradient of the attention output
    dq: object       # [B, T, Hq, D]
    dk: object       # [B, T, Hkv, D]
    dv: object       # [B, T, Hkv, D]
    dqn: object      # [N*Hq, D] gradient before q_norm (q/k norm models)
    dkn: object      # [N*Hkv, D]
    inputs: list     # R x [N, H] inputs of the R layers that recompute their activations


def act_slot(l: int, recompute: int) -> int:
    """Which LayerActs layer l uses in a training step: layers 0..R-1 recompute into the shared
    slot 0, the others keep their own."""
    return 0 if l < recompute else l - recompute + (1 if recompute else 0)


def plan_scratch(d: Dims, recompute: int) -> dict:
    """recompute: how many layers (the first ones) save their input and recompute the rest."""
    N, qk = d.N, d.qk_norm
    return {
        "x": (N, d.H), "m": (N, d.F), "xf": (N, d.H), "rstdf": (N,), "gy": (N, d.H), "gx": (N, d.H),
        "dx2": (N, d.H), "dh": (N, d.H), "dm": (N, d.F), "du": (N, d.F),
        "da": (N, d.Hq * d.D), "dq": (d.B, d.T, d.Hq, d.D), "dk": (d.B, d.T, d.Hkv, d.D),
        "dv": (d.B, d.T, d.Hkv, d.D),
        "dqn": (N * d.Hq, d.D) if qk else None, "dkn": (N * d.Hkv, d.D) if qk else None,
        "inputs": [(N, d.H)] * recompute,
    }


def allocate(cls, plan: dict, empty):
    """An instance of the dataclass `cls` with every planned shape allocated by empty(shape)."""
    def make(spec):
        if spec is None:
            return None
        if isinstance(spec, dict):
            return {k: make(v) for k, v in spec.items()}
        if isinstance(spec, list):
            return [make(v) for v in spec]
        return empty(spec)
    return cls(**{f.name: make(plan[f.name]) for f in fields(cls)})


def allocate_step(d: Dims, layers: int, recompute: int, keep: bool, ranks, empty) -> tuple:
    """(LayerActs list, StepScratch) of one step, each buffer made by empty(shape).  keep (a
    training step): one LayerActs per layer that keeps its activations and one that the first
    `recompute` layers share (see act_slot), and the recomputing layers' saved inputs; else
    one LayerActs that every layer reuses.  ranks(l): layer l's {proj: LoRA rank}."""
    R = recompute if keep else 0
    owners = [0] if not keep else ([0, *range(R, layers)] if R else list(range(layers)))
    acts = [allocate(LayerActs, plan_layer_acts(d, ranks(l)), empty) for l in owners]
    return acts, allocate(StepScratch, plan_scratch(d, R), empty)
