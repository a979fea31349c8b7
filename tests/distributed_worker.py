"""One rank of a data-parallel test run (started by tests/test_distributed.py, alone or under
`mpiexec -n N`).  argv[1] is a JSON spec; see test_distributed.py for the fields.

mode "train": a tiny real Model (tests/model_factory.py checkpoint, fp32 base, LoRA r 4) on
synthetic rows of uneven lengths, some with every label -100, in file order, through
qlora_ext.train.loop.fit; every update is followed by a check that all ranks hold identical
weights and AdamW state.  Rank 0 writes metrics and checkpoints into spec["out"].

mode "collectives": MpiComm's all-reduce, broadcast and checks against numpy."""
from __future__ import annotations

import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from qlora_ext.train.distributed import get_comm  # noqa: E402


def make_examples(n: int, vocab: int, seed: int, ignore: tuple) -> list:
    """n rows of lengths 3..12 (uneven); rows whose index is in `ignore` have no target."""
    from qlora_ext.train.data import IGNORE, Example

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = [int(t) for t in rng.integers(3, vocab, size=int(rng.integers(3, 13)))]
        labels = [IGNORE] * len(ids) if i in ignore else list(ids)
        out.append(Example(ids, labels, i + 1))
    return out


class EmulatedShards:
    """A DataLoader whose batches, taken whole by one process, yield the micro-batches that
    `ranks` ranks would compute (each rank's shard cut by micro_batches): the single-process
    reference with the very same matmul shapes as the distributed run."""

    def __init__(self, loader, ranks: int):
        self.loader, self.ranks = loader, ranks

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def next_batch(self):
        batch, ranks = self.loader.next_batch(), self.ranks

        class Whole:
            attention_mask = batch.attention_mask

            def shard(self, rank, size):
                assert (rank, size) == (0, 1)
                return self

            def micro_batches(self, micro):
                return [mb for r in range(ranks) for mb in batch.shard(r, ranks).micro_batches(micro)]

        return Whole()


