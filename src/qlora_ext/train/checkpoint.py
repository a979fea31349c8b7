"""Checkpoints that survive a crash at any instant.

Layout of `<out>/checkpoint-<step>/`:
  adapter_config.json, adapter_model.safetensors   (PEFT adapter, via model.save_adapter)
  optimizer.safetensors                              (AdamW moments + step, float32/int64)
  trainer_state.json                                 (step, data position, RNG, config, last loss)

Atomicity: everything is written into `<out>/.tmp-checkpoint-<step>-<pid>/`, each file and
the directory are fsync'ed, then the directory is renamed into place and `<out>` fsync'ed.
A `checkpoint-<step>` directory therefore either is complete or does not exist; a crash
leaves at most a `.tmp-*` directory, removed by the next save.  Re-saving an existing step
first renames the old directory to `.replaced-checkpoint-<step>`, which counts as that
step's checkpoint until the new one is in place (a crash between the two renames loses
nothing; the next save puts it back or deletes it).  Pruned checkpoints are renamed to a
`.tmp-*` name before they are deleted, so a half-deleted one is never taken for a checkpoint.

Nothing non-finite is saved: a checkpoint or adapter whose parameters or optimizer moments
hold a NaN or Inf is refused (NonFiniteError) before anything is written, so the last good
one stays the newest."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ..finite import NonFiniteError, first_nonfinite, json_safe

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_REPLACED_RE = re.compile(r"^\.replaced-checkpoint-(\d+)$")
_FORMAT = "qlora_ext-checkpoint-1"

# safetensors dtype names <-> numpy (only what optimizer state needs).
_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4")}
_NAMES = {v: k for k, v in _DTYPES.items()}


def write_safetensors(path, tensors: dict) -> None:
    """Write {name: array} in the safetensors format (8-byte little-endian header length,
    JSON header with dtype/shape/data_offsets, then the raw little-endian bytes), fsync'ed."""
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        a = np.asarray(a)
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dt not in _NAMES:
            raise ValueError(f"write_safetensors: tensor {name!r} has unsupported dtype {a.dtype}")
        data = np.ascontiguousarray(a, dtype=dt).tobytes()
        header[name] = {"dtype": _NAMES[dt], "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for b in blobs:
            f.write(b)
        f.flush()
        os.fsync(f.fileno())


def read_safetensors(path) -> dict:
    """Read a file written by write_safetensors (or any safetensors file with F32/F64/I64/I32)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise OSError(f"{path}: truncated safetensors file ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if 8 + n > len(data):
        raise OSError(f"{path}: safetensors header length {n} exceeds the file size {len(data)}")
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, RecursionError) as e:
        raise OSError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise OSError(f"{path}: safetensors header is not a JSON object")
    body = memoryview(data)[8 + n:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dt = _DTYPES.get(meta.get("dtype")) if isinstance(meta, dict) else None
        if dt is None:
            raise OSError(f"{path}: tensor {name!r} has no supported dtype (F32, F64, I64, I32)")
        offsets, shape = meta.get("data_offsets"), meta.get("shape")
        if (not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)):
            raise OSError(f"{path}: tensor {name!r} needs a shape of ints >= 0 and two int data_offsets")
        start, end = offsets
        if not 0 <= start <= end <= len(body) or end - start != dt.itemsize * math.prod(shape):
            raise OSError(f"{path}: tensor {name!r} data_offsets {start}..{end} do not match shape {tuple(shape)}")
        out[name] = np.frombuffer(body[start:end], dtype=dt).reshape(shape).copy()
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def checkpoint_step(path) -> int | None:
    """N of `checkpoint-N` (or of `.replaced-checkpoint-N`, a step's old copy during a re-save)."""
    name = Path(path).name
    m = _CKPT_RE.match(name) or _REPLACED_RE.match(name)
    return int(m.group(1)) if m else None


def is_complete(path) -> bool:
    """A checkpoint directory with every file, whose state names its own step."""
    path = Path(path)
    step = checkpoint_step(path)
    if step is None or not path.is_dir():
        return False
    if not (path / OPTIMIZER_FILE).is_file() or not (path / "adapter_config.json").is_file():
        return False
    if not any(path.glob("adapter_model*")):
        return False
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(state, dict) and state.get("format") == _FORMAT and state.get("step") == step


def list_checkpoints(out_dir) -> list:
    """Complete checkpoints under out_dir, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = {}
    for p in sorted(out_dir.iterdir(), key=lambda p: not _CKPT_RE.match(p.name)):  # checkpoint-N first
        step = checkpoint_step(p)
        if step is not None and step not in found and is_complete(p):
            found[step] = p
    return [found[s] for s in sorted(found)]


def latest_checkpoint(out_dir) -> Path | None:
    """The newest complete checkpoint under out_dir, or None."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def _refuse_nonfinite(what: Path, model, optimizer_state: dict | None = None) -> None:
    bad = first_nonfinite(model.parameters())
    kind = "parameter"
    if bad is None and optimizer_state is not None:
        bad, kind = first_nonfinite(optimizer_state), "optimizer state"
    if bad is not None:
        raise NonFiniteError(f"{what}: not saved: {kind} {bad} holds NaN or Inf values "
                             f"(the previous checkpoint and adapter are left as they were)")


def _remove(path: Path, out_dir: Path) -> None:
    """Rename to a .tmp-* name, then delete: a crash mid-way leaves debris the next save
    removes, never a half-deleted directory under a checkpoint's name."""
    doomed = out_dir / f".tmp-checkpoint-removed-{path.name}-{os.getpid()}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _recover_replaced(out_dir: Path) -> None:
    """Finish a re-save that a crash interrupted: the old copy goes back under its name if
    the new one never arrived, else it is deleted."""
    for old in sorted(out_dir.glob(".replaced-checkpoint-*")):
        step = checkpoint_step(old)
        if step is None:
            continue
        final = out_dir / f"checkpoint-{step}"
        if is_complete(final) or not is_complete(old):
            _remove(old, out_dir)
            continue
        if final.exists():
            _remove(final, out_dir)
        os.rename(old, final)
    _fsync_dir(out_dir)


def save_checkpoint(out_dir, model, state: dict, optimizer_state: dict, keep_last: int | None = None) -> Path:
    """Write `<out_dir>/checkpoint-<state['step']>` atomically and return its path.
    `state` is JSON-able (the trainer's state plus data position etc.; non-finite floats are
    written as null).  keep_last=K deletes all but the newest K complete checkpoints
    afterwards (None or 0 keeps all)."""
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 0):
        raise ValueError(f"keep_last must be an int >= 0 (0 keeps all), got {keep_last!r}")
    out_dir = Path(out_dir)
    step = int(state["step"])
    final = out_dir / f"checkpoint-{step}"
    _refuse_nonfinite(final, model, optimizer_state)
    out_dir.mkdir(parents=True, exist_ok=True)
    _recover_replaced(out_dir)
    for stale in out_dir.glob(".tmp-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    tmp.mkdir()
    model.save_adapter(tmp)
    write_safetensors(tmp / OPTIMIZER_FILE, optimizer_state)
    with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
        json.dump({"format": _FORMAT, **json_safe(state)}, f, indent=1, allow_nan=False)
    _fsync_tree(tmp)
    if final.exists():
        # Re-saving a step (a resumed run stopped at the step it resumed from): the old copy
        # stays a valid checkpoint of this step, under another name, until the new one is in.
        old = out_dir / f".replaced-checkpoint-{step}"
        os.rename(final, old)
        _fsync_dir(out_dir)
        os.rename(tmp, final)
        _fsync_dir(out_dir)
        _remove(old, out_dir)
    else:
        os.rename(tmp, final)
    _fsync_dir(out_dir)
    if keep_last:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            _remove(old, out_dir)
    return final


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_count(v) -> bool:
    """An int >= 0 that JSON readers everywhere hold exactly (a step, a position)."""
    return _is_int(v) and 0 <= v <= 2**53


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def check_state(state, where: str) -> dict:
    """The trainer_state.json contract; ValueError naming `where` and the key otherwise.
    The run's settings ("run") are checked by whoever uses them (the command line checks
    them as it checks its flags)."""
    def bad(key, what, value):
        raise ValueError(f"{where}: {key} must be {what}, got {_short(value)}")

    if not isinstance(state, dict):
        bad("the content", "a JSON object", state)
    if not _is_count(state.get("step")):
        bad("step", "an int >= 0 (at most 2^53)", state.get("step"))
    data = state.get("data")
    if not isinstance(data, dict):
        bad("data", "an object with the data position", data)
    for key in ("epoch", "row"):
        if not _is_count(data.get(key)):
            bad(f"data.{key}", "an int >= 0 (at most 2^53)", data.get(key))
    if "seed" in data and not _is_int(data["seed"]):
        bad("data.seed", "an int", data["seed"])
    rng = state.get("rng", {})
    if not isinstance(rng, dict):
        bad("rng", "an object", rng)
    step = rng.get("model_step")
    if step is not None and not _is_count(step):
        bad("rng.model_step", "null or an int >= 0 (at most 2^53)", step)
    for key in ("elapsed", "last_loss"):
        v = state.get(key)
        if v is not None and not _is_number(v):
            bad(key, "a finite number or null", v)
    if state.get("elapsed") is not None and state["elapsed"] < 0:
        bad("elapsed", "a number >= 0", state["elapsed"])
    for key in ("run", "config"):
        if not isinstance(state.get(key, {}), dict):
            bad(key, "an object", state.get(key))
    return state


def read_state(path) -> dict:
    """The checked trainer state of a complete checkpoint (without its arrays)."""
    path = Path(path)
    if not is_complete(path):
        raise OSError(f"{path} is not a complete qlora_ext checkpoint "
                      f"(expected checkpoint-<step>/ with {STATE_FILE}, {OPTIMIZER_FILE} and an adapter)")
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))  # is_complete parsed it
    state.pop("format", None)
    return check_state(state, str(path / STATE_FILE))


def load_checkpoint(path) -> tuple:
    """(state dict, optimizer arrays) of a complete checkpoint; the adapter is loaded
    separately with model.load_adapter(path).  A state that breaks the contract is a
    ValueError naming the file and key; non-finite optimizer moments are refused."""
    path = Path(path)
    state = read_state(path)
    opt = read_safetensors(path / OPTIMIZER_FILE)
    bad = first_nonfinite(opt)
    if bad is not None:
        raise NonFiniteError(f"{path / OPTIMIZER_FILE}: {bad} holds NaN or Inf values")
    return state, opt


def save_adapter_atomic(model, out_dir) -> None:
    """model.save_adapter(out_dir) via a temp dir, so readers never see a half-written adapter."""
    out_dir = Path(out_dir)
    _refuse_nonfinite(out_dir / "adapter_model.safetensors", model)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".tmp-adapter-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_adapter(tmp)
    _fsync_tree(tmp)
    for p in sorted(tmp.iterdir()):
        os.replace(p, out_dir / p.name)
    tmp.rmdir()
    _fsync_dir(out_dir)
