"""Batched generation time on a GPU host: 32 prompts x 64 new tokens with a random model of a
given shape, in each placement asked for, greedy and sampled (what `qlora-ext train`'s held-out
eval and `qlora-ext generate` run).  No stop token: every row generates its whole budget.

    python bench/gpu_generate.py --shape qwen3-0.6b --modes gpu,cpu --sampling greedy,sampled --json out.jsonl"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from gpu_train_throughput import random_state  # noqa: E402

# sampling configurations: generate()'s keywords
SAMPLING = {"greedy": {}, "sampled": {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "seed": 0}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--modes", default="gpu", help="placements, comma-separated: gpu, split, cpu")
    ap.add_argument("--sampling", default="greedy", help=f"comma-separated: {', '.join(SAMPLING)}")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    import qlora_ext as qx
    from qlora_ext.engine.gpu_model import GpuModel, SplitModel
    from qlora_ext.engine.model import Model

    state = random_state(a.shape)
    g = np.random.default_rng(0)
    V = state.config.vocab_size
    prompts = [list(g.integers(0, V, int(g.integers(a.prompt_len // 2, a.prompt_len + 1)))) for _ in range(a.prompts)]
    for mode in a.modes.split(","):
        model = {"gpu": GpuModel, "split": SplitModel, "cpu": Model}[mode](state, qx.LoraConfig(r=16, alpha=32))
        for name in a.sampling.split(","):
            kw = SAMPLING[name]
            model.generate(prompts[:2], max_new_tokens=2, stop_ids=[], **kw)          # warm-up
            t0 = time.perf_counter()
            out = model.generate(prompts, max_new_tokens=a.new, stop_ids=[], **kw)
            dt = time.perf_counter() - t0
            res = {"shape": a.shape, "placement": mode, "sampling": name, **kw, "prompts": a.prompts,
                   "prompt_tokens": sum(map(len, prompts)), "new_tokens": a.new, "seconds": dt,
                   "tokens_per_s": sum(len(o) for o in out) / dt}
            print(json.dumps(res), flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(res) + "\n")
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
