"""The decoder layer, written once: forward and backward as straight lists of op calls over a
LayerActs record (engine/acts.py).  `dev` is a device (engine/cpu_device.py, engine/gpu_device.py)
whose methods run each op on its own buffers; the program never looks at what they are.

Op contracts (every placement):
  linear_forward(l, proj, x, y, u)   y = x Wᵀ + bias + (u = scale · drop(x) Aᵀ) Bᵀ; y None: u only
  linear_backward(l, proj, dy, x, u, dx, accumulate)
                                     dx (+)= dy W + scale · ((dy B) A) masked; dA, dB ADDED into
                                     the device's gradient buffer; dx None: no input gradient
  rmsnorm_backward(..., dx, accumulate) and add(y, x) (y += x) add where they say so;
  everything else overwrites its outputs.

Shape letters as in engine/acts.py."""
from __future__ import annotations

from .acts import act_slot


def layer_forward(dev, l: int, a, s, x, y, cache=None) -> None:
    """x [N, H] (copied into a.x) -> y [N, H] = the layer's output; s is the step's
    StepScratch (the SwiGLU product goes to s.m).  y None (the recompute of
    activation checkpointing): everything backward reads, without the down projection's
    output.  `cache`: a KV cache (generation): the new keys and values go in, and the
    attention covers the cached ones."""
    d = dev.dims
    N, Hq, Hkv, D = d.N, d.Hq, d.Hkv, d.D
    w = dev.layer_weights(l)
    if x is not a.x:
        dev.copy(x, a.x)
    dev.rmsnorm_forward(a.x, w.ln1, a.h1, a.rstd1)
    q_out = a.q_pre if d.qk_norm else dev.view(a.q, (N, Hq * D))
    k_out = a.k_pre if d.qk_norm else dev.view(a.k, (N, Hkv * D))
    dev.linear_forward(l, "q_proj", a.h1, q_out, a.lora_u.get("q_proj"))
    dev.linear_forward(l, "k_proj", a.h1, k_out, a.lora_u.get("k_proj"))
    dev.linear_forward(l, "v_proj", a.h1, dev.view(a.v, (N, Hkv * D)), a.lora_u.get("v_proj"))
    if d.qk_norm:
        dev.rmsnorm_forward(dev.view(a.q_pre, (N * Hq, D)), w.q_norm, dev.view(a.q, (N * Hq, D)), a.q_rstd)
        dev.rmsnorm_forward(dev.view(a.k_pre, (N * Hkv, D)), w.k_norm, dev.view(a.k, (N * Hkv, D)), a.k_rstd)
    dev.rope(a.q, +1)
    dev.rope(a.k, +1)
    if cache is None:
        dev.attention_forward(a.q, a.k, a.v, a.attn, a.lse)
    else:
        dev.attention_cached(l, cache, a.q, a.k, a.v, a.attn, a.lse)
    dev.linear_forward(l, "o_proj", dev.view(a.attn, (N, Hq * D)), a.x2, a.lora_u.get("o_proj"))
    dev.add(a.x2, a.x)
    dev.rmsnorm_forward(a.x2, w.ln2, a.h2, a.rstd2)
    dev.linear_forward(l, "gate_proj", a.h2, a.g, a.lora_u.get("gate_proj"))
    dev.linear_forward(l, "up_proj", a.h2, a.u, a.lora_u.get("up_proj"))
    dev.swiglu_forward(a.g, a.u, s.m)
    dev.linear_forward(l, "down_proj", s.m, y, a.lora_u.get("down_proj"))
    if y is not None:
        dev.add(y, a.x2)


