"""The bundled task's `qlora-ext train` on a GPU host: is the eval before and after training
cheaper than the training?  A random-weight checkpoint of a real model's shape (see
make_checkpoint.py) with the test suite's small tokenizer and chat template stands in for the
model (no hub access on the host): its answers are noise, so every eval row generates its full
answer budget, the worst case for the eval's time.

    python bench/gpu_bundled_task.py --shape qwen3-0.6b --steps 30 --json out.jsonl [-- extra train flags]"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

from make_checkpoint import make_checkpoint  # noqa: E402
from model_factory import CHAT_TEMPLATE, tiny_tokenizer_json  # noqa: E402


def checkpoint_with_tokenizer(out_dir: str, shape: str) -> str:
    make_checkpoint(out_dir, shape, verbose=False)
    with open(os.path.join(out_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        f.write(tiny_tokenizer_json(vocab))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json")
    ap.add_argument("extra", nargs="*", help="more `qlora-ext train` flags (after --)")
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bundled-")
    model = checkpoint_with_tokenizer(os.path.join(work, "model"), a.shape)
    cmd = [sys.executable, "-m", "qlora_ext.cli", "train", "--model", model, "--out", os.path.join(work, "run"),
           "--steps", str(a.steps), *a.extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, QLORA_EXT_PROGRESS="0"))
    wall = time.perf_counter() - t0
    print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", flush=True)
    evals = [float(s) for s in re.findall(r"^eval (?:before|after).*\[(\d+)s\]$", proc.stdout, re.M)]
    trained = re.search(r"trained (\d+) steps in ([\d.]+)s \((\d+) tokens/s", proc.stdout)
    res = {"shape": a.shape, "steps": a.steps, "rc": proc.returncode, "wall_s": wall, "eval_s": evals,
           "train_s": float(trained.group(2)) if trained else None,
           "tokens_per_s": float(trained.group(3)) if trained else None, "extra": a.extra}
    print(json.dumps(res), flush=True)
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
