"""Checkpoints that survive a crash at any instant.

Layout of `<out>/checkpoint-<step>/`:
  adapter_config.json, adapter_model.safetensors   (PEFT adapter, via model.save_adapter)
  optimizer.safetensors                              (AdamW moments + step, float32/int64)
  trainer_state.json                                 (step, data position, RNG, config, last loss)

Atomicity: everything is written into `<out>/.tmp-checkpoint-<step>-<pid>/`, each file and
the directory are fsync'ed, then the directory is renamed into place and `<out>` fsync'ed.
A `checkpoint-<step>` directory therefore either is complete or does not exist; a crash
leaves at most a `.tmp-*` directory, removed by the next save."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
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
    except ValueError as e:
        raise OSError(f"{path}: safetensors header is not valid JSON ({e})") from None
    body = memoryview(data)[8 + n:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dt = _DTYPES.get(meta.get("dtype"))
        if dt is None:
            raise OSError(f"{path}: tensor {name!r} has unsupported dtype {meta.get('dtype')!r}")
        start, end = meta["data_offsets"]
        shape = tuple(meta["shape"])
        if end > len(body) or end - start != dt.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise OSError(f"{path}: tensor {name!r} data_offsets {start}..{end} do not match shape {shape}")
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
    m = _CKPT_RE.match(Path(path).name)
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
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return state.get("format") == _FORMAT and state.get("step") == step


def list_checkpoints(out_dir) -> list:
    """Complete checkpoints under out_dir, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if checkpoint_step(p) is not None and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(out_dir) -> Path | None:
    """The newest complete checkpoint under out_dir, or None."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def save_checkpoint(out_dir, model, state: dict, optimizer_state: dict, keep_last: int | None = None) -> Path:
    """Write `<out_dir>/checkpoint-<state['step']>` atomically and return its path.
    `state` is JSON-able (the trainer's state plus data position etc.).  keep_last=K deletes
    all but the newest K complete checkpoints afterwards (None or 0 keeps all)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    step = int(state["step"])
    for stale in out_dir.glob(".tmp-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    tmp.mkdir()
    model.save_adapter(tmp)
    write_safetensors(tmp / OPTIMIZER_FILE, optimizer_state)
    with open(tmp / STATE_FILE, "w") as f:
        json.dump({"format": _FORMAT, **state}, f, indent=1, allow_nan=True)
    _fsync_tree(tmp)
    if final.exists():
        # Re-saving a step (a resumed run interrupted at the step it resumed from): move the
        # old one aside first, so a crash between the renames still leaves older checkpoints.
        old = out_dir / f".tmp-checkpoint-old-{step}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(out_dir)
    if keep_last:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path) -> tuple:
    """(state dict, optimizer arrays) of a complete checkpoint; the adapter is loaded
    separately with model.load_adapter(path)."""
    path = Path(path)
    if not is_complete(path):
        raise OSError(f"{path} is not a complete qlora_ext checkpoint "
                      f"(expected checkpoint-<step>/ with {STATE_FILE}, {OPTIMIZER_FILE} and an adapter)")
    state = json.loads((path / STATE_FILE).read_text())
    state.pop("format", None)
    return state, read_safetensors(path / OPTIMIZER_FILE)


def save_adapter_atomic(model, out_dir) -> None:
    """model.save_adapter(out_dir) via a temp dir, so readers never see a half-written adapter."""
    out_dir = Path(out_dir)
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
