"""LoadOptions: how load_model builds a model (the placement, where it may look for a GPU,
activation checkpointing, the base's format), checked once when made.  A leaf module: the
API, the placement choice and the command line all read the same dataclass.

Placements (`placement=`):
    "auto"   the GPU placement when a GPU's free memory holds it, else split where a GPU
             serves, else the CPU; the model says which it took and why
    "cpu"    every op on the CPU
    "split"  projections with LoRA, FFN and LM head on the GPU; norms, RoPE, attention on the CPU
    "gpu"    the whole step on the GPU
A placement asked for by name that cannot run here is an error naming why.

`device=` says which GPU adapters count: "auto" hardware GPUs only, "gpu" software adapters
too (lavapipe: the tests run the shaders so), "cpu" none."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

PLACEMENTS = ("auto", "cpu", "split", "gpu")
DEVICES = ("auto", "gpu", "cpu")
# Where a placement keeps the NF4 base.
WEIGHTS_ON_GPU, WEIGHTS_STREAMED, WEIGHTS_ON_CPU = "on GPU", "streamed", "in CPU RAM"
# The placement names before "gpu" named one thing; `mode=` / `--mode` still take them.
DEPRECATED_MODES = {"auto": "auto", "split": "split", "resident": "gpu"}


def placement_of_mode(mode: str, device: str = "auto") -> str:
    """The placement a deprecated `mode` value names ("resident" -> "gpu"; "split" on
    device="cpu" was the CPU placement)."""
    if mode not in DEPRECATED_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, DEPRECATED_MODES))}, got {mode!r}")
    if mode == "split" and device == "cpu":
        return "cpu"
    return DEPRECATED_MODES[mode]


# The split placement's lanes (engine/lanes.py) when LoadOptions.lanes is None: one pass.  Two
# lanes keep the CPU and the GPU busy at once (one lane's attention beside the other's
# projections), but on the H200 host (16 cores) the Qwen3-0.6B 4 x 1024 step ran at 907
# tokens/s with two against 992 with one: the lanes' CPU work grew (2.76 against 2.29 s a step)
# and their readbacks contended (2.31 against 1.27 s) by more than the 0.93 s of overlap won
# (BENCHMARKS.md).  lanes=2 stays available where the CPU is a larger share.
DEFAULT_LANES = 1


def check_lanes(lanes) -> int:
    """lanes as an int >= 1, else ValueError."""
    if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1:
        raise ValueError(f"lanes must be an int >= 1 (micro-batches of a split step in flight at once), "
                         f"got {lanes!r}")
    return int(lanes)


def recompute_count(gradient_checkpointing, layers: int) -> int:
    """Layers that recompute their activations in the backward: True every layer, False none,
    an int that many (the first ones)."""
    gc = gradient_checkpointing
    if isinstance(gc, bool):
        return layers if gc else 0
    if not isinstance(gc, int) or not 0 <= gc <= layers:
        raise ValueError(f"gradient_checkpointing must be True, False or a layer count in [0, {layers}], got {gc!r}")
    return int(gc)


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class LoadOptions:
    placement: str = _help("auto, cpu, split or gpu (see the module docstring)", "auto")
    device: str = _help("which GPU adapters count: auto (hardware), gpu (software too), cpu (none)", "auto")
    gradient_checkpointing: bool | int | None = _help(
        "recompute activations in the backward: True every layer, False none, an int that many "
        "layers, None (default) the fewest layers that make the step fit the GPU's free memory", None)
    batch_shape: tuple | None = _help("(rows, tokens) the automatic choices plan for; None: (4, 1024)", None)
    train_lm_head: bool = _help("train the LM head too (PEFT's modules_to_save)", False)
    quantize: str | None = _help("the projections' format: 'nf4', or None for float32", "nf4")
    double_quant: bool = _help("quantize the NF4 absmax too (bitsandbytes' compress_statistics)", False)
    compute_dtype: str | None = _help("fp32 or bf16 CPU base products; None keeps the LoraConfig's", None)
    threads: int | None = _help("CPU threads for the kernels; None: all cores", None)
    seed: int = _help("seed of the LoRA A init and the dropout masks", 0)
    lanes: int | None = _help(
        "split placement: micro-batches of a training step in flight at once, so that the CPU's "
        f"attention of one runs beside the GPU's work of another (same results for any count); "
        f"None: {DEFAULT_LANES}", None)
    revision: str | None = _help("hub revision when the path is a hub id", None)
    progress: object = _help("a progress bar for loading: None (auto), False (off) or True", None)

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(map(repr, PLACEMENTS))}, got {self.placement!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(map(repr, DEVICES))}, got {self.device!r}")
        if self.placement in ("split", "gpu") and self.device == "cpu":
            raise ValueError(f"placement={self.placement!r} runs on a GPU: it needs device='auto' or 'gpu', "
                             "not device='cpu'")
        if self.lanes is not None:
            check_lanes(self.lanes)
        gc = self.gradient_checkpointing
        if gc is not None and not isinstance(gc, bool) and (not isinstance(gc, int) or gc < 0):
            raise ValueError(f"gradient_checkpointing must be True, False, a layer count >= 0 or None "
                             f"(automatic), got {gc!r}")
        shape = self.batch_shape
        if shape is not None:
            if len(shape) != 2 or min(int(v) for v in shape) < 1:
                raise ValueError(f"batch_shape must be (rows, tokens) with both >= 1, got {shape!r}")
            object.__setattr__(self, "batch_shape", (int(shape[0]), int(shape[1])))

    def replace(self, **changes) -> "LoadOptions":
        """A copy with `changes`; `mode=` (deprecated) becomes its placement, with a warning."""
        if "mode" in changes:
            mode = changes.pop("mode")
            device = changes.get("device", self.device)
            new = placement_of_mode(mode, device)
            warnings.warn(f"mode={mode!r} is deprecated: use placement={new!r}", DeprecationWarning, stacklevel=3)
            changes.setdefault("placement", new)
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown load option {unknown[0]!r}; LoadOptions has {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)
