"""Where a model's step runs: `choose_placement` turns LoadOptions (qlora_ext.options) into a
Placement -- the placement, where the NF4 base lives, how many layers recompute their
activations, and why.

The GPU placement is taken (placement="auto") when the adapter's free memory holds its
estimate for the planned batch shape with a margin.  The estimate is the GPU device's own
allocation run against a counting context (engine/gpu_memory.py), so the choice and the
allocation read one buffer plan.  In order of preference: the base on the GPU with every
layer's activations kept; the base on the GPU with the fewest layers recomputing their
activations that make it fit; the base streamed per layer, again with the fewest recomputing
layers; else the split placement.  gradient_checkpointing=True/False fixes the recompute
count at every layer / none (an int: that many layers) instead.

The free memory comes from QLORA_EXT_GPU_MEMORY_GIB when set, else from nvidia-smi for NVIDIA
adapters; wgpu itself does not report device memory, so on other GPUs "auto" stays split
unless the variable says how much there is."""
from __future__ import annotations

import shutil
import subprocess
import warnings
from dataclasses import dataclass, field

from .options import WEIGHTS_ON_CPU, WEIGHTS_ON_GPU, WEIGHTS_STREAMED, recompute_count

# The batch shape auto plans for when the caller names none: the design's training batch.
DEFAULT_PLAN = (4, 1024)
# Kept free beside the estimate: the driver's own allocations, wgpu's staging and
# pipelines, the split-K scratch (measured on an H200: ~0.8 GiB beyond the engine's buffers).
MARGIN_BYTES = 1 << 30
MARGIN_FRACTION = 0.10


@dataclass(frozen=True)
class Placement:
    name: str               # "cpu", "split" or "gpu"
    weights: str            # the NF4 base: "on GPU", "streamed" (per layer, from CPU RAM) or "in CPU RAM"
    recompute_layers: int   # layers whose activations the backward recomputes (0: all kept)
    reason: str             # why, in words (model.placement_reason)
    adapter: object = field(default=None, compare=False, repr=False)   # the wgpu adapter (GPU placements)


def gpu_free_bytes(adapter, tuning=None) -> tuple:
    """(free bytes or None, where the figure came from); tuning None: Tuning.from_env()."""
    from .gpu.runtime import Tuning

    gib = (Tuning.from_env() if tuning is None else tuning).gpu_memory_gib
    if gib is not None:
        return int(gib * 2**30), "QLORA_EXT_GPU_MEMORY_GIB"
    info = adapter.info
    name = str(info.get("device") or "")
    if "nvidia" not in f"{name} {info.get('vendor', '')}".lower() or shutil.which("nvidia-smi") is None:
        return None, "unknown (wgpu does not report device memory)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None, "unknown (nvidia-smi failed)"
    rows = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            rows.append((parts[0], int(parts[1]), int(parts[2])))
    same = [r for r in rows if r[0] == name] or rows
    if not same:
        return None, "unknown (nvidia-smi listed no GPU)"
    # Several GPUs of this name: the least free one (which one wgpu opened is not known).
    return min((total - used) * 2**20 for _, total, used in same), "nvidia-smi"


def fits(need: int, free: int) -> bool:
    return need * (1 + MARGIN_FRACTION) + MARGIN_BYTES <= free