def run_train(spec: dict, comm) -> None:
    from qlora_ext.model.loading import load_state
    from qlora_ext.model.lora import LoraConfig
    from qlora_ext.train.checkpoint import latest_checkpoint
    from qlora_ext.train.data import DataLoader
    from qlora_ext.train.loop import MetricsLog, fit, restore
    from qlora_ext.train.trainer import TrainConfig, Trainer

    class CheckedTrainer(Trainer):
        def apply_update(self):
            loss = super().apply_update()
            comm.check_in_sync(self)
            return loss

    state = load_state(spec["model"], quantize=spec.get("quantize"))
    if spec.get("device") == "gpu":  # every rank on this host's one (software) adapter
        from qlora_ext.engine.gpu_model import SplitModel
        from qlora_ext.gpu.runtime import shared_context

        model = SplitModel(state, LoraConfig(r=4, alpha=8), ctx=shared_context(), threads=1, seed=3)
    else:
        from qlora_ext.engine.model import Model

        model = Model(state, LoraConfig(r=4, alpha=8), threads=1, seed=3)
    examples = make_examples(spec["examples"], model.config.vocab_size, 7, tuple(spec.get("ignore", ())))
    loader = DataLoader(examples, 16, spec["batch_rows"], seed=0, shuffle=spec.get("shuffle", False), pad_id=0)
    config = TrainConfig(lr=spec.get("lr", 1e-2), grad_clip=spec.get("grad_clip", 1.0), total_steps=spec["steps"])
    trainer = CheckedTrainer(model, config, comm=comm)
    out = spec["out"]
    resume_step = None
    if spec.get("resume"):
        # Only rank 0 reads the checkpoint (as if the others had no shared filesystem);
        # sync_trainer hands weights, moments, step and data position to every rank.
        if comm.rank == 0:
            ckpt = latest_checkpoint(out)
            if ckpt is None:
                raise OSError(f"{out}: no checkpoint to resume from")
            restore(trainer, loader, ckpt)
    comm.sync_trainer(trainer, loader)
    comm.check_in_sync(trainer)
    if spec.get("resume"):
        resume_step = trainer.step_count
    metrics = MetricsLog(os.path.join(out, "metrics.jsonl"), resume_step=resume_step) if comm.is_writer else None

    def should_stop():
        fault = spec.get("fault")
        if fault and fault["rank"] == comm.rank and trainer.step_count == fault["step"]:
            if fault["kind"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif fault["kind"] == "raise":
                raise RuntimeError(f"injected failure at step {trainer.step_count}")
            elif fault["kind"] == "hang":
                time.sleep(120)
        return False

    if spec.get("emulate"):
        loader = EmulatedShards(loader, spec["emulate"])
    fit(trainer, loader, spec["steps"], spec["micro"], out_dir=out, save_every=spec.get("save_every", 0),
        metrics=metrics, should_stop=should_stop)
    if metrics is not None:
        metrics.close()


def run_collectives(spec: dict, comm) -> None:
    from qlora_ext.train.distributed import MpiComm, flat_zeros_like

    assert isinstance(comm, MpiComm) and comm.size == spec["size"], comm
    r, n = comm.rank, comm.size
    shapes = [(1,), (7, 3), (13,), (2, 5, 3), (1,)]
    want = [sum(np.random.default_rng([k, i]).standard_normal(s).astype(np.float32).astype(np.float64)
                for k in range(n)) for i, s in enumerate(shapes)]
    for bucket_bytes in (12, 1 << 20):  # 3-element buckets split arrays; one bucket holds all
        comm.bucket_elems = bucket_bytes // 4
        comm._buckets.clear()
        # packed path (separate arrays) and in-place path (views of one buffer)
        for flat in (False, True):
            arrays = [np.random.default_rng([r, i]).standard_normal(s).astype(np.float32)
                      for i, s in enumerate(shapes)]
            if flat:
                views = flat_zeros_like({i: a for i, a in enumerate(arrays)})
                for i, a in enumerate(arrays):
                    views[i][...] = a
                arrays = list(views.values())
            got = comm.allreduce_sum(arrays, [r + 0.5, 10.0 ** r])
            assert got == [sum(k + 0.5 for k in range(n)), sum(10.0 ** k for k in range(n))], got
            for a, w in zip(arrays, want):
                np.testing.assert_allclose(a, w, rtol=1e-6, atol=1e-6)
            digests = comm._comm.allgather(b"".join(a.tobytes() for a in arrays))
            assert all(d == digests[0] for d in digests), "all-reduce results differ between ranks"
    # a rank with nothing to add passes zeros and still gets the sum
    z = [np.zeros(5, np.float32) if r == 0 else np.full(5, r, np.float32)]
    comm.allreduce_sum(z)
    assert (z[0] == sum(range(n))).all()
    assert comm.allreduce_sum([], []) == []
    assert comm.any_true(r == n - 1) and not comm.any_true(False)
    # broadcast: root's values land everywhere; a shape mismatch raises on every rank
    b = [np.full((3, 2), r, np.float32), np.full(4, -r, np.float32)]
    comm.broadcast_arrays(b, root=n - 1)
    assert (b[0] == n - 1).all() and (b[1] == -(n - 1)).all()
    bad = [np.zeros(3 if r == 0 else 4, np.float32)]
    try:
        comm.broadcast_arrays(bad)
    except ValueError as e:
        assert "shape" in str(e), e
    else:
        raise AssertionError("broadcast_arrays accepted different shapes")
    try:
        comm.allreduce_sum([np.zeros(3, np.float64)])
    except ValueError as e:
        assert "float32" in str(e)
    else:
        raise AssertionError("allreduce_sum accepted float64")
    assert comm.local_size == n and sorted(comm._comm.allgather(comm.local_rank)) == list(range(n))
    assert comm.device_index(1) == 0 and comm.device_index(n) == comm.local_rank
    print(f"rank {r}: collectives ok", flush=True)


def main() -> None:
    spec = json.loads(sys.argv[1])
    comm = get_comm(timeout_s=spec.get("timeout"))
    with comm.guard():
        if spec["mode"] == "train":
            run_train(spec, comm)
        elif spec["mode"] == "collectives":
            run_collectives(spec, comm)
        else:
            raise ValueError(f"unknown mode {spec['mode']!r}")


if __name__ == "__main__":
    main()
