"""Replay of captured layer runs (GpuContext.begin_capture / replay, GpuDevice.replayable): a
layer's dispatches captured on the first step of a batch shape are replayed on the next ones.
Training with replay must give the bits of training without it, whatever changes between
steps: the tokens, the padding, packed documents, dropout masks, checkpointing, batch widths
that alternate; and a run that writes or reads is never replayed."""
import dataclasses

import numpy as np
import pytest


pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from model_factory import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("replay") / "m", model_type="qwen3", seed=7)


def _micro_batches(V, n, seed, packed):
    """Micro-batches of two widths in turn, with left padding that moves, and (packed) segment
    ids that change from batch to batch."""
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        B, T = 2, (13 if i % 2 else 7)
        ids = g.integers(0, V, size=(B, T))
        labels = ids.copy()
        labels[:, : int(g.integers(1, 3))] = -100
        mask = np.ones((B, T), np.int64)
        mask[int(g.integers(0, B)), : int(g.integers(1, 3))] = 0
        mb = [ids, labels, mask]
        if packed:
            cut = int(g.integers(2, T - 1))
            mb.append(np.array([[1] * cut + [2] * (T - cut)] * B))
        out.append(tuple(mb))
    return out


def _train(ckpt, replay, checkpointing, dropout, packed, monkeypatch, ctx):
    from qlora_ext.api import load_model
    from qlora_ext.model.lora import LoraConfig
    from qlora_ext.train.trainer import TrainConfig, Trainer

    monkeypatch.setattr(ctx, "tuning", dataclasses.replace(ctx.tuning, replay=replay))
    model = load_model(ckpt, placement="gpu", device="gpu", lora=LoraConfig(r=4, alpha=8, dropout=dropout),
                       gradient_checkpointing=checkpointing)
    trainer = Trainer(model, TrainConfig(lr=1e-2, seed=5))
    dispatches = []
    real = ctx.dispatch
    counter = [0]

    def counting(*a, **k):
        counter[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(ctx, "dispatch", counting)
    losses = []
    for mb in _micro_batches(model.config.vocab_size, 6, 11, packed):
        counter[0] = 0
        losses.append(trainer.step(*mb))
        dispatches.append(counter[0])
    monkeypatch.setattr(ctx, "dispatch", real)
    return losses, model.parameters(), dispatches


@pytest.mark.parametrize("checkpointing,dropout,packed", [(False, 0.0, False), (True, 0.0, True),
                                                         (False, 0.2, True)])
def test_replayed_training_is_bit_identical(ctx, ckpt, monkeypatch, checkpointing, dropout, packed):
    want_loss, want_params, plain = _train(ckpt, False, checkpointing, dropout, packed, monkeypatch, ctx)
    got_loss, got_params, replayed = _train(ckpt, True, checkpointing, dropout, packed, monkeypatch, ctx)
    assert got_loss == want_loss
    for n in want_params:
        np.testing.assert_array_equal(got_params[n], want_params[n], err_msg=n)
    # the first step of each width records every op; the later ones replay the layers
    assert replayed[:2] == plain[:2]
    assert all(r < p / 2 for r, p in zip(replayed[2:], plain[2:])), (replayed, plain)


def test_capture_of_a_write_or_read_is_not_replayable(ctx):
    t = ctx.upload(np.arange(8, dtype=np.float32))
    u = ctx.empty((8,))
    ctx.begin_capture()
    ctx.copy(t.buffer, 0, u.buffer, 0, 32)
    run = ctx.end_capture()
    assert run is not None and len(run) == 1
    for breaking in (lambda: ctx.write(t, np.zeros(8, np.float32)), lambda: ctx.to_numpy(t),
                     lambda: ctx.encoder().clear_buffer(u.buffer), ctx.submit):
        ctx.begin_capture()
        ctx.copy(t.buffer, 0, u.buffer, 0, 32)
        breaking()
        assert ctx.end_capture() is None
    ctx.write(t, np.full(8, 3.0, np.float32))
    ctx.write(u, np.zeros(8, np.float32))
    ctx.replay(run)     # the copy again: u takes t's contents as they are now
    np.testing.assert_array_equal(ctx.to_numpy(u), np.full(8, 3.0, np.float32))


def test_split_placement_does_not_replay():
    """The split placement's layers run CPU ops between the GPU's: replaying only the GPU's
    dispatches would skip them, so its device offers no replay (its other attributes come
    from the GPU device it holds)."""
    from qlora_ext.engine.split_device import SplitDevice

    assert SplitDevice.replayable is None


def test_replay_follows_a_loaded_adapter_of_another_alpha(ctx, ckpt, monkeypatch, tmp_path):
    """The LoRA scale is baked into the recorded work: loading an adapter of the same layout
    but another alpha after some steps gives the loss of a model without replay."""
    import json

    from qlora_ext.api import load_model
    from qlora_ext.model.lora import LoraConfig
    from qlora_ext.train.trainer import TrainConfig, Trainer

    ids = np.random.default_rng(3).integers(0, 101, size=(2, 9))
    losses = {}
    for replay in (False, True):
        monkeypatch.setattr(ctx, "tuning", dataclasses.replace(ctx.tuning, replay=replay))
        model = load_model(ckpt, placement="gpu", device="gpu", lora=LoraConfig(r=4, alpha=8))
        trainer = Trainer(model, TrainConfig(lr=1e-2))
        for _ in range(3):
            trainer.step(ids, ids)
        before = [float(model.loss(ids, ids)) for _ in range(2)]   # captured, then replayed
        out = tmp_path / f"adapter{int(replay)}"
        model.save_adapter(out)
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg["lora_alpha"] = 32
        (out / "adapter_config.json").write_text(json.dumps(cfg))
        model.load_adapter(out)
        losses[replay] = before + [float(model.loss(ids, ids)) for _ in range(2)]
    assert losses[True] == losses[False] and losses[True][2] != losses[True][0]
