"""The Model: a ModelState (frozen base, NF4 or fp32), LoRA adapters, and a device that runs
the layer program (engine/program.py).  Forward, loss, exact gradients of the loss to every
LoRA A/B (and the LM head when trained), and generation, with the conventions of HF
transformers + PEFT.

Shape letters: B batch, T tokens, N = B*T, H hidden, V vocab."""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from ..cpu.base_matmul import fused_nf4_available
from ..finite import NonFiniteError, first_nonfinite
from ..model.generate import DEFAULT_TOP_K
from ..model.lora import LM_HEAD_NAME, PROJECTIONS, LoraConfig, LoraWeights
from ..model.loss import IGNORE_INDEX
from ..model.packing import check_packing, mask_cross_document_targets
from ..options import recompute_count
from ..profile import PhaseTimer
from . import program
from .acts import Dims
from .params import FlatParams


def default_kernels():
    """The compiled CPU kernels, group by group; a group the build lacks falls back to the
    numpy reference (slow, correct)."""
    from types import SimpleNamespace

    from ..model import reference_kernels
    try:
        from ..cpu import kernels as compiled
    except ImportError:
        return reference_kernels
    chosen = {}
    for group in (("attention_forward", "attention_backward"), ("rope_tables", "rope_forward", "rope_backward"),
                  ("rmsnorm_forward", "rmsnorm_backward"), ("swiglu_forward", "swiglu_backward")):
        src = compiled if all(hasattr(compiled, f) for f in group) else reference_kernels
        chosen.update({f: getattr(src, f) for f in group})
    return SimpleNamespace(**chosen)


def _like_ids(a, name: str, shape: tuple) -> np.ndarray:
    """a as [B, T] ([T] taken as one row), or a ValueError when it is not input_ids' shape."""
    out = np.asarray(a)
    if out.ndim == 1:
        out = out[None]
    if out.shape != shape:
        raise ValueError(f"{name} has shape {np.shape(a)}, expected {shape} like input_ids")
    return out


def check_inputs(config, input_ids, attention_mask, labels=None):
    """(ids int [B, T], mask uint8 [B, T] or None (no padding), labels [B, T] or None), with a
    ValueError naming what is wrong."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise ValueError(f"input_ids must be [B, T] (or [T]) with B, T >= 1, got shape {np.shape(input_ids)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got {ids.dtype}")
    V = int(config.vocab_size)
    if ids.min() < 0 or ids.max() >= V:
        raise ValueError(f"input_ids must be in [0, {V}), got values in [{ids.min()}, {ids.max()}]")
    B, T = ids.shape
    mask = None
    if attention_mask is not None:
        m = _like_ids(attention_mask, "attention_mask", (B, T))
        if not np.isin(m, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")
        mask = None if m.all() else np.ascontiguousarray(m, dtype=np.uint8)
    lab = None
    if labels is not None:
        lab = _like_ids(labels, "labels", (B, T))
        if not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"labels must be integers, got {lab.dtype}")
        bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= V))
        if bad.any():
            raise ValueError(f"labels must be -100 or in [0, {V}), got {lab[bad][0]}")
    return ids, mask, lab


def finish_loss(total, count, reduction):
    if reduction == "sum":
        return float(total)
    # a batch with nothing to count has no mean (transformers returns nan too)
    return float(total) / count if count else float("nan")


def check_reduction(reduction):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _on_device(method):
    """Runs the method inside its device's compute_scope() (the CPU device holds numpy's BLAS
    to one thread there)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.device.compute_scope():
            return method(self, *args, **kwargs)
    return run


class RopeCache:
    """The RoPE cos/sin tables of a config, grown when a sequence needs more positions than
    max_position_embeddings (both devices read them from here)."""

    def __init__(self, config, kernels):
        self.config, self.k = config, kernels
        self.tables = kernels.rope_tables(int(config.head_dim), int(config.max_position_embeddings),
                                          float(config.rope_theta), config.rope_scaling)

    def covering(self, n: int):
        if n > self.tables.cos.shape[0]:
            cfg = self.config
            self.tables = self.k.rope_tables(int(cfg.head_dim), n, float(cfg.rope_theta), cfg.rope_scaling)
        return self.tables


