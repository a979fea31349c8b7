"""Where a model's step runs: the placement choice behind load_model(mode=...).

    mode="split"     the layer split between CPU and the FFN backend (device= picks wgpu or
                     the CPU backend); the placement is then "split" or "cpu"
    mode="resident"  the whole step on the GPU (qlora_ext.gpu.resident); an error where it
                     cannot run (no GPU adapter, wgpu too old)
    mode="auto"      resident when a GPU is used and its free memory holds the resident
                     placement's estimate for the planned batch shape with a margin; else split

The choice and its reason are kept on the model (`model.placement`, `model.placement_reason`);
`qlora-ext train` prints them.  The free memory comes from QLORA_EXT_GPU_MEMORY_GIB when set,
else from nvidia-smi for NVIDIA adapters; wgpu itself does not report device memory, so on
other GPUs auto stays split unless the variable says how much there is."""
from __future__ import annotations

import shutil
import subprocess

MODES = ("auto", "split", "resident")
# The batch shape auto plans for when the caller names none: the design's training batch.
DEFAULT_PLAN = (4, 1024)
# Kept free beside the estimate: the driver's own allocations, wgpu's staging and
# pipelines, the split-K scratch (measured on an H200: ~0.8 GiB beyond the engine's buffers).
MARGIN_BYTES = 1 << 30
MARGIN_FRACTION = 0.10


def check_mode(mode: str, device: str) -> None:
    from .device import check_device

    check_device(device)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if mode == "resident" and device == "cpu":
        raise ValueError("mode='resident' runs the whole step on a GPU: it needs device='auto' or 'gpu', "
                         "not device='cpu'")


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


def _fits(need: int, free: int) -> bool:
    return need * (1 + MARGIN_FRACTION) + MARGIN_BYTES <= free


def choose(mode: str, device: str, state, lora_config, batch_shape=None, gradient_checkpointing: bool = False,
           train_lm_head: bool = False) -> tuple:
    """(placement, adapter, reason, weights) for mode "auto"/"resident" (mode "split" never
    calls this): ("resident", adapter, reason, "resident"|"stream") or ("split", None, reason,
    None).  weights="stream" keeps the NF4 base on the host and uploads each layer's
    projections per pass: taken when the whole placement does not fit but that does.
    Raises where mode="resident" cannot be honoured."""
    from .gpu.runtime import adapter_summary, pick_adapter, shared_context, unavailable_reason

    adapter = pick_adapter(allow_software=(device == "gpu"))
    if adapter is None:
        if mode == "resident":
            raise OSError("mode='resident': no GPU adapter" + (" (software adapters such as lavapipe are "
                          "used only with device='gpu')" if device == "auto" else ""))
        return "split", None, "no GPU adapter", None
    from .engine.gpu_memory import estimate_bytes

    blocker = unavailable_reason()   # wgpu too old for the resident kernels
    if blocker:
        if mode == "resident":
            raise OSError(f"mode='resident' cannot run here: {blocker} (use mode='split')")
        return "split", None, blocker, None

    name = adapter_summary(adapter)["name"]
    B, T = batch_shape or DEFAULT_PLAN
    free, source = gpu_free_bytes(adapter)
    ctx = shared_context(adapter)
    need = {w: estimate_bytes(ctx, state, lora_config, B, T, gradient_checkpointing, train_lm_head, weights=w)
            for w in ("resident", "stream")}
    weights = None
    if free is not None:
        weights = "resident" if _fits(need["resident"], free) else "stream" if _fits(need["stream"], free) else None
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    have = f"{name} has {gib(free)} free ({source})" if free is not None else f"free memory of {name} {source}"
    streamed = "; the NF4 base stays on the host and goes up per layer" if weights == "stream" else ""
    if mode == "resident":
        return "resident", adapter, f"asked for; {have}{streamed}", weights or "resident"
    if free is None:
        return "split", None, (f"{have}; the resident placement needs about {gib(need['resident'])} for "
                               f"{B} x {T} tokens (set QLORA_EXT_GPU_MEMORY_GIB to let auto choose it)"), None
    if weights is None:
        return "split", None, (f"{have}; the resident placement needs about {gib(need['stream'])} + margin "
                               f"for {B} x {T} tokens even with the NF4 base streamed"), None
    return "resident", adapter, (f"{have}; the resident placement needs about {gib(need[weights])} for "
                                 f"{B} x {T} tokens{streamed}"), weights

