"""Checks the command line makes before any work: the range of every numeric flag (and of a
resumed run's saved settings, which stand in for flags), thread counts, and that every
output can be written.  Each failure is one ValueError/OSError naming the flag or file;
the command turns it into one line and exit status 2."""
from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

from ._native import available_memory

# Upper bounds keep a typo from asking for unbounded work or memory; each is far beyond
# any real run (10^9 updates; 2^20 tokens per row; 2^16 rows; LoRA rank 2^16).
MAX_STEPS = 10**9
MAX_EPOCHS = 1e6
MAX_SEQ_LEN = 1 << 20
MAX_ROWS = 1 << 16
MAX_RANK = 1 << 16
MAX_NEW_TOKENS = 1 << 20
MAX_SEED = 2**63 - 1
MAX_TOP_K = 1 << 24      # above any vocabulary: the whole one


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def int_in(lo: int, hi: int):
    return (lambda v: _is_int(v) and lo <= v <= hi), f">= {lo:,} and <= {hi:,} (an integer)"


def real(test, text: str):
    return (lambda v: _is_real(v) and test(v)), f"a finite number {text}"


def one_of(*choices):
    return (lambda v: v in choices), "one of " + ", ".join(map(str, choices))


def of_type(kind, text: str, optional: bool = False):
    return (lambda v: isinstance(v, kind) or (optional and v is None)), text


# Every setting of `train` that a checkpoint stores (cli.TRAIN_DEFAULTS) and what it may hold.
TRAIN_SETTINGS = {
    "model": of_type(str, "a model path or name"), "data": of_type(str, "a file path", True),
    "eval_data": of_type(str, "a file path", True),
    "steps": int_in(1, MAX_STEPS), "epochs": real(lambda v: 0 < v <= MAX_EPOCHS, f"> 0 and <= {MAX_EPOCHS:g}"),
    "seq_len": int_in(1, MAX_SEQ_LEN), "batch_size": int_in(1, MAX_ROWS), "grad_accum": int_in(1, MAX_ROWS),
    "lr": real(lambda v: v >= 0, ">= 0"), "warmup": int_in(0, MAX_STEPS),
    "schedule": one_of("constant", "linear", "cosine"), "weight_decay": real(lambda v: v >= 0, ">= 0"),
    "grad_clip": real(lambda v: v >= 0, ">= 0 (0 = off)"), "lora_rank": int_in(1, MAX_RANK),
    "lora_alpha": real(lambda v: v > 0, "> 0"), "lora_dropout": real(lambda v: 0 <= v < 1, "in [0, 1)"),
    "targets": of_type(str, "comma-separated projection names"), "pack": of_type(bool, "true or false"),
    "seed": int_in(0, MAX_SEED), "device": one_of("auto", "gpu", "cpu"), "quantize": one_of("nf4", "none"),
    "gradient_checkpointing": of_type(bool, "true or false"), "eval_accuracy": int_in(0, MAX_STEPS),
    "placement": one_of("auto", "cpu", "split", "gpu"), "group_by_length": of_type(bool, "true or false"),
}
OPTIONAL = {"data", "eval_data", "steps", "epochs", "eval_accuracy", "gradient_checkpointing"}  # None: not given


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_value(label: str, value, rule) -> None:
    test, text = rule
    if not test(value):
        shown = repr(value)
        raise ValueError(f"{label} must be {text}, got {shown if len(shown) <= 60 else shown[:57] + '...'}")


def check_train_settings(settings: dict, label_of) -> None:
    """The settings of TRAIN_SETTINGS that `settings` holds; label_of(key) names where the
    value came from (a flag, or a key in a checkpoint's trainer_state.json)."""
    for key, rule in TRAIN_SETTINGS.items():
        if key not in settings or (settings[key] is None and key in OPTIONAL):
            continue
        check_value(label_of(key), settings[key], rule)


def check_flags(args, rules: dict) -> None:
    """{attribute of args: rule} for flags outside the saved settings; None = not given."""
    for key, rule in rules.items():
        value = getattr(args, key, None)
        if value is not None:
            check_value(flag(key), value, rule)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def bounded_threads(threads):
    """--threads: None stays None (the default); < 1 is an error; more than the CPUs this
    process may run on is brought down to that number, with a note on stderr (more threads
    than cores only adds contention, and absurd counts exhaust the OpenMP runtime)."""
    if threads is None:
        return None
    check_value("--threads", threads, int_in(1, 1 << 30))
    cpus = available_cpus()
    if threads > cpus:
        print(f"qlora-ext: --threads {threads} is more than the {cpus} CPUs available; using {cpus}",
              file=sys.stderr, flush=True)
        return cpus
    return threads