def fewest_recompute(layers: int, fit, fixed: int | None = None) -> int | None:
    """The smallest recompute count R in 0..layers with fit(R), or None.  fixed: only that
    count is tried.  Each recomputing layer gives up its activations for its saved input but
    they share one layer's recompute buffers, so the need falls with R from R = 1 on: a
    bisection finds the smallest R that fits."""
    if fixed is not None:
        return fixed if fit(fixed) else None
    if fit(0):
        return 0
    if layers == 0 or not fit(layers):
        return None
    lo, hi = 1, layers
    while lo < hi:
        mid = (lo + hi) // 2
        if fit(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _gib(b) -> str:
    return f"{b / 2**30:.1f} GiB"


def _recompute_words(R: int, layers: int, fixed: int | None) -> str:
    if fixed is not None:
        return ("; no activation checkpointing (asked for)" if fixed == 0 else
                "; activation checkpointing on every layer (asked for)" if fixed == layers else
                f"; {fixed} of {layers} layers recompute their activations (asked for)")
    if R == 0:
        return "; every layer's activations kept"
    return f"; {R} of {layers} layers recompute their activations (the fewest that fit)"


def decide(asked: str, layers: int, free: int | None, source: str, need, fixed: int | None, gpu_name: str,
           batch_shape: tuple) -> tuple:
    """(placement name, weights, recompute count, reason) for placement "auto" or "gpu" on a
    usable GPU.  need(weights, R) -> bytes the gpu placement allocates; free None: unknown."""
    B, T = batch_shape
    have = f"{gpu_name} has {_gib(free)} free ({source})" if free is not None else f"free memory of {gpu_name} {source}"
    if free is None:
        if asked == "gpu":
            R = fixed or 0
            return "gpu", WEIGHTS_ON_GPU, R, f"asked for; {have}" + _recompute_words(R, layers, fixed)
        return "split", WEIGHTS_ON_GPU, fixed or 0, (
            f"{have}; the gpu placement needs about {_gib(need(WEIGHTS_ON_GPU, 0))} for {B} x {T} tokens "
            "(set QLORA_EXT_GPU_MEMORY_GIB to let auto choose it)")
    for weights in (WEIGHTS_ON_GPU, WEIGHTS_STREAMED):
        R = fewest_recompute(layers, lambda r: fits(need(weights, r), free), fixed)
        if R is not None:
            streamed = "; the NF4 base stays in CPU RAM and is streamed per layer" if weights == WEIGHTS_STREAMED else ""
            head = "asked for; " if asked == "gpu" else ""
            return "gpu", weights, R, (f"{head}{have}; the gpu placement needs about {_gib(need(weights, R))} "
                                       f"for {B} x {T} tokens{streamed}" + _recompute_words(R, layers, fixed))
    least = need(WEIGHTS_STREAMED, layers if fixed is None else fixed)
    if asked == "gpu":
        R = layers if fixed is None else fixed
        return "gpu", WEIGHTS_STREAMED, R, (f"asked for; {have}, less than the {_gib(least)} + margin it needs for "
                                            f"{B} x {T} tokens with the NF4 base streamed"
                                            + _recompute_words(R, layers, fixed))
    return "split", WEIGHTS_ON_GPU, fixed or 0, (f"{have}; the gpu placement needs about {_gib(least)} + margin "
                                                 f"for {B} x {T} tokens even with the NF4 base streamed")


def _adapter(options) -> tuple:
    """(a usable wgpu adapter, "") or (None, why not).  A placement named by the caller that
    cannot run raises; "auto" falls back (with a warning where the GPU fails to start)."""
    from .gpu.runtime import GpuError, pick_adapter, shared_context, unavailable_reason

    named = options.placement != "auto"
    what = f"placement={options.placement!r}"
    adapter = pick_adapter(allow_software=(options.device == "gpu"))
    if adapter is None:
        if named:
            raise GpuError(f"{what}: no GPU adapter" + (" (software adapters such as lavapipe are used only "
                           "with device='gpu')" if options.device == "auto" else
                           " (is a Vulkan/Metal/DX12 driver installed?)"))
        return None, "no GPU adapter"
    blocker = unavailable_reason()   # wgpu too old for the kernels
    if blocker:
        if named:
            raise OSError(f"{what} cannot run here: {blocker}")
        return None, blocker
    try:
        shared_context(adapter)
    except Exception as e:   # a driver that fails to create a device
        if named or options.device == "gpu":
            raise
        warnings.warn(f"device='auto': GPU unusable, using the CPU ({e})", RuntimeWarning, stacklevel=4)
        return None, f"GPU unusable ({e})"
    return adapter, ""


def choose_placement(state, lora_config, options) -> Placement:
    """The Placement of a model of `state` with adapters `lora_config` under `options`
    (a qlora_ext.options.LoadOptions)."""
    layers = len(state.layers)
    gc = options.gradient_checkpointing
    fixed = None if gc is None else recompute_count(gc, layers)
    # without a GPU memory limit to plan against, the activations are kept unless told otherwise
    told = "" if fixed is None else _recompute_words(fixed, layers, fixed)
    if options.placement == "cpu" or options.device == "cpu":
        why = "asked for" if options.placement == "cpu" else "device='cpu'"
        return Placement("cpu", WEIGHTS_ON_CPU, fixed or 0, why + told)
    adapter, why_not = _adapter(options)
    if adapter is None:
        return Placement("cpu", WEIGHTS_ON_CPU, fixed or 0, why_not + told)
    if options.placement == "split":
        return Placement("split", WEIGHTS_ON_GPU, fixed or 0, "asked for" + told, adapter)
    from .engine.gpu_memory import estimate_bytes
    from .gpu.runtime import adapter_summary, shared_context

    ctx = shared_context(adapter)
    B, T = options.batch_shape or DEFAULT_PLAN
    free, source = gpu_free_bytes(adapter)
    cache = {}

    def need(weights, R):
        if (weights, R) not in cache:
            cache[weights, R] = estimate_bytes(ctx, state, lora_config, B, T, R, options.train_lm_head, weights)
        return cache[weights, R]

    name, weights, R, reason = decide(options.placement, layers, free, source, need, fixed,
                                      adapter_summary(adapter)["name"], (B, T))
    return Placement(name, weights, R, reason, adapter)
