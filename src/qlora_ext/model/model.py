"""The Model: a ModelState (frozen base, NF4 or fp32), LoRA adapters, and an FFN backend,
run layer by layer.  Forward, loss, and exact gradients of the loss to every LoRA A/B (and
the LM head when trained), with the conventions of HF transformers + PEFT.

Shape letters: B batch, T tokens, N = B*T, H hidden, V vocab."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from ..finite import NonFiniteError, first_nonfinite
from . import reference_kernels
from .layers import DecoderLayers, PhaseTimer, StepInputs
from .lora import LM_HEAD_NAME, PROJECTIONS, LoraConfig, LoraWeights
from .loss import IGNORE_INDEX, cross_entropy, shifted_targets


_KERNEL_GROUPS = (("attention_forward", "attention_backward"),
                  ("rope_tables", "rope_forward", "rope_backward"),
                  ("rmsnorm_forward", "rmsnorm_backward"))


def default_kernels():
    """The compiled CPU kernels, group by group (a group's functions share data such as the
    RoPE tables); a group the build lacks falls back to the numpy reference (slow, correct)."""
    try:
        from ..cpu import kernels as compiled
    except ImportError:
        return reference_kernels
    chosen = {}
    for group in _KERNEL_GROUPS:
        src = compiled if all(hasattr(compiled, f) for f in group) else reference_kernels
        chosen.update({f: getattr(src, f) for f in group})
    return SimpleNamespace(**chosen)


class Model:
    """See DESIGN.md.  `state` is a qlora_ext.model.state.ModelState."""

    def __init__(self, state, lora_config: LoraConfig | None = None, backend=None,
                 gradient_checkpointing: bool = False, train_lm_head: bool = False,
                 threads: int | None = None, seed: int = 0, kernels=None):
        self.state = state
        self.config = state.config
        self.tokenizer = getattr(state, "tokenizer", None)
        self.lora_config = lora_config if lora_config is not None else LoraConfig()
        if backend is None:
            from ..cpu.ffn import CpuFfnBackend
            backend = CpuFfnBackend()
        self.backend = backend
        self.backend.prepare(state)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.threads = threads
        # C kernel threads.  Default 1: these kernels run between sgemms, and an OpenMP team
        # started while OpenBLAS's threads still spin fights them for the cores (measured on
        # 2 shared cores: RoPE + norms + attention of SmolLM2 at seq 256 took 3.3 s with 2
        # threads, 0.09 s with 1).  BLAS keeps its own setting.
        self.kernel_threads = 1 if threads is None else int(threads)
        self.seed = int(seed)
        self.kernels = kernels if kernels is not None else default_kernels()
        self.timer = PhaseTimer()
        if getattr(self.backend, "name", "cpu") != "cpu":
            self.timer.devices["ffn"] = "wait"  # the backend records its own GPU/transfer spans
        self.lora = LoraWeights.init(self.lora_config, self._layer_shapes(), seed=self.seed)
        self.lm_head = None
        if train_lm_head:
            # a private trainable copy (for tied embeddings this unties the head, as PEFT's
            # modules_to_save does)
            self.lm_head = np.array(state.lm_head_weight, dtype=np.float32, copy=True)
        self.placement_reason = ""   # why load_model chose this placement
        self.step = 0           # advanced per loss_and_grads call; dropout masks derive from it
        self.optimizer_bytes = 0  # the trainer reports its moments here for memory_report()
        self._layers = DecoderLayers(state, self.lora, self.backend, self.kernels, self.timer,
                                     threads=self.kernel_threads, seed=self.seed,
                                     attention_threads=threads)

    def _layer_shapes(self) -> list[dict]:
        return [{p: tuple(lw.proj[p].shape) for p in PROJECTIONS} for lw in self.state.layers]

    @property
    def placement(self) -> str:
        """"cpu" (everything on the CPU) or "split" (FFN on a GPU backend); the GPU-resident
        model (qlora_ext.gpu.resident.model) says "resident"."""
        return "cpu" if getattr(self.backend, "name", "cpu") == "cpu" else "split"

    @property
    def train_lm_head(self) -> bool:
        return self.lm_head is not None

    @property
    def lm_head_weight(self) -> np.ndarray:
        return self.lm_head if self.lm_head is not None else self.state.lm_head_weight

    # ------------------------------------------------------------------ inputs
    def _inputs(self, input_ids, attention_mask, labels=None):
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
            raise ValueError(f"input_ids must be [B, T] (or [T]) with B, T >= 1, got shape {np.shape(input_ids)}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be integers, got {ids.dtype}")
        V = int(self.config.vocab_size)
        if ids.min() < 0 or ids.max() >= V:
            raise ValueError(f"input_ids must be in [0, {V}), got values in [{ids.min()}, {ids.max()}]")
        B, T = ids.shape
        mask = None
        if attention_mask is not None:
            m = np.asarray(attention_mask)
            if m.ndim == 1:
                m = m[None]
            if m.shape != (B, T):
                raise ValueError(f"attention_mask has shape {np.shape(attention_mask)}, expected {(B, T)}")
            if not np.isin(m, (0, 1)).all():
                raise ValueError("attention_mask must hold only 0 and 1")
            mask = None if m.all() else np.ascontiguousarray(m, dtype=np.uint8)
        lab = None
        if labels is not None:
            lab = np.asarray(labels)
            if lab.ndim == 1:
                lab = lab[None]
            if lab.shape != (B, T):
                raise ValueError(f"labels has shape {np.shape(labels)}, expected {(B, T)} like input_ids")
            if not np.issubdtype(lab.dtype, np.integer):
                raise ValueError(f"labels must be integers, got {lab.dtype}")
            bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= V))
            if bad.any():
                raise ValueError(f"labels must be -100 or in [0, {V}), got {lab[bad][0]}")
        self._layers.ensure_positions(T)
        inp = StepInputs(B, T, np.arange(T, dtype=np.int64), mask, step=self.step)
        return ids, inp, lab

    def _embed(self, ids) -> np.ndarray:
        with self.timer("embed"):
            return self.state.embed_tokens[ids.reshape(-1)]          # [N, H], a copy

    def _final_norm(self, x):
        with self.timer("norms"):
            return self.kernels.rmsnorm_forward(x, self.state.norm, float(self.config.rms_norm_eps),
                                                threads=self.kernel_threads)

    # ------------------------------------------------------------------ forward
    def _hidden(self, input_ids, attention_mask):
        """Final-norm hidden states [N, H] without keeping activations."""
        ids, inp, _ = self._inputs(input_ids, attention_mask)
        x = self._embed(ids)
        for l in range(len(self.state.layers)):
            x, _ = self._layers.forward(l, x, inp, keep=False)
        return self._final_norm(x)[0], inp

    def forward(self, input_ids, attention_mask=None) -> np.ndarray:
        """int [B, T] -> float32 logits [B, T, V]."""
        h, inp = self._hidden(input_ids, attention_mask)
        with self.timer("lm_head"):
            logits = h @ self.lm_head_weight.T
        return logits.reshape(inp.B, inp.T, -1)

    __call__ = forward

    @staticmethod
    def count_tokens(labels) -> int:
        """Targets the loss counts: labels after the shift that are not -100."""
        lab = np.asarray(labels)
        if lab.ndim == 1:
            lab = lab[None]
        return int(np.count_nonzero(lab[:, 1:] != IGNORE_INDEX))

    def _grad_scale(self, count, reduction):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        return 1.0 if reduction == "sum" else 1.0 / max(count, 1)

    def _finish_loss(self, total, count, reduction):
        if reduction == "sum":
            return float(total)
        # a batch with nothing to count has no mean (transformers returns nan too)
        return float(total) / count if count else float("nan")

    def loss(self, input_ids, labels, attention_mask=None, reduction: str = "mean") -> float:
        """Forward only (no activations kept, chunked logits): the eval loss."""
        self._grad_scale(0, reduction)
        ids, inp, lab = self._inputs(input_ids, attention_mask, labels)
        tgt = shifted_targets(lab).reshape(-1)
        rows = np.flatnonzero(tgt != IGNORE_INDEX)
        h, _ = self._hidden(ids, attention_mask)
        total, _ = cross_entropy(h[rows], self.lm_head_weight, tgt[rows], None, timer=self.timer)
        return self._finish_loss(total, rows.size, reduction)

    # ------------------------------------------------------------------ training
    def zero_grads(self) -> dict:
        return {name: np.zeros_like(a) for name, a in self.parameters().items()}

    def loss_and_grads(self, input_ids, labels, attention_mask=None, reduction: str = "mean"):
        """(loss, {PEFT name: float32 grad}) of the mean (or sum) cross-entropy over counted
        targets; grads of every trainable array (LoRA A/B, and the LM head when trained)."""
        ids, inp, lab = self._inputs(input_ids, attention_mask, labels)
        inp.training = True
        self.step += 1
        tgt = shifted_targets(lab).reshape(-1)
        rows = np.flatnonzero(tgt != IGNORE_INDEX)
        count = rows.size
        scale = self._grad_scale(count, reduction)
        grads = self.zero_grads()
        if count == 0:
            return self._finish_loss(0.0, 0, reduction), grads
        L = len(self.state.layers)
        keep = not self.gradient_checkpointing
        saved = []                       # per layer: LayerActivations, or the layer input when checkpointing
        x = self._embed(ids)
        for l in range(L):
            y, acts = self._layers.forward(l, x, inp, keep=keep)
            saved.append(acts if keep else x)
            x = y
        h, rstd = self._final_norm(x)
        dW = grads.get(LM_HEAD_NAME)
        total, dh_rows = cross_entropy(h[rows], self.lm_head_weight, tgt[rows], scale, dW=dW, timer=self.timer)
        del h
        dh = np.zeros((inp.B * inp.T, dh_rows.shape[1]), dtype=np.float32)
        dh[rows] = dh_rows
        with self.timer("norms"):
            dx, _ = self.kernels.rmsnorm_backward(x, self.state.norm, rstd, dh, threads=self.kernel_threads)
        del dh, dh_rows, x
        for l in reversed(range(L)):
            acts = saved[l]
            if not keep:
                _, acts = self._layers.forward(l, acts, inp, keep=True, prefetch_next=False)
            saved[l] = None
            dx = self._layers.backward(l, acts, dx, inp, grads, need_dx=l > 0)
        return self._finish_loss(total, count, reduction), grads

    # ------------------------------------------------------------------ parameters
    def parameters(self) -> dict:
        """{PEFT name: live float32 array} in a stable order."""
        params = self.lora.named_parameters()
        if self.lm_head is not None:
            params[LM_HEAD_NAME] = self.lm_head
        return params

    def set_parameters(self, values: dict) -> None:
        """Copy arrays into the live parameters; every name must be known and shapes must match."""
        params = self.parameters()
        for name, v in values.items():
            if name not in params:
                raise ValueError(f"unknown parameter {name!r}; expected PEFT names such as {next(iter(params))!r}")
            v = np.asarray(v)
            if v.shape != params[name].shape:
                raise ValueError(f"parameter {name}: shape {v.shape}, expected {params[name].shape}")
            params[name][...] = v

    # ------------------------------------------------------------------ adapters
    def save_adapter(self, directory) -> None:
        from .lora import save_peft_adapter
        save_peft_adapter(directory, self.lora, base_model=self._base_name(), lm_head=self.lm_head)

    def load_adapter(self, directory) -> None:
        """Replace the adapters (r, alpha, targets from the file's adapter_config.json)."""
        from .lora import load_peft_adapter
        shapes = self._layer_shapes()
        lora, lm_head = load_peft_adapter(directory, shapes, lm_head_shape=tuple(self.state.lm_head_weight.shape))
        loaded = lora.named_parameters()
        if lm_head is not None:
            loaded[LM_HEAD_NAME] = lm_head
        bad = first_nonfinite(loaded)
        if bad is not None or not math.isfinite(lora.config.scale):
            what = f"tensor {bad}" if bad else f"lora_alpha {lora.config.alpha!r}"
            raise NonFiniteError(f"{directory}: adapter {what} is NaN or Inf; the adapter was not loaded")
        same = (set(lora.pairs) == set(self.lora.pairs)
                and all(lora.pairs[k].A.shape == p.A.shape for k, p in self.lora.pairs.items()))
        if same:
            # copy into the live arrays: an optimizer holding them (a resumed trainer) stays valid
            for k, p in self.lora.pairs.items():
                p.A[...] = lora.pairs[k].A
                p.B[...] = lora.pairs[k].B
                p.scale = lora.pairs[k].scale
            self.lora.config = lora.config
        else:
            self.lora = lora
            self._layers.lora = lora
        self.lora_config = lora.config
        if lm_head is not None:
            if self.lm_head is not None:
                self.lm_head[...] = lm_head
            else:
                self.lm_head = lm_head

    def _base_name(self) -> str:
        return str(getattr(self.state, "source", None) or getattr(self.state, "path", None) or "")

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed=None, stop_ids=None) -> list[int]:
        from .generate import generate
        return generate(self, prompt_ids, max_new_tokens, temperature, top_p, seed, stop_ids)

    # ------------------------------------------------------------------ reports
    def memory_report(self) -> dict:
        rep = dict(self.state.memory_report()) if hasattr(self.state, "memory_report") else {}
        rep["lora_bytes"] = int(sum(a.nbytes for a in self.lora.named_parameters().values()))
        if self.lm_head is not None:
            rep["lm_head_trained_bytes"] = int(self.lm_head.nbytes)
        if self.optimizer_bytes:
            rep["optimizer_bytes"] = int(self.optimizer_bytes)
        return rep

    def phase_times(self, reset: bool = True) -> dict:
        """Seconds per phase since the last reset (see layers.PhaseTimer)."""
        return self.timer.reset() if reset else dict(self.timer.times)
