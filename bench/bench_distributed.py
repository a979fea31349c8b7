"""Data parallelism over MPI: all-reduce time per step, and tokens/s scaling 1 -> 2 ranks.

All-reduce: the LoRA gradients of r 16 on all 7 projections of a Qwen3-4B shape (36 layers,
hidden 2560, intermediate 9728, 32 q / 8 kv heads of 128: 504 arrays, 33,030,144 float32,
132 MB), summed over 2 ranks by MpiComm.allreduce_sum, as the Trainer calls it (separate
arrays, packed into 16 MiB buckets) and in place on one flat buffer (flat_zeros_like).
References in the same run: one unbucketed MPI Allreduce of the whole buffer, and a local
memcpy of it.  Rate: algorithm bandwidth, bytes of gradient reduced per second.

Scaling: training steps of SmolLM2-135M (NF4, LoRA r 16 on all projections, CPU backend, one
thread per rank) on global batches of 8 rows x 128 tokens, by 1 rank and by 2 ranks (each
its half of every batch); efficiency = tokens/s(2) / (2 x tokens/s(1)).  The reference in
the same run is 1 rank with 2 threads, i.e. the same cores spent without MPI.

Each job runs under `mpiexec` as this file's __main__ and prints one JSON line from rank 0.
With benchmarks disabled (the default test run) both shrink to a smoke test: 2 layers of
gradients, a tiny random model, 1 step.  `QLORA_EXT_BENCH_DIST_MODEL` picks another model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import qlora_ext

# Qwen3-4B: (out, in) of each projection; LoRA adds r * (in + out) parameters per projection.
QWEN3_4B = {"layers": 36, "q_proj": (4096, 2560), "k_proj": (1024, 2560), "v_proj": (1024, 2560),
            "o_proj": (2560, 4096), "gate_proj": (9728, 2560), "up_proj": (9728, 2560), "down_proj": (2560, 9728)}
RANK = 16
HERE = Path(__file__).resolve()
# the directory of the qlora_ext imported here (installed or in-place build)
SRC = Path(qlora_ext.__file__).resolve().parents[1]
TESTS = HERE.parent.parent / "tests"


def lora_grad_shapes(layers: int) -> list:
    """[(shape)] of the LoRA A [r, in] and B [out, r] gradients, in the model's order."""
    shapes = []
    for _ in range(layers):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            out_f, in_f = QWEN3_4B[p]
            shapes += [(RANK, in_f), (out_f, RANK)]
    return shapes


# ------------------------------------------------------------------------ jobs (rank side)
def job_allreduce(layers: int, reps: int) -> dict:
    from mpi4py import MPI

    from qlora_ext.train.distributed import flat_zeros_like, get_comm

    comm = get_comm(announce=False)
    world = MPI.COMM_WORLD
    rng = np.random.default_rng(world.rank)
    shapes = lora_grad_shapes(layers)
    separate = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    flat_views = list(flat_zeros_like({i: a for i, a in enumerate(separate)}).values())
    for v, a in zip(flat_views, separate):
        v[...] = a
    whole = flat_views[0].base if flat_views[0].base is not None else flat_views[0]
    whole = whole.reshape(-1)
    copy_dst = np.empty_like(whole)
    scalars = [1.0, 100.0]

    def timed(fn) -> float:
        times = []
        for _ in range(reps + 1):  # the first call allocates buffers: warmup
            world.Barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        # the slowest rank sets the step time
        return float(world.allreduce(float(np.median(times[1:])), op=MPI.MAX))

    res = {
        "packed": timed(lambda: comm.allreduce_sum(separate, scalars)),
        "in_place": timed(lambda: comm.allreduce_sum(flat_views, scalars)),
        "one_allreduce": timed(lambda: world.Allreduce(MPI.IN_PLACE, whole, op=MPI.SUM)),
        "memcpy": timed(lambda: np.copyto(copy_dst, whole)),
    }
    res.update(elements=int(whole.size), arrays=len(shapes), ranks=world.size,
               bucket_bytes=comm.bucket_elems * 4)
    return res


def job_train(model_path: str, rows: int, seq: int, steps: int, threads: int, device: str = "cpu") -> dict:
    from qlora_ext.api import load_model
    from qlora_ext.model.lora import LoraConfig
    from qlora_ext.train.data import make_batch
    from qlora_ext.train.distributed import get_comm
    from qlora_ext.train.trainer import TrainConfig, Trainer

    comm = get_comm(announce=False)
    model = load_model(model_path, lora=LoraConfig(r=RANK, alpha=32), quantize="nf4", device=device,
                       threads=threads, progress=False)
    trainer = Trainer(model, TrainConfig(lr=1e-4), comm=comm)
    comm.sync_trainer(trainer)
    rng = np.random.default_rng(0)
    V = model.config.vocab_size

    def global_batch():
        ids = rng.integers(0, V, size=(rows, seq))
        return make_batch([(list(r), list(r)) for r in ids], 0)

    trainer.train_step(global_batch().shard(comm.rank, comm.size).micro_batches(rows))  # warmup
    comm.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(global_batch().shard(comm.rank, comm.size).micro_batches(rows))
    dt = time.perf_counter() - t0
    comm.check_in_sync(trainer)
    return {"tokens_per_s": rows * seq * steps / dt, "step_s": dt / steps, "ranks": comm.size,
            "threads": threads, "rows": rows, "seq": seq, "steps": steps, "device": device}


