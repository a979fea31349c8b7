"""The split placement's lanes (engine/lanes.py): a training step cut into micro-batches run on
threads at once must give the bits of one pass over the whole batch -- loss and every LoRA
gradient -- for any lane count: rows cut unevenly, padding, dropout drawn per global row,
activation checkpointing, a trained LM head, gradients accumulated over calls, and rows long
enough that the GEMMs split K.  Lavapipe where no GPU."""
import threading

import numpy as np
import pytest
from model_factory import make_tiny_checkpoint

from hf_reference import batch_with_padding, randomize_lora

from qlora_ext.api import load_model
from qlora_ext.engine.lanes import LaneFailed, Turns, lane_rows
from qlora_ext.model.lora import LoraConfig
from qlora_ext.options import DEFAULT_LANES, LoadOptions

V = 97


def _split_model(tmp_path, **kw):
    from qlora_ext.gpu.runtime import GpuError, pick_adapter

    if pick_adapter(allow_software=True) is None:
        pytest.skip("no wgpu adapter (install a Vulkan driver such as Mesa lavapipe)")
    path = make_tiny_checkpoint(tmp_path / "ckpt", model_type="qwen3", seed=5, vocab_size=V)
    lora = LoraConfig(r=4, alpha=8, dropout=kw.pop("dropout", 0.0))
    try:
        model = load_model(path, lora=lora, quantize="nf4", device="gpu", placement="split", **kw)
    except GpuError as e:
        pytest.skip(f"wgpu adapter unusable: {e}")
    randomize_lora(model, seed=1)
    return model


def _step(model, lanes, batch, step=0):
    model.lanes = lanes
    model.step = step
    return model.loss_and_grads(*batch)


def _same_bits(a, b):
    (la, ga), (lb, gb) = a, b
    assert la == lb
    assert set(ga) == set(gb)
    for name in ga:
        assert np.array_equal(ga[name].view(np.uint32), gb[name].view(np.uint32)), name


def test_lane_rows():
    assert lane_rows(4, 2) == [(0, 2), (2, 4)]
    assert lane_rows(5, 2) == [(0, 2), (2, 5)]
    assert lane_rows(3, 3) == [(0, 1), (1, 2), (2, 3)]
    assert lane_rows(1, 2) == [(0, 1)]
    assert lane_rows(7, 1) == [(0, 7)]


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,options", [
    (2, 13, {}),
    (5, 13, {"dropout": 0.2}),                                            # uneven rows, masks per global row
    (3, 11, {"gradient_checkpointing": True, "train_lm_head": True}),
    (3, 140, {"gradient_checkpointing": 1, "dropout": 0.1}),             # K = 140 rows: the GEMMs split K
])
def test_lanes_give_the_bits_of_one_pass(tmp_path, B, T, options):
    model = _split_model(tmp_path, **options)
    batch = batch_with_padding(seed=B, B=B, T=T, vocab=V)
    one = _step(model, 1, batch)
    assert np.isfinite(one[0]) and any(np.abs(g).max() > 0 for g in one[1].values())
    for lanes in range(2, B + 2):          # B + 1 lanes run B
        _same_bits(_step(model, lanes, batch), one)


@pytest.mark.gpu
def test_lanes_accumulate_over_calls(tmp_path):
    """accumulate_grads (the Trainer's GPU strategy): a second call adds into the first's
    gradient in lanes with the bits of one pass."""
    model = _split_model(tmp_path, dropout=0.1)
    batches = [batch_with_padding(seed=s, B=4, T=9, vocab=V) for s in (1, 2)]
    got = {}
    for lanes in (1, 2, 3):
        model.lanes = lanes
        model.step = 0
        losses = [model.accumulate_grads(ids, labels, mask, first=i == 0)
                  for i, (ids, labels, mask) in enumerate(batches)]
        got[lanes] = losses, model._grads()
    for lanes in (2, 3):
        assert got[lanes][0] == got[1][0]
        _same_bits((0.0, got[lanes][1]), (0.0, got[1][1]))


@pytest.mark.gpu
def test_a_failing_lane_fails_the_step_and_the_next_step_runs(tmp_path, monkeypatch):
    """An error in one lane's thread is the step's error (the other lanes stop at their next
    turn instead of waiting for ever); the model stays usable."""
    model = _split_model(tmp_path)
    batch = batch_with_padding(seed=3, B=4, T=9, vocab=V)
    one = _step(model, 1, batch)
    calls = {"n": 0}
    real = type(model.device).attention_backward

    def failing(dev, *args):
        if dev is not model.device:
            calls["n"] += 1
            raise OSError("lane failed")
        return real(dev, *args)

    monkeypatch.setattr(type(model.device), "attention_backward", failing)
    with pytest.raises(OSError, match="lane failed"):
        _step(model, 2, batch)
    monkeypatch.undo()
    assert calls["n"] == 1
    _same_bits(_step(model, 2, batch), one)


def test_turns_order_lanes_and_release_on_failure():
    turns = Turns(3)
    order = []

    def lane(i):
        for k in range(4):
            with turns.turn(i):
                order.append((k, i))

    threads = [threading.Thread(target=lane, args=(i,)) for i in (2, 1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    # each lane's k-th turn comes after the lane before it had its k-th
    for k in range(4):
        assert [order.index((k, i)) for i in range(3)] == sorted(order.index((k, i)) for i in range(3))
    failed = Turns(2)
    failed.fail()
    with pytest.raises(LaneFailed):
        with failed.turn(1):
            pass


def test_lanes_option_is_validated(tmp_path):
    assert LoadOptions().lanes is None and DEFAULT_LANES == 1
    assert LoadOptions(lanes=3).lanes == 3
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="lanes"):
            LoadOptions(lanes=bad)


@pytest.mark.gpu
def test_lanes_from_load_options(tmp_path):
    model = _split_model(tmp_path, lanes=3)
    assert model.lanes == 3
    model.lanes = None
    assert model.lanes == DEFAULT_LANES
    with pytest.raises(ValueError, match="lanes"):
        model.lanes = 0