def check_lora_fits(model, rank: int, targets: str | None) -> None:
    """ValueError, before anything is allocated, when the adapters of `rank` on `targets`
    (comma-separated; None = LoraConfig's default)
    with their gradients and two AdamW moments (four float32 copies) exceed the memory
    available.  A model whose config cannot be read is left to the loader to report."""
    from .model.config import ModelConfig
    from .model.gguf import GGUFFile
    from .model.loading import config_from_gguf, resolve_model_path
    from .model.lora import LoraConfig

    projections = LoraConfig(r=rank) if targets is None else \
        LoraConfig(r=rank, target_modules=tuple(t.strip() for t in targets.split(",") if t.strip()))
    try:
        path = resolve_model_path(model)
        if os.path.isdir(path):
            config = ModelConfig.from_file(path)
        else:
            with GGUFFile(path) as g:
                config = config_from_gguf(g)
        shapes = config.projection_shapes()
        per_rank = int(config.num_hidden_layers) * sum(sum(shapes[p]) for p in projections.target_modules)
    except (OSError, ValueError, TypeError, KeyError):
        return
    need, free = 4 * 4 * rank * per_rank, available_memory()
    if need > free:
        raise ValueError(f"--lora-rank {rank}: the adapters, their gradients and AdamW moments need "
                         f"{need / 2**30:,.1f} GiB, more than the {free / 2**30:,.1f} GiB of memory available")


def check_output_file(label: str, path) -> None:
    """OSError now, not after the work, if `path` cannot be written: it is opened for
    appending (which creates it) and removed again if it did not exist."""
    p = Path(path)
    if p.is_dir():
        raise OSError(f"{label} {path}: is a directory, expected a file path")
    existed = p.exists()
    try:
        with open(p, "a"):
            pass
    except OSError as e:
        raise OSError(f"{label} {path}: cannot write there ({e.strerror or e})") from None
    if not existed:
        p.unlink()


def check_plot_output(path) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise OSError("--plot needs matplotlib: pip install 'qlora_ext[plot]'")
    check_output_file("--plot", path)


def check_same_adapter_shape(given: dict, saved: dict, ckpt) -> None:
    """A resumed run keeps the shape of its adapters and optimizer moments."""
    def norm(key, v):
        return sorted(t.strip() for t in v.split(",") if t.strip()) if key == "targets" else v

    for key in ("lora_rank", "targets"):
        if key in given and key in saved and norm(key, given[key]) != norm(key, saved[key]):
            raise ValueError(f"{flag(key)} {given[key]} differs from {saved[key]} in {ckpt}: a resumed run keeps "
                             f"its adapters' shape; leave {flag(key)} out, or start a new run in another --out")


def prepare_train_outputs(args, comm, out, ckpt):
    """Before the model loads: every output writable, --out locked for this run and free of
    another run's files.  Returns the lock (None on ranks that write nothing)."""
    from .train.outdir import RunLock, check_fresh, check_one_run

    if comm.rank:
        return None
    if args.trace:
        check_output_file("--trace", args.trace)
    if args.plot:
        check_plot_output(args.plot)
    lock = RunLock(out).acquire()
    try:
        if ckpt is None or out.resolve() != Path(args.resume).resolve():
            check_fresh(out, args.overwrite)
        if ckpt is not None:
            check_one_run(args.resume, ckpt)
    except BaseException:
        lock.release()
        raise
    return lock


def error_line(e: Exception) -> str:
    """The message of `e` on one line; errors that are not about the input say what they are."""
    text = " ".join(str(e).split())
    from .gpu.runtime import GpuError   # an OSError: labelled before the generic case

    if isinstance(e, GpuError):
        return f"GPU: {text}"
    if isinstance(e, (ValueError, OSError)):
        return text or type(e).__name__
    if isinstance(e, MemoryError):
        return "out of memory" + (f" ({text})" if text else "") + "; try smaller --batch-size/--seq-len"
    if isinstance(e, RecursionError):
        return f"input nested too deeply ({text})"
    return f"{type(e).__name__}: {text} (an internal error; QLORA_EXT_DEBUG=1 shows where)"