def layer_backward(dev, l: int, a, dy, dx, s) -> None:
    """dy [N, H] -> dx [N, H] (dx None: the first layer, whose input gradient nothing reads;
    dx must not alias dy).  LoRA gradients are added into the device's gradient buffer.
    `s` is the step's StepScratch."""
    d = dev.dims
    N, Hq, Hkv, D = d.N, d.Hq, d.Hkv, d.D
    w = dev.layer_weights(l)
    lu = a.lora_u.get
    dev.swiglu_forward(a.g, a.u, s.m)      # not kept per layer (acts.StepScratch says why)
    dev.linear_backward(l, "down_proj", dy, s.m, lu("down_proj"), s.dm, False)
    dg = s.m                               # m is read: its buffer takes dg
    dev.swiglu_backward(a.g, a.u, s.dm, dg, s.du)
    dev.linear_backward(l, "gate_proj", dg, a.h2, lu("gate_proj"), s.dh, False)
    dev.linear_backward(l, "up_proj", s.du, a.h2, lu("up_proj"), s.dh, True)
    dev.copy(dy, s.dx2)
    dev.rmsnorm_backward(a.x2, w.ln2, a.rstd2, s.dh, s.dx2, True)
    dev.linear_backward(l, "o_proj", s.dx2, dev.view(a.attn, (N, Hq * D)), lu("o_proj"), s.da, False)
    dev.attention_backward(a.q, a.k, a.v, a.attn, a.lse, dev.view(s.da, (d.B, d.T, Hq, D)), s.dq, s.dk, s.dv)
    dev.rope(s.dq, -1)
    dev.rope(s.dk, -1)
    dq, dk = dev.view(s.dq, (N, Hq * D)), dev.view(s.dk, (N, Hkv * D))
    if d.qk_norm:
        dev.rmsnorm_backward(dev.view(a.q_pre, (N * Hq, D)), w.q_norm, a.q_rstd, dev.view(s.dq, (N * Hq, D)),
                             s.dqn, False)
        dev.rmsnorm_backward(dev.view(a.k_pre, (N * Hkv, D)), w.k_norm, a.k_rstd, dev.view(s.dk, (N * Hkv, D)),
                             s.dkn, False)
        dq, dk = dev.view(s.dqn, (N, Hq * D)), dev.view(s.dkn, (N, Hkv * D))
    dh = s.dh if dx is not None else None
    dev.linear_backward(l, "q_proj", dq, a.h1, lu("q_proj"), dh, False)
    dev.linear_backward(l, "k_proj", dk, a.h1, lu("k_proj"), dh, True)
    dev.linear_backward(l, "v_proj", dev.view(s.dv, (N, Hkv * D)), a.h1, lu("v_proj"), dh, True)
    if dx is not None:
        dev.copy(s.dx2, dx)
        dev.rmsnorm_backward(a.x, w.ln1, a.rstd1, dh, dx, True)


def _replayed(dev, key: tuple, run) -> None:
    """run(), through the device's replay of earlier runs with the same key where it has one
    (GpuDevice.replayable; None or absent: the device has none).  key names the buffers run()
    uses (they live as long as the batch shape's buffers do)."""
    rep = getattr(dev, "replayable", None)
    if rep is None:
        run()
    else:
        rep(key, run)


def forward_layers(dev, acts: list, s, keep: bool) -> None:
    """Embedded s.x through every layer, then the final norm into s.xf / s.rstdf.  keep: save
    what backward reads (the LayerActs of each layer that keeps them, the input of each of the
    dev.recompute_layers layers that recompute); else one LayerActs serves every layer."""
    R = dev.recompute_layers if keep else 0
    x = s.x
    for l in range(dev.layers):
        a = acts[act_slot(l, R) if keep else 0]
        if l < R:
            dev.copy(x, s.inputs[l])
        _replayed(dev, ("forward", l, id(a), id(s), id(x)), lambda: layer_forward(dev, l, a, s, x, x))
        dev.layer_done()
    dev.rmsnorm_forward(x, dev.final_norm, s.xf, s.rstdf)


def backward_layers(dev, acts: list, s) -> None:
    """From s.dh (the gradient of the final norm's output) back through every layer."""
    dy, dx = s.gy, s.gx
    R = dev.recompute_layers
    dev.rmsnorm_backward(s.x, dev.final_norm, s.rstdf, s.dh, dy, False)
    for l in reversed(range(dev.layers)):
        a = acts[act_slot(l, R)]

        def run(l=l, a=a, dy=dy, dx=dx):
            if l < R:
                # recompute this layer's activations from its saved input; its output is not
                # read, so the down projection's GEMM is skipped
                layer_forward(dev, l, a, s, s.inputs[l], None)
            layer_backward(dev, l, a, dy, dx if l > 0 else None, s)

        _replayed(dev, ("backward", l, R, id(a), id(s), id(dy), id(dx)), run)
        dev.layer_done()
        dy, dx = dx, dy