# ------------------------------------------------------------------------ pytest side
def _mpiexec():
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _job(ranks: int, threads: int, *args) -> dict:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("needs mpi4py (pip install qlora_ext[mpi])")
    if not _mpiexec():
        pytest.skip("needs mpiexec (pip install qlora_ext[mpi])")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(HERE)] + [str(a) for a in args]
    if ranks > 1:
        cmd = [_mpiexec(), "-n", str(ranks)] + cmd
    else:
        env["QLORA_EXT_MPI"] = "1"  # one rank through MpiComm as well: the same code path
        cmd = [_mpiexec(), "-n", "1"] + cmd
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.benchmark(group="distributed-allreduce")
def test_allreduce_qwen3_4b_lora_r16(benchmark):
    layers, reps = (QWEN3_4B["layers"], 10) if not benchmark.disabled else (2, 2)
    res = {}

    def once():
        res.update(_job(2, 1, "allreduce", layers, reps))

    benchmark.pedantic(once, rounds=1, iterations=1)
    nbytes = res["elements"] * 4
    for k in ("packed", "in_place", "one_allreduce", "memcpy"):
        benchmark.extra_info[f"{k}_ms"] = res[k] * 1e3
        benchmark.extra_info[f"{k}_GB_per_s"] = nbytes / res[k] / 1e9
    benchmark.extra_info.update(elements=res["elements"], arrays=res["arrays"], ranks=res["ranks"],
                                bucket_bytes=res["bucket_bytes"])
    assert res["elements"] == sum(int(np.prod(s)) for s in lora_grad_shapes(layers))
    if layers == QWEN3_4B["layers"]:
        assert res["elements"] == 33_030_144


@pytest.mark.benchmark(group="distributed-scaling")
def test_tokens_per_s_scaling_1_to_2_ranks(benchmark, tmp_path):
    if benchmark.disabled:
        from model_factory import make_tiny_checkpoint

        model, rows, seq, steps = make_tiny_checkpoint(tmp_path / "tiny"), 4, 16, 1
    else:
        model, rows, seq, steps = os.environ.get("QLORA_EXT_BENCH_DIST_MODEL", "smollm2-135m"), 8, 128, 3
    # threads per rank and the FFN device: 1 and cpu on the 2-core dev VM; on a bigger host
    # e.g. QLORA_EXT_BENCH_DIST_THREADS=8 (then 1 x 8, 2 x 8 and the reference 1 x 16) and
    # QLORA_EXT_BENCH_DIST_DEVICE=gpu (two ranks sharing one GPU)
    t = int(os.environ.get("QLORA_EXT_BENCH_DIST_THREADS", "1"))
    device = os.environ.get("QLORA_EXT_BENCH_DIST_DEVICE", "cpu")
    res = {}

    def once():
        res["one"] = _job(1, t, "train", model, rows, seq, steps, device)
        res["two"] = _job(2, t, "train", model, rows, seq, steps, device)
        res["one_2threads"] = _job(1, 2 * t, "train", model, rows, seq, steps, device)

    benchmark.pedantic(once, rounds=1, iterations=1)
    one, two, ref = res["one"]["tokens_per_s"], res["two"]["tokens_per_s"], res["one_2threads"]["tokens_per_s"]
    benchmark.extra_info.update(tokens_per_s_1rank=one, tokens_per_s_2ranks=two, tokens_per_s_1rank_2threads=ref,
                                scaling_efficiency=two / (2 * one), speedup_vs_2threads=two / ref,
                                model=str(model), rows=rows, seq=seq, steps=steps, threads_per_rank=t,
                                device=device)
    assert one > 0 and two > 0 and ref > 0


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "allreduce":
        out = job_allreduce(int(sys.argv[2]), int(sys.argv[3]))
    elif kind == "train":
        out = job_train(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
                        int(os.environ.get("OMP_NUM_THREADS", "1")), *sys.argv[6:7])
    else:
        raise SystemExit(f"unknown job {kind!r}")
    from qlora_ext.train.distributed import get_comm

    if get_comm().rank == 0:
        print(json.dumps(out), flush=True)
