"""A training run owns its output directory.

- A lock: `<out>/.lock`, held (flock on POSIX, msvcrt.locking on Windows) for the whole
  run.  The operating system drops it when the process ends, however it ends, so a lock
  left by a dead process never blocks the next run; the file only records the holder's pid
  for the message.
- One run per directory: a new run refuses a directory that holds another run's files
  (checkpoints, metrics, adapter, eval results) unless told to delete them first, and each
  run's checkpoints carry its run id, so a resume never continues a run mixed with another."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from .checkpoint import list_checkpoints, read_state

LOCK_FILE = ".lock"
RUN_FILES = ("metrics.jsonl", "adapter_config.json", "adapter_model.safetensors", "eval.json")
RUN_PATTERNS = ("checkpoint-*", ".replaced-checkpoint-*", ".tmp-checkpoint-*", ".tmp-adapter-*")


def new_run_id() -> str:
    return uuid.uuid4().hex


class RunLock:
    """Exclusive ownership of `out` while the object is held (a context manager)."""

    def __init__(self, out):
        self.out = Path(out)
        self._fd = None

    def acquire(self) -> "RunLock":
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OSError(f"--out {self.out}: cannot write there ({e.strerror or e})") from None
        try:
            _lock(fd)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise OSError(f"--out {self.out} is in use by another qlora-ext run (pid {holder}); "
                          f"wait for it to end or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _lock(fd: int) -> None:
    """Non-blocking exclusive lock on fd; OSError when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def previous_run_files(out) -> list:
    """Names of files in `out` that a training run writes (sorted), empty if none."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = {p.name for p in out.iterdir() if p.name in RUN_FILES}
    for pattern in RUN_PATTERNS:
        found.update(p.name for p in out.glob(pattern))
    return sorted(found)


def check_fresh(out, overwrite: bool) -> None:
    """Before a new run into `out`: delete an earlier run's files if `overwrite`, else
    refuse (continuing the old run is --resume's job, and mixing two runs' checkpoints makes
    the newest one, and pruning, pick the wrong run)."""
    found = previous_run_files(out)
    if not found:
        return
    if not overwrite:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise OSError(f"--out {out} holds files of an earlier run ({shown}); continue it with --resume {out}, "
                      f"choose another --out, or pass --overwrite to delete them first")
    for name in found:
        p = Path(out) / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def check_one_run(directory, checkpoint) -> None:
    """ValueError unless every complete checkpoint in `directory` has the run id of
    `checkpoint` (the one about to be resumed); checkpoints written before run ids existed
    have none and pass."""
    mine = read_state(checkpoint).get("run", {}).get("run_id")
    if mine is None:
        return
    for other in list_checkpoints(directory):
        theirs = read_state(other).get("run", {}).get("run_id")
        if theirs is not None and theirs != mine:
            raise ValueError(f"{directory} holds checkpoints of two runs ({Path(checkpoint).name} and "
                             f"{other.name}); resume needs a directory with one run's checkpoints")
