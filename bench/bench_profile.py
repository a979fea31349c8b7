"""What the step profiler costs: a CPU train step of SmolLM2-135M (seq 128) with the profiler
off and on, in the same run.  Targets (issue 8): < 2% when off, < 10% when on.

"Off" cannot be timed against an uninstrumented build, so its cost is bounded from the
number of instrumented calls per step times the measured cost of one disabled call."""
import time

import numpy as np
import pytest

from qlora_ext.profile import PROFILER

SEQ = 128


@pytest.fixture(scope="module")
def trainer():
    import qlora_ext as qx

    try:
        model = qx.load_model("smollm2-135m", lora=qx.LoraConfig(r=16, alpha=32), device="cpu")
    except OSError as e:
        pytest.skip(str(e))
    return qx.Trainer(model, qx.TrainConfig(lr=1e-4))


def _ids(trainer):
    return np.random.default_rng(0).integers(0, trainer.model.config.vocab_size, (1, SEQ))


@pytest.mark.benchmark(group="profiler-overhead")
def test_step_profiler_off(benchmark, trainer):
    ids = _ids(trainer)
    assert not PROFILER.enabled
    benchmark.pedantic(trainer.step, args=(ids, ids), rounds=5, warmup_rounds=1)
    # bound the off-cost: spans a step records when on x one disabled call
    PROFILER.start()
    with PROFILER.step():
        trainer.step(ids, ids)
    PROFILER.stop()
    calls = len(PROFILER.spans)
    t0 = time.perf_counter()
    for _ in range(100000):
        PROFILER.record("x", "cpu", 0.0, 0.0)
    per_call = (time.perf_counter() - t0) / 100000
    if benchmark.stats is not None:
        benchmark.extra_info["tokens_per_s"] = SEQ / benchmark.stats.stats.median
        benchmark.extra_info["off_cost_share"] = calls * per_call / benchmark.stats.stats.median
    benchmark.extra_info["spans_per_step"] = calls


@pytest.mark.benchmark(group="profiler-overhead")
def test_step_profiler_on(benchmark, trainer):
    ids = _ids(trainer)

    def step():
        with PROFILER.step():
            return trainer.step(ids, ids)

    PROFILER.start()
    try:
        benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    finally:
        PROFILER.stop()
    if benchmark.stats is not None:
        benchmark.extra_info["tokens_per_s"] = SEQ / benchmark.stats.stats.median
