"""Training throughput on a real GPU: qlora_ext's placements against HF transformers + PEFT
(+ bitsandbytes NF4 where installed) on the same GPU, in one run.

    python bench/gpu_train_throughput.py --shape qwen3-0.6b --batch 4 --seq 1024 --json out.json

Runs (--modes): "gpu" (the whole step on the GPU: qlora_ext.engine.gpu_model.GpuModel + Trainer),
"split" (projections, FFN and LM head on the GPU, norms, RoPE and attention on the CPU
kernels: SplitModel + Trainer), "hf-bf16" / "hf-fp32" (PEFT LoRA over a
bitsandbytes NF4 base with that compute dtype; plain fp32/bf16 linears when bitsandbytes
is missing, which the JSON then says).  Random weights: speed does not depend on them.
Peak GPU memory comes from polling nvidia-smi while each mode runs."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import numpy as np

SHAPES = {
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "qwen3-4b": dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    # SmolLM2-135M's published shape (llama, no q/k norm): a step whose GPU work is small
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         qk_norm=False, rms_norm_eps=1e-5, rope_theta=100000.0),
    "tiny": dict(model_type="qwen3", vocab_size=211, hidden_size=64, intermediate_size=96,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}
COMMON = dict(rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=True,
              qk_norm=True, bos_token_id=None, eos_token_id=0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class GpuMemoryPoller:
    """Max of nvidia-smi's memory.used (MiB) while active; None where nvidia-smi is absent."""

    def __init__(self, period=0.2):
        self.period, self.peak, self._stop = period, None, threading.Event()

    def _read(self):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            return max(int(x) for x in out.split())
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def __enter__(self):
        self.base = self._read()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            v = self._read()
            if v is not None:
                self.peak = v if self.peak is None else max(self.peak, v)
            self._stop.wait(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        return False

    @property
    def peak_gib(self):
        if self.peak is None:
            return None
        return (self.peak - (self.base or 0)) / 1024


def random_state(shape: str, seed=0):
    """NF4 state with random codes and scales, built directly (no fp32 copy of the base)."""
    from qlora_ext.model.config import ModelConfig
    from qlora_ext.model.state import LayerWeights, ModelState
    from qlora_ext.nf4 import NF4Tensor

    cfg = ModelConfig(**{**COMMON, **SHAPES[shape]})
    rng = np.random.default_rng(seed)

    def nf4(shape_):
        n = int(np.prod(shape_))
        return NF4Tensor(packed=rng.integers(0, 256, (n + 1) // 2, dtype=np.uint8), shape=tuple(shape_),
                         blocksize=64, absmax_f32=rng.uniform(0.02, 0.06, (n + 63) // 64).astype(np.float32))

    layers = []
    for _ in range(cfg.num_hidden_layers):
        ones = np.ones(cfg.hidden_size, np.float32)
        layers.append(LayerWeights(ones, ones.copy(), {p: nf4(s) for p, s in cfg.projection_shapes().items()}, {},
                                   *((np.ones(cfg.head_dim, np.float32), np.ones(cfg.head_dim, np.float32))
                                     if cfg.qk_norm else (None, None))))
    embed = (rng.standard_normal((cfg.vocab_size, cfg.hidden_size), dtype=np.float32) * np.float32(0.02))
    return ModelState(cfg, embed, np.ones(cfg.hidden_size, np.float32), None, layers, source=f"random {shape}")


def run_qlora_ext(mode, state, batch, seq, steps, checkpointing, profile=False, lanes=None, trace_dir=None,
                  gemm=None):
    import qlora_ext as qx
    from qlora_ext.device import adapter_info
    from qlora_ext.engine.gpu_model import GpuModel, SplitModel

    lora = qx.LoraConfig(r=16, alpha=32)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, state.config.vocab_size, (batch, seq))
    result = {"mode": mode, "adapter": adapter_info(), "batch": batch, "seq": seq,
              "gradient_checkpointing": checkpointing, **({"gemm": gemm} if gemm else {})}
    with GpuMemoryPoller() as mem:
        # What load_model(placement=...) builds, driven by the Trainer as `qlora-ext train` does
        # (clipping at 1.0: one squared-norm readback per update).
        cls = GpuModel if mode == "gpu" else SplitModel
        model = cls(state, lora, gradient_checkpointing=checkpointing,
                    **({"lanes": lanes} if mode == "split" else {"gemm": gemm}))
        if mode == "split":
            result["lanes"] = min(model.lanes, batch)
        trainer = qx.Trainer(model, qx.TrainConfig(lr=2e-4))
        step = lambda: trainer.step(ids, ids)  # noqa: E731
        t0 = time.perf_counter()
        loss0 = step()
        result["first_step_s"] = time.perf_counter() - t0
        times = []
        from qlora_ext.profile import PROFILER

        for _ in range(steps):
            t = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t)
        if profile:
            # Separate, untimed steps: per-kernel timestamps cost a pass per dispatch.
            PROFILER.start(placement=mode, adapter=(result["adapter"] or {}).get("name"),
                           **({"lanes": result["lanes"]} if mode == "split" else {}))
            for _ in range(2):
                with PROFILER.step():
                    step()
            PROFILER.stop()
            print(PROFILER.table(), flush=True)
            result["profile"] = PROFILER.summary()
            if trace_dir:
                name = mode + (f"-lanes{result['lanes']}" if mode == "split" else "")
                PROFILER.write_trace(f"{trace_dir}/{name}.trace.json")
        result.update(step_s=float(np.median(times)), steps=len(times), loss_first=float(loss0), loss_last=float(loss))
    if mode == "gpu":
        result["engine_memory_gib"] = {k: v / 2**30 for k, v in model.memory_report((batch, seq)).items()
                                       if k.startswith("gpu_")}
    result["tokens_per_s"] = batch * seq / result["step_s"]
    result["peak_gpu_gib"] = mem.peak_gib
    return result


def run_hf(mode, shape, batch, seq, steps):
    import torch
    import transformers
    import peft

    dtype = torch.bfloat16 if mode == "hf-bf16" else torch.float32
    cfg = transformers.Qwen3Config(**SHAPES[shape], rms_norm_eps=1e-6, rope_theta=1000000.0,
                                   max_position_embeddings=40960, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    try:
        import bitsandbytes as bnb

        base = "bitsandbytes-nf4"
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, lin in list(parent.named_children()):
                    if isinstance(lin, torch.nn.Linear):
                        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                              compute_dtype=dtype, quant_type="nf4", device="cpu")
                        # Params4bit quantizes on its first move to the GPU
                        q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                        if lin.bias is not None:
                            q.bias = lin.bias
                        setattr(parent, name, q.to("cuda"))
        model.is_loaded_in_4bit = True
    except ImportError:
        base = f"plain {dtype} (bitsandbytes not installed)"
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                       task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype == torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    s = float(np.median(times))
    res = {"mode": mode, "base": base, "batch": batch, "seq": seq, "step_s": s, "tokens_per_s": batch * seq / s,
           "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30, "gpu": torch.cuda.get_device_name()}
    del model, opt
    torch.cuda.empty_cache()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--modes", default="hf-bf16,hf-fp32,gpu,split",
                    help="runs, in this order: the qlora_ext placements gpu and split, HF + PEFT with hf-bf16 / "
                         "hf-fp32 compute (HF runs slower after our placement in the same process: list it first)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing on every layer in the qlora_ext placements")
    ap.add_argument("--json", help="append one JSON line per mode here")
    ap.add_argument("--profile", action="store_true", help="print the profiler's phase table for the qlora_ext placements")
    ap.add_argument("--lanes", type=int, help="split: micro-batches in flight at once (default: the model's, 2)")
    ap.add_argument("--trace-dir", help="with --profile: write a Perfetto trace per qlora_ext mode here")
    ap.add_argument("--gemm", choices=["fused", "dequant"],
                    help="gpu: the projections' GEMM (default: the placement's choice)")
    a = ap.parse_args(argv)
    state = None
    for mode in a.modes.split(","):
        t0 = time.perf_counter()
        try:
            if mode.startswith("hf-"):
                res = run_hf(mode, a.shape, a.batch, a.seq, a.steps)
            else:
                if state is None:
                    state = random_state(a.shape)
                res = run_qlora_ext(mode, state, a.batch, a.seq, a.steps, a.checkpointing, a.profile, a.lanes,
                                    a.trace_dir, a.gemm)
        except Exception as e:  # one failing mode must not lose the others' figures
            res = {"mode": mode, "error": f"{type(e).__name__}: {e}"}
        res.update(shape=a.shape, wall_s=time.perf_counter() - t0)
        print(json.dumps(res), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
