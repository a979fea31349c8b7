"""The trainer's own per-step cost, outside the model: one AdamW update of the LoRA
parameters of SmolLM2-135M (r=16 on all 7 projections of 30 layers: 4,884,480 f32 values
in 420 tensors), against torch.optim.AdamW (foreach, the default) on the same tensors in
the same run.  Rate: parameters updated per second (Gparam/s).

Both on one thread: numpy's element-wise ops are single-threaded, and torch's two-thread
AdamW on a busy 2-core machine measured 50x slower than its one-thread run (spinning
workers), which would flatter us."""
import numpy as np
import pytest

from qlora_ext.train.optim import AdamW

HIDDEN, INTER, KV, LAYERS, R = 576, 1536, 192, 30, 16
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
          "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}


def lora_tensors(seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for l in range(LAYERS):
        for proj, (o, i) in SHAPES.items():
            out[f"{l}.{proj}.A"] = rng.standard_normal((R, i)).astype(np.float32)
            out[f"{l}.{proj}.B"] = rng.standard_normal((o, R)).astype(np.float32)
    return out


N_PARAMS = sum(a.size for a in lora_tensors().values())


def _rate(benchmark):
    if benchmark.stats is None:  # --benchmark-disable (the CI default): a smoke run, no timing
        return
    benchmark.extra_info["Gparam_per_s"] = N_PARAMS / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["params"] = N_PARAMS


@pytest.mark.benchmark(group="adamw-step")
def test_adamw_qlora_ext(benchmark):
    params, grads = lora_tensors(0), lora_tensors(1)
    opt = AdamW(params, lr=1e-4, weight_decay=0.01)
    benchmark.pedantic(opt.step, args=(grads,), rounds=10, warmup_rounds=2)
    _rate(benchmark)


@pytest.mark.benchmark(group="adamw-step")
def test_adamw_torch(benchmark):
    torch = pytest.importorskip("torch")
    params = [torch.nn.Parameter(torch.from_numpy(a)) for a in lora_tensors(0).values()]
    for p, g in zip(params, lora_tensors(1).values()):
        p.grad = torch.from_numpy(g)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        benchmark.pedantic(opt.step, rounds=10, warmup_rounds=2)
    finally:
        torch.set_num_threads(threads)
    _rate(benchmark)
