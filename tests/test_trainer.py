import math
import threading

import numpy as np
import pytest

from fake_lm import VOCAB, FakeLM
from qlora_ext.train.trainer import TrainConfig, Trainer


def random_batch(rng, rows, T, ignore_frac=0.3):
    ids = rng.integers(0, VOCAB, size=(rows, T))
    labels = ids.copy()
    labels[rng.random((rows, T)) < ignore_frac] = -100
    return ids, labels


def test_trainconfig_has_help_and_validates():
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(TrainConfig))
    c = TrainConfig(schedule="cosine", total_steps=10, warmup=2)
    assert TrainConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="needs total_steps"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="unknown TrainConfig field 'lr_max'"):
        TrainConfig.from_dict({"lr_max": 1})


def test_single_step_matches_float64_adamw_on_mean_loss():
    rng = np.random.default_rng(0)
    ids, labels = random_batch(rng, 3, 9)
    m = FakeLM()
    w0 = {k: v.astype(np.float64) for k, v in m.params.items()}
    t = Trainer(m, TrainConfig(lr=1e-2, grad_clip=None))
    loss = t.step(ids, labels)
    ref_loss, g = _with_params(m, w0).loss_and_grads(ids, labels)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    # First AdamW step with bias correction moves every coordinate by lr * g / (|g| + eps').
    for k in w0:
        gk = g[k].astype(np.float64)
        step = 1e-2 * gk / (np.abs(gk) + 1e-8)
        np.testing.assert_allclose(m.params[k], w0[k] - step, rtol=1e-5, atol=1e-7)


def _with_params(model, params):
    clone = FakeLM()
    clone.E = model.E
    clone.params = {k: v.astype(np.float32) for k, v in params.items()}
    return clone


def test_grad_accum_equals_whole_batch():
    """Summed loss + token counts: micro-batches of uneven size give the update of the whole batch."""
    rng = np.random.default_rng(1)
    ids, labels = random_batch(rng, 7, 11)
    a, b = FakeLM(), FakeLM()
    ta = Trainer(a, TrainConfig(lr=1e-2, grad_clip=0.5))
    tb = Trainer(b, TrainConfig(lr=1e-2, grad_clip=0.5, grad_accum=3))
    for _ in range(3):
        la = ta.train_step([(ids, labels)])
        lb = tb.train_step([(ids[:1], labels[:1]), (ids[1:5], labels[1:5]), (ids[5:], labels[5:])])
        assert lb == pytest.approx(la, rel=1e-6)  # weights differ by f32 rounding after step 1
    for k in a.params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=1e-6, atol=1e-7)


def test_step_applies_update_every_grad_accum_calls():
    rng = np.random.default_rng(2)
    m = FakeLM()
    t = Trainer(m, TrainConfig(lr=1e-2, grad_accum=3))
    w0 = m.params["lm.w"].copy()
    batches = [random_batch(rng, 2, 6) for _ in range(3)]
    l0 = t.step(*batches[0])
    l1 = t.step(*batches[1])
    assert t.step_count == 0 and np.array_equal(m.params["lm.w"], w0)
    ref = FakeLM()
    sums = [ref.loss(*b, reduction="sum") for b in batches]
    counts = [ref.count_tokens(b[1]) for b in batches]
    assert l0 == pytest.approx(sums[0] / counts[0]) and l1 == pytest.approx(sums[1] / counts[1])
    l2 = t.step(*batches[2])
    assert t.step_count == 1 and not np.array_equal(m.params["lm.w"], w0)
    assert l2 == pytest.approx(sum(sums) / sum(counts), rel=1e-12)
    with pytest.raises(ValueError, match="partial accumulation"):
        t.step(*batches[0])
        t.train_step([batches[1]])


def test_grad_clip_scales_to_max_norm():
    rng = np.random.default_rng(3)
    ids, labels = random_batch(rng, 4, 10)
    m = FakeLM()
    _, g = FakeLM().loss_and_grads(ids, labels)
    norm = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in g.values()))
    t = Trainer(m, TrainConfig(lr=0.0, grad_clip=norm / 4))
    t.step(ids, labels)
    assert t.last_grad_norm == pytest.approx(norm, rel=1e-6)
    # lr=0: weights unchanged, and the moments hold (1 - b1) * clipped grads.
    clipped = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in t.update.optimizer.exp_avg.values())) / 0.1
    assert clipped == pytest.approx(norm / 4, rel=1e-5)


