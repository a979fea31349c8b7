"""Checkpoint loading: wall time and peak RSS of load_state(quantize="nf4") against the NF4
footprint, with transformers + bitsandbytes `load_in_4bit` (CPU) timed in the same run.

Each load runs in a fresh subprocess so that its peak RSS (ru_maxrss) is its own.

    # the issue's target: a synthetic Qwen3-4B checkpoint (~8 GB bf16), made once
    python bench/make_checkpoint.py /tmp/qwen3-4b-synth --shape qwen3-4b
    QLORA_EXT_BENCH_CHECKPOINT=/tmp/qwen3-4b-synth PYTHONPATH=src \
        python -m pytest bench/bench_loading.py -s --benchmark-json=load.json

Without QLORA_EXT_BENCH_CHECKPOINT a small Qwen3-shaped stand-in (~60 MB) is generated, so
CI checks the harness.  QLORA_EXT_BENCH_REFERENCE=0 skips the transformers reference."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import qlora_ext

HERE = os.path.dirname(os.path.abspath(__file__))
# the directory of the qlora_ext imported here (installed or in-place build)
SRC = os.path.dirname(os.path.dirname(os.path.abspath(qlora_ext.__file__)))
sys.path.insert(0, HERE)

from make_checkpoint import make_checkpoint  # noqa: E402

GIB = 1 << 30

_OURS = r"""
import json, sys, time
def hwm():
    # VmHWM belongs to this process's address space (ru_maxrss would carry the parent's peak across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
from qlora_ext.model.loading import load_state
base = hwm()
t = time.perf_counter()
st = load_state(sys.argv[1], quantize="nf4", progress=False)
dt = time.perf_counter() - t
print(json.dumps({"load_s": dt, "peak_rss": hwm(),
                  "base_rss": base, "state_bytes": st.memory_report()["total"],
                  "params": sum(l.proj[p].size for l in st.layers for p in l.proj) + st.embed_tokens.size}))
"""

_REFERENCE = r"""
import json, sys, time
def hwm():
    # VmHWM belongs to this process's address space (ru_maxrss would carry the parent's peak across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
import torch, transformers
torch.set_num_threads(2)
base = hwm()
t = time.perf_counter()
q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.bfloat16)
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=q, device_map="cpu",
                                                      dtype=torch.bfloat16)
dt = time.perf_counter() - t
print(json.dumps({"load_s": dt, "peak_rss": hwm(),
                  "base_rss": base, "state_bytes": m.get_memory_footprint()}))
"""


def _run(code: str, path: str, timeout: float = 1800) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
               QLORA_EXT_PROGRESS="0", TRANSFORMERS_VERBOSITY="error")
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"load subprocess failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = os.environ.get("QLORA_EXT_BENCH_CHECKPOINT")
    if path:
        if not os.path.isdir(path):
            pytest.fail(f"QLORA_EXT_BENCH_CHECKPOINT={path} is not a directory (make one with bench/make_checkpoint.py)")
        return path
    return make_checkpoint(str(tmp_path_factory.mktemp("ckpt")), "qwen3-mini", verbose=False)


def _checkpoint_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def test_load_nf4(benchmark, checkpoint):
    size = _checkpoint_bytes(checkpoint)
    # warm the page cache once so that the timed loads compare CPU work, not the disk
    _run(_OURS, checkpoint)
    res = {}
    benchmark.pedantic(lambda: res.update(_run(_OURS, checkpoint)), rounds=1, iterations=1)
    over = res["peak_rss"] - res["state_bytes"]
    info = benchmark.extra_info
    info.update(checkpoint=checkpoint, checkpoint_gb=size / 1e9, load_s=res["load_s"],
                read_gb_per_s=size / 1e9 / res["load_s"], params_per_s=res["params"] / res["load_s"],
                peak_rss_gib=res["peak_rss"] / GIB, state_gib=res["state_bytes"] / GIB,
                interpreter_rss_gib=res["base_rss"] / GIB, peak_over_state_gib=over / GIB)
    if os.environ.get("QLORA_EXT_BENCH_REFERENCE", "1") != "0":
        try:
            import bitsandbytes  # noqa: F401
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            info["reference"] = f"not run: {e}"
        else:
            ref = _run(_REFERENCE, checkpoint)
            info.update(reference="transformers+bitsandbytes load_in_4bit (CPU)", ref_load_s=ref["load_s"],
                        ref_peak_rss_gib=ref["peak_rss"] / GIB, ref_state_gib=ref["state_bytes"] / GIB,
                        speedup=ref["load_s"] / res["load_s"])
    print("\n" + json.dumps(info, indent=1))
    assert over <= GIB, f"peak RSS {res['peak_rss'] / GIB:.2f} GiB exceeds the state ({res['state_bytes'] / GIB:.2f} GiB) + 1 GiB"
