"""What a process launcher (mpiexec, srun) tells this process about its place on the host: the
local rank, read from the launcher's environment or, once MPI has started, from the comm
(train/distributed.py records it here).  A leaf module: the GPU runtime picks its adapter by
the local rank without importing the training layer."""
from __future__ import annotations

import os

LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID")
_known: int | None = None   # the comm's local rank, once a comm exists


def first_int(names, environ=None) -> int | None:
    """The first of the environment variables `names` that holds a whole number, as an int."""
    env = os.environ if environ is None else environ
    for var in names:
        v = env.get(var, "").strip()
        if v.isdigit():
            return int(v)
    return None


def local_rank_from_env(environ=None) -> int | None:
    return first_int(LOCAL_RANK_VARS, environ)


def set_local_rank(rank: int | None) -> None:
    """Record the comm's local rank (None: forget it)."""
    global _known
    _known = None if rank is None else int(rank)


def local_rank() -> int:
    """This process's rank among the ranks on its host, without starting MPI: the comm's if
    one was built, else the launcher's environment, else 0.  Picks a GPU adapter."""
    if _known is not None:
        return _known
    r = local_rank_from_env()
    return r if r is not None else 0