def test_no_counted_tokens_skips_the_update():
    m = FakeLM()
    t = Trainer(m, TrainConfig(lr=1e-2))
    w0 = m.params["lm.w"].copy()
    ids = np.zeros((2, 5), np.int64)
    loss = t.step(ids, np.full((2, 5), -100))
    assert math.isnan(loss) and t.step_count == 1 and np.array_equal(m.params["lm.w"], w0)
    assert m.calls == 0


def test_schedule_drives_lr():
    rng = np.random.default_rng(4)
    t = Trainer(FakeLM(), TrainConfig(lr=1.0, warmup=2, schedule="linear", total_steps=4))
    lrs = []
    for _ in range(4):
        t.step(*random_batch(rng, 1, 5, 0.0))
        lrs.append(t.last_lr)
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.5])


def test_state_dict_resume_is_bit_exact():
    rng = np.random.default_rng(5)
    batches = [random_batch(rng, 2, 8) for _ in range(6)]
    cfg = TrainConfig(lr=5e-3, weight_decay=0.1, schedule="cosine", total_steps=6, warmup=1)
    a = FakeLM()
    ta = Trainer(a, cfg)
    for b in batches:
        ta.step(*b)
    b_model = FakeLM()
    tb = Trainer(b_model, cfg)
    for b in batches[:3]:
        tb.step(*b)
    state = tb.state_dict()
    opt = {k: v.copy() for k, v in tb.optimizer_state().items()}
    saved = {k: v.copy() for k, v in b_model.params.items()}
    c = FakeLM()
    for k in c.params:
        c.params[k][...] = saved[k]
    tc = Trainer(c, TrainConfig.from_dict(state["config"]))
    tc.load_state_dict(state, opt)
    for b in batches[3:]:
        tc.step(*b)
    for k in a.params:
        np.testing.assert_array_equal(c.params[k], a.params[k])


def test_evaluate_is_token_weighted_mean():
    rng = np.random.default_rng(6)
    m = FakeLM()
    batches = [random_batch(rng, 2, 7), random_batch(rng, 1, 3)]
    t = Trainer(m, TrainConfig())
    total = sum(m.loss(*b, reduction="sum") for b in batches)
    count = sum(m.count_tokens(b[1]) for b in batches)
    assert t.evaluate(batches) == pytest.approx(total / count, rel=1e-12)