class Model:
    """See DESIGN.md.  `state` is a qlora_ext.model.state.ModelState.  This class runs the
    `cpu` placement; the other placements give it another device."""

    placement = "cpu"

    def __init__(self, state, lora_config: LoraConfig | None = None, gradient_checkpointing: bool | int = False,
                 train_lm_head: bool = False, threads: int | None = None, seed: int = 0, kernels=None):
        from .cpu_device import CpuDevice

        self.state = state
        self.config = state.config
        self.tokenizer = getattr(state, "tokenizer", None)
        self.lora_config = lora_config if lora_config is not None else LoraConfig()
        self.recompute_layers = recompute_count(gradient_checkpointing, len(state.layers))
        self.threads = threads
        # C kernel threads.  Where numpy's BLAS does the products (below AVX-512) the default
        # is 1: these kernels run between sgemms, and an OpenMP team started while OpenBLAS's
        # threads still spin fights them for the cores (measured on 2 shared cores: RoPE +
        # norms + attention of SmolLM2 at seq 256 took 3.3 s with 2 threads, 0.09 s with 1).
        # With the fused kernels BLAS is held to one thread (CpuDevice.compute_scope) and every
        # kernel shares one OpenMP team: all cores (None), which the split placement's CPU ops
        # need on a many-core host.
        if threads is not None:
            self.kernel_threads = int(threads)
        else:
            self.kernel_threads = None if fused_nf4_available() else 1
        self.seed = int(seed)
        self.kernels = kernels if kernels is not None else default_kernels()
        self.timer = PhaseTimer()
        self.lora = LoraWeights.init(self.lora_config, self._layer_shapes(), seed=self.seed)
        head = np.array(state.lm_head_weight, dtype=np.float32, copy=True) if train_lm_head else None
        # a private trainable head unties a tied one, as PEFT's modules_to_save does
        self.params = FlatParams(self.lora, head)
        self.placement_reason = ""   # why load_model chose this placement
        self.step = 0           # advanced per loss_and_grads call; dropout masks derive from it
        self.optimizer_bytes = 0  # the trainer reports its moments here for memory_report()
        self.rope = RopeCache(self.config, self.kernels)
        self.device = CpuDevice(state, self.params, self.kernels, self.rope, threads=self.kernel_threads,
                                attention_threads=threads, recompute_layers=self.recompute_layers,
                                timer=self.timer, compute_dtype=self.lora_config.compute_dtype)

    def _layer_shapes(self) -> list[dict]:
        return [{p: tuple(lw.proj[p].shape) for p in PROJECTIONS} for lw in self.state.layers]

    @property
    def pad_multiple(self) -> int:
        """Batches for this model are padded to a multiple of this many tokens (its device's)."""
        return self.device.pad_multiple

    @property
    def train_lm_head(self) -> bool:
        return self.params.head_off is not None

    @property
    def lm_head(self):
        """The trained LM head [V, H] (a live view), or None when the head is frozen."""
        return self.params.lm_head()

    @lm_head.setter
    def lm_head(self, value) -> None:
        head = self.params.lm_head()
        if head is None:
            raise ValueError("this model does not train its LM head (load it with train_lm_head=True)")
        if head is not value:
            head[...] = value

    @property
    def lm_head_weight(self) -> np.ndarray:
        head = self.params.lm_head()
        return head if head is not None else self.state.lm_head_weight

    # ------------------------------------------------------------------ the program's buffers
    @staticmethod
    def dims_of(state, B: int, T: int) -> Dims:
        cfg = state.config
        return Dims(B, T, int(cfg.hidden_size), int(cfg.num_attention_heads), int(cfg.num_key_value_heads),
                    int(cfg.head_dim), int(state.layers[0].proj["gate_proj"].shape[0]),
                    state.layers[0].q_norm is not None)

    def dims(self, B: int, T: int) -> Dims:
        return self.dims_of(self.state, B, T)

    def _begin(self, ids, mask, labels=None, keep: bool = False, training: bool = False, positions=None,
               device=None, segments=None):
        """(dims, LayerActs list, StepScratch) of the batch, handed to the device (None: the
        model's; the split placement's lanes pass their own).  segments: int32 [B, T] of
        packed rows (model/packing.py) or None."""
        B, T = ids.shape
        d = self.dims(B, T)
        pos = np.arange(T, dtype=np.int64) if positions is None else positions
        drop = float(self.lora_config.dropout) if training else 0.0
        dev = self.device if device is None else device
        acts, s = dev.begin(d, pos, mask, ids, labels, keep=keep, dropout=drop, seed=self.seed,
                            step=self.step if training else None, segments=segments)
        return d, acts, s

    def _packing(self, ids, labels, position_ids, segment_ids) -> tuple:
        """(pack, labels): pack = (positions [B, T], segments [B, T] or None) or None for
        plain rows; with segment ids the labels lose their cross-document targets."""
        if position_ids is None and segment_ids is None:
            return None, labels
        T = ids.shape[1]
        pos, segs = check_packing(ids.shape, position_ids, segment_ids,
                                  max(int(self.config.max_position_embeddings), T))
        if segs is not None and labels is not None:
            labels = mask_cross_document_targets(labels, segs)
        return (pos, segs), labels

    # ------------------------------------------------------------------ forward
    def _hidden(self, ids, mask, labels=None, pack=None):
        """The step's scratch with the final-norm hidden states in s.xf (no activations kept)."""
        pos, segs = pack or (None, None)
        d, acts, s = self._begin(ids, mask, labels, positions=pos, segments=segs)
        self.device.embed(s.x)
        program.forward_layers(self.device, acts, s, keep=False)
        return s, d

    @_on_device
    def forward(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None) -> np.ndarray:
        """int [B, T] -> float32 logits [B, T, V].  Packed rows: segment_ids [B, T] (documents
        as runs of equal ids; positions then restart per document) and/or position_ids [B, T]
        (model/packing.py)."""
        ids, mask, _ = check_inputs(self.config, input_ids, attention_mask)
        pack, _ = self._packing(ids, None, position_ids, segment_ids)
        s, d = self._hidden(ids, mask, pack=pack)
        return self.device.logits(s.xf).reshape(d.B, d.T, -1)

    __call__ = forward

    @staticmethod
    def count_tokens(labels, segment_ids=None) -> int:
        """Targets the loss counts: labels after the shift that are not -100 (and, in packed
        rows, that do not predict the next document's first token)."""
        lab = np.asarray(labels)
        if lab.ndim == 1:
            lab = lab[None]
        counted = lab[:, 1:] != IGNORE_INDEX
        if segment_ids is not None:
            seg = np.asarray(segment_ids).reshape(lab.shape)
            counted &= seg[:, 1:] == seg[:, :-1]
        return int(np.count_nonzero(counted))

    @_on_device
    def loss(self, input_ids, labels, attention_mask=None, reduction: str = "mean", position_ids=None,
             segment_ids=None) -> float:
        """Forward only (no activations kept, chunked logits): the eval loss."""
        check_reduction(reduction)
        ids, mask, lab = check_inputs(self.config, input_ids, attention_mask, labels)
        pack, lab = self._packing(ids, lab, position_ids, segment_ids)
        s, _ = self._hidden(ids, mask, lab, pack)
        dev = self.device
        total = dev.loss_value(dev.lm_head_loss(s.xf, None, None))
        return finish_loss(total, self.count_tokens(lab), reduction)

    # ------------------------------------------------------------------ training
    def zero_grads(self) -> dict:
        return {name: np.zeros_like(a) for name, a in self.parameters().items()}

    def _forward_backward(self, ids, mask, lab, scale: float, clear: bool = True, pack=None):
        """Forward + backward of one batch; the gradient of scale · (summed loss) is written to
        (clear) or added to the device's gradient buffer.  Returns the pending loss.  pack:
        _packing's (positions, segments) or None."""
        pos, segs = pack or (None, None)
        _, acts, s = self._begin(ids, mask, lab, keep=True, training=True, positions=pos, segments=segs)
        self.step += 1     # after: the dropout masks are those of the step before
        dev = self.device
        if clear:
            dev.clear_grads()
        dev.embed(s.x)
        program.forward_layers(dev, acts, s, keep=True)
        pending = dev.lm_head_loss(s.xf, scale, s.dh)
        program.backward_layers(dev, acts, s)
        return pending

    @_on_device
    def loss_and_grads(self, input_ids, labels, attention_mask=None, reduction: str = "mean", position_ids=None,
                       segment_ids=None):
        """(loss, {PEFT name: float32 grad}) of the mean (or sum) cross-entropy over counted
        targets; grads of every trainable array (LoRA A/B, and the LM head when trained).
        position_ids / segment_ids: packed rows, as forward()."""
        check_reduction(reduction)
        ids, mask, lab = check_inputs(self.config, input_ids, attention_mask, labels)
        pack, lab = self._packing(ids, lab, position_ids, segment_ids)
        count = self.count_tokens(lab)
        if count == 0:
            self.step += 1
            return finish_loss(0.0, 0, reduction), self.zero_grads()
        pending = self._forward_backward(ids, mask, lab, 1.0 if reduction == "sum" else 1.0 / count, pack=pack)
        total = self.device.loss_value(pending)
        return finish_loss(total, count, reduction), self._grads()

    def _grads(self) -> dict:
        """{PEFT name: gradient} of the last backward (a fresh host array)."""
        return self.params.named(self.params.grads)

    # ------------------------------------------------------------------ parameters
    def parameters(self) -> dict:
        """{PEFT name: live float32 array} in a stable order."""
        return self.params.named()

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
        from ..model.lora import save_peft_adapter
        save_peft_adapter(directory, self.lora, base_model=self._base_name(), lm_head=self.lm_head)

    def load_adapter(self, directory) -> None:
        """Replace the adapters (r, alpha, targets from the file's adapter_config.json)."""
        from ..model.lora import load_peft_adapter
        lora, lm_head = load_peft_adapter(directory, self._layer_shapes(),
                                          lm_head_shape=tuple(self.state.lm_head_weight.shape))
        # compute_dtype is how this model runs its base products, not part of a PEFT adapter:
        # the file cannot carry it, so the model's own setting stays
        lora.config = dataclasses.replace(lora.config, compute_dtype=self.lora_config.compute_dtype)
        loaded = lora.named_parameters()
        if lm_head is not None:
            loaded[LM_HEAD_NAME] = lm_head
        bad = first_nonfinite(loaded)
        if bad is not None or not math.isfinite(lora.config.scale):
            what = f"tensor {bad}" if bad else f"lora_alpha {lora.config.alpha!r}"
            raise NonFiniteError(f"{directory}: adapter {what} is NaN or Inf; the adapter was not loaded")
        same = (set(lora.pairs) == set(self.lora.pairs)
                and all(lora.pairs[k].A.shape == p.A.shape for k, p in self.lora.pairs.items()))
        head = lm_head if lm_head is not None else (None if self.lm_head is None else self.lm_head.copy())
        if same and (lm_head is None or self.lm_head is not None):
            # copy into the live arrays: an optimizer holding them (a resumed trainer) stays valid
            for k, p in self.lora.pairs.items():
                p.A[...] = lora.pairs[k].A
                p.B[...] = lora.pairs[k].B
                p.scale = lora.pairs[k].scale
            self.lora.config = lora.config
            self.params.refresh_scales()
            if lm_head is not None:
                self.lm_head[...] = lm_head
        else:
            self.lora = lora if not same else self.lora
            if same:
                for k, p in self.lora.pairs.items():
                    p.A[...] = lora.pairs[k].A
                    p.B[...] = lora.pairs[k].B
                    p.scale = lora.pairs[k].scale
                self.lora.config = lora.config
            self.params = FlatParams(self.lora, None if head is None else np.array(head, np.float32))
            self.device.params = self.params
        self.lora_config = lora.config

    def fuse(self, out=None, **options):
        """Merge the adapters into the base.  Without `out` or `gguf=`: {HF name: float32
        fused weight} of the adapted projections, from this model's own base (the NF4
        dequantization when it holds NF4).  With out=DIR and/or gguf=FILE: write the fused
        model from the checkpoint's original weights (qlora_ext.model.fuse.fuse takes the
        options: outtype, dequantize, max_shard_size)."""
        from ..model.fuse import fuse, fused_projections

        if out is None and options.get("gguf") is None:
            return fused_projections(self)
        return fuse(self, out=out, **options)

    def _base_name(self) -> str:
        return str(getattr(self.state, "name", None) or getattr(self.state, "source", None)
                   or getattr(self.state, "path", None) or "")

    # ------------------------------------------------------------------ generation
    @_on_device
    def generate(self, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed=None, stop_ids=None, progress=None, top_k: int = DEFAULT_TOP_K):
        """New tokens after a prompt (list[int]), or after each of several prompts decoded
        together (a list of lists, or an int array [B, T]), on this placement's device; see
        qlora_ext.model.generate (top_k 0: sample from every token)."""
        from ..model.generate import generate
        return generate(self, prompt_ids, max_new_tokens, temperature, top_p, seed, stop_ids, progress, top_k)

    def kv_cache(self, rows: int, slots: int):
        """An empty KV cache of `rows` sequences x `slots` positions on the device."""
        return self.device.kv_cache(rows, slots)

    @_on_device
    def decode_step(self, ids, positions, cache, last, k: int) -> tuple:
        """One generation step: ids [n, T] through the layer program with the KV cache; the k
        most likely next tokens after row r's position last[r] (k 0: all), as (values [n, k]
        or None, ids int64 [n, k]), best first."""
        _, acts, s = self._begin(ids, None, positions=positions)
        dev = self.device
        dev.embed(s.x)
        for l in range(len(self.state.layers)):
            program.layer_forward(dev, l, acts[0], s, s.x, s.x, cache=cache)
            dev.layer_done()
        return dev.next_tokens(s.x, np.asarray(last, np.int64), k)

    # ------------------------------------------------------------------ reports
    def memory_report(self) -> dict:
        rep = dict(self.state.memory_report()) if hasattr(self.state, "memory_report") else {}
        rep["lora_bytes"] = int(sum(a.nbytes for n, a in self.parameters().items() if n != LM_HEAD_NAME))
        if self.lm_head is not None:
            rep["lm_head_trained_bytes"] = int(self.lm_head.nbytes)
        if self.optimizer_bytes:
            rep["optimizer_bytes"] = int(self.optimizer_bytes)
        return rep