class ThreadComm:
    """In-process stand-in for an MPI communicator: ranks are threads; allreduce_sum sums
    the arrays in place (in rank order, so every rank gets identical bits)."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots = [None] * size

    def for_rank(self, rank):
        comm = self

        class View:
            size = comm.size

            def __init__(self):
                self.rank = rank

            def allreduce_sum(self, arrays, scalars):
                comm.slots[rank] = ([a.copy() for a in arrays], list(scalars))
                comm.barrier.wait()
                for i, a in enumerate(arrays):
                    a[...] = sum(comm.slots[r][0][i] for r in range(comm.size))
                out = [sum(comm.slots[r][1][i] for r in range(comm.size)) for i in range(len(scalars))]
                comm.barrier.wait()
                return out

        return View()


@pytest.mark.parametrize("ranks", [2, 3])
def test_comm_slot_gives_single_process_result(ranks):
    """The distributed slot: each rank trains its disjoint slice of every global batch
    (one global batch of 2 rows is smaller than 3 ranks); weights equal the single-process ones."""
    from qlora_ext.train.data import Batch

    rng = np.random.default_rng(7)
    globals_ = []
    for rows in (5, 4, 2):
        ids, labels = random_batch(rng, rows, 9)
        globals_.append(Batch(ids, labels, np.ones_like(ids)))
    cfg = TrainConfig(lr=1e-2, grad_clip=1.0)
    single = FakeLM()
    ts = Trainer(single, cfg)
    single_losses = [ts.train_step(b.micro_batches(2)) for b in globals_]

    comm = ThreadComm(ranks)
    models = [FakeLM() for _ in range(ranks)]
    losses = [[] for _ in range(ranks)]

    def run(r):
        t = Trainer(models[r], cfg, comm=comm.for_rank(r))
        assert t.is_writer == (r == 0)
        for b in globals_:
            losses[r].append(t.train_step(b.shard(r, ranks).micro_batches(2)))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(ranks)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for r in range(ranks):
        assert losses[r] == pytest.approx(single_losses, rel=1e-6)
        for k in single.params:
            np.testing.assert_array_equal(models[r].params[k], models[0].params[k])
            np.testing.assert_allclose(models[r].params[k], single.params[k], rtol=1e-6, atol=1e-7)


# -- non-finite values: refused up front, detected each update, never applied ------------------
@pytest.mark.parametrize("field,value", [("lr", math.inf), ("lr", math.nan), ("grad_clip", math.inf),
                                         ("eps", math.inf), ("weight_decay", math.nan)])
def test_nonfinite_hyperparameters_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        Trainer(FakeLM(), TrainConfig(**{field: value}))


def _poisoned_batch(model, rng):
    """A batch whose input embedding is infinite: loss and gradients turn NaN."""
    ids, labels = random_batch(rng, 2, 6, 0.0)
    model.E[ids[0, 0]] = np.inf
    return ids, labels


def test_nonfinite_step_stops_and_names_the_gradient():
    from qlora_ext.finite import NonFiniteError

    rng = np.random.default_rng(8)
    m = FakeLM()
    t = Trainer(m, TrainConfig(lr=1e-2))
    t.step(*random_batch(rng, 2, 6))
    before = {k: v.copy() for k, v in m.params.items()}
    with pytest.raises(NonFiniteError, match=r"step 2: .* gradient of lm\.w; loss nan"):
        t.step(*_poisoned_batch(m, rng))
    assert t.step_count == 1 and all(np.array_equal(m.params[k], before[k]) for k in before)
    assert math.isfinite(t.state_dict()["last_loss"])


def test_nonfinite_parameter_is_named_before_its_gradient():
    from qlora_ext.finite import NonFiniteError

    m = FakeLM()
    t = Trainer(m, TrainConfig(lr=1e-2))
    m.params["lm.b"][3] = np.nan
    with pytest.raises(NonFiniteError, match=r"step 1: .*parameter lm\.b"):
        t.step(*random_batch(np.random.default_rng(9), 2, 6, 0.0))


def test_state_dict_writes_null_for_a_nan_loss():
    t = Trainer(FakeLM(), TrainConfig())
    t.step(np.zeros((1, 4), np.int64), np.full((1, 4), -100))  # nothing counted: loss nan
    state = t.state_dict()
    assert state["last_loss"] is None
    t.load_state_dict(state, t.optimizer_state())
    assert math.isnan(t.last_loss)


def test_the_norm_check_reads_no_gradient_on_a_good_step(monkeypatch):
    """The Trainer checks the norm the strategy already computed: the gradients (a readback on
    a GPU) are read only to name a bad one.  A model names its strategy by optimizer_device."""
    from qlora_ext.finite import NonFiniteError
    from qlora_ext.train import update

    class CountingAdamW(update.HostAdamW):
        named = steps = 0

        def named_grads(self):
            CountingAdamW.named += 1
            return super().named_grads()

        def step(self, lr, clip_coef):
            CountingAdamW.steps += 1
            super().step(lr, clip_coef)

    monkeypatch.setitem(update.UPDATES, "counting", CountingAdamW)
    rng = np.random.default_rng(10)
    m = FakeLM()
    m.optimizer_device = "counting"
    t = Trainer(m, TrainConfig(lr=1e-2))
    assert isinstance(t.update, CountingAdamW)
    t.step(*random_batch(rng, 2, 6))
    assert CountingAdamW.steps == 1 and CountingAdamW.named == 0
    with pytest.raises(NonFiniteError, match=r"step 2: .*gradient of lm\.w"):
        t.step(*_poisoned_batch(m, rng))
    assert CountingAdamW.steps == 1 and CountingAdamW.named == 1 and t.step_count == 1


@pytest.mark.gpu
def test_device_path_stops_on_nan_on_the_gpu(tmp_path):
    """The gpu placement's model: a NaN adapter weight makes the loss and the squared norm the GPU
    computes non-finite; the step stops and names the weight, and no update is applied."""
    import re

    from gpu_support import gpu_context
    from model_factory import make_tiny_checkpoint
    from qlora_ext.finite import NonFiniteError
    from qlora_ext.api import load_model
    from qlora_ext.model.lora import LoraConfig

    gpu_context()
    m = load_model(make_tiny_checkpoint(tmp_path / "m", model_type="qwen3"), lora=LoraConfig(r=2, alpha=4),
                   placement="gpu", device="gpu")
    t = Trainer(m, TrainConfig(lr=1e-2))
    ids = np.random.default_rng(0).integers(0, m.config.vocab_size, (2, 8))
    t.step(ids, ids)
    good = {k: v.copy() for k, v in m.parameters().items()}
    assert list(t.update.named_grads()) == list(good)
    name = next(k for k in good if "lora_B" in k)
    m.set_parameters({name: np.full_like(good[name], np.nan)})
    with pytest.raises(NonFiniteError, match=rf"step 2: .*parameter {re.escape(name)}"):
        t.step(ids, ids)
    after = m.parameters()
    assert t.step_count == 1 and all(np.array_equal(after[k], good[k]) for k in good if k != name)
