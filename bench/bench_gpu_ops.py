"""GPU kernels: causal GQA flash attention forward + backward and the LM head with
chunked cross-entropy (forward + backward), each against PyTorch on the same machine in the
same run (SDPA / F.cross_entropy; on CUDA when torch sees a GPU, else on the CPU cores).
Also the whole training step of the gpu placement (GpuModel + Trainer) against the CPU Model's
step (loss_and_grads + AdamW) on the same model.
Rates: TFLOP/s (attention: FlashAttention's count, causal = half of 4*B*H*T^2*D per matmul
pair, backward = 2.5x forward) and tokens/s (LM head, train step).
Default sizes are small so that CI runs this on lavapipe as a test; the attention target
shape (Qwen3: Hq 32, Hkv 8, D 128) runs with
  QLORA_EXT_GPU_BENCH="B=1,T=1024,HQ=32,HKV=8,D=128,C=2560,V=151936" \
  PYTHONPATH=src pytest bench/bench_gpu_ops.py --benchmark-enable --benchmark-only
Attention tiles can be swept with QLORA_EXT_ATTN_TILES="br,bc,tm,tn[,dk4]" (default 64,64,4,4
with the largest D chunk that fits workgroup memory: 8 vec4s on NVIDIA, 4 on lavapipe); the
projection GEMM (gemm_f32.wgsl) takes the QLORA_EXT_GEMM_TILES* settings (qlora_ext.gpu.runtime.Tuning).
QLORA_EXT_ATTN_HEAD_SPLIT=0|1 forces the GQA dk/dv scheme (see attention._HEAD_SPLIT_MAX).
The GPU attention also runs on packed rows: documents of DOC tokens (the last one shorter
where DOC does not divide T) attending only within themselves; its TFLOP/s count the
block-diagonal's work, so the time against the one-document run shows what tile skipping saves."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from bench_small_gemm import wait_gpu  # noqa: E402
from bench_support import gpu_context, sizes_from_env  # noqa: E402

pytestmark = pytest.mark.gpu

_DEFAULT = {"B": 1, "T": 64, "HQ": 4, "HKV": 2, "D": 32, "C": 64, "V": 1000, "DOC": 13}


S = sizes_from_env("QLORA_EXT_GPU_BENCH", _DEFAULT)


@pytest.fixture(scope="module")
def ctx():
    return gpu_context()


def _rate(benchmark, **rates):
    """extra_info[name] = amount / median seconds (skipped when timing is disabled, where the
    benchmark ran once as a test)."""
    if benchmark.stats is None:
        return
    med = benchmark.stats.stats.median
    benchmark.extra_info.update({k: v / med for k, v in rates.items()})


def _doc_lengths(packed: bool):
    T, doc = S["T"], S["DOC"]
    return [min(doc, T - t) for t in range(0, T, doc)] if packed else [T]


def _attn_flops(packed: bool = False):
    fwd = 4 * S["B"] * S["HQ"] * sum(n * n for n in _doc_lengths(packed)) * S["D"] / 2
    return 3.5 * fwd


def _attn_inputs():
    g = np.random.default_rng(0)
    B, T, HQ, HKV, D = S["B"], S["T"], S["HQ"], S["HKV"], S["D"]
    return (g.standard_normal((B, T, HQ, D)).astype(np.float32),
            g.standard_normal((B, T, HKV, D)).astype(np.float32),
            g.standard_normal((B, T, HKV, D)).astype(np.float32),
            g.standard_normal((B, T, HQ, D)).astype(np.float32))


@pytest.mark.benchmark(group="gpu-attention-fwd-bwd")
@pytest.mark.parametrize("packed", [False, True], ids=["one-document", "packed"])
def test_attention_fwd_bwd_gpu(benchmark, ctx, packed):
    from qlora_ext.gpu.bindings.attention import attention_backward_gpu, attention_forward_gpu
    from qlora_ext.model.packing import document_starts

    q, k, v, do = (ctx.upload(a) for a in _attn_inputs())
    starts = None
    if packed:
        seg = np.repeat(np.arange(len(_doc_lengths(True))), _doc_lengths(True)).astype(np.int32)
        starts = ctx.upload(document_starts(np.tile(seg, (S["B"], 1))), "i32")
    o, lse = attention_forward_gpu(ctx, q, k, v, starts=starts)
    dq, dk, dv = attention_backward_gpu(ctx, q, k, v, o, lse, do, starts=starts)

    def step():
        attention_forward_gpu(ctx, q, k, v, o=o, lse=lse, starts=starts)
        attention_backward_gpu(ctx, q, k, v, o, lse, do, dq=dq, dk=dk, dv=dv, starts=starts)
        wait_gpu(ctx)

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    assert np.isfinite(ctx.to_numpy(dq)).all()
    _rate(benchmark, TFLOP_per_s=_attn_flops(packed) / 1e12)
    benchmark.extra_info.update(adapter=ctx.adapter.info.get("device", ""), packed=packed, **S)


@pytest.mark.benchmark(group="gpu-attention-fwd-bwd")
def test_attention_fwd_bwd_torch_sdpa(benchmark):
    torch = pytest.importorskip("torch")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, do = (torch.from_numpy(a).to(dev).transpose(1, 2) for a in _attn_inputs())
    q, k, v = (t.contiguous().requires_grad_(True) for t in (q, k, v))
    do = do.contiguous()

    def step():
        q.grad = k.grad = v.grad = None
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        o.backward(do)
        if dev == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    _rate(benchmark, TFLOP_per_s=_attn_flops() / 1e12)
    benchmark.extra_info.update(device=dev, **S)


def _head_inputs():
    g = np.random.default_rng(1)
    N = S["B"] * S["T"]
    hidden = g.standard_normal((S["B"], S["T"], S["C"])).astype(np.float32)
    w = (g.standard_normal((S["V"], S["C"])) / np.sqrt(S["C"])).astype(np.float32)
    labels = g.integers(0, S["V"], size=(S["B"], S["T"])).astype(np.int32)
    return N, hidden, w, labels


@pytest.mark.benchmark(group="gpu-lm-head-ce")
def test_lm_head_ce_gpu(benchmark, ctx):
    from qlora_ext.gpu.bindings.cross_entropy import LmHeadLoss

    N, hidden, w, labels = _head_inputs()
    head = LmHeadLoss(ctx, N, S["C"], S["V"])
    gh, gw = ctx.upload(hidden.reshape(N, -1)), ctx.upload(w)
    gl, dh = ctx.upload(labels.reshape(-1), "i32"), ctx.empty((N, S["C"]))

    def step():
        head.record(gh, gw, gl, S["T"], 1.0 / (N - S["B"]), dhidden=dh)
        wait_gpu(ctx)

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    _rate(benchmark, tokens_per_s=N)
    benchmark.extra_info.update(chunk_rows=head.R, adapter=ctx.adapter.info.get("device", ""), **S)


@pytest.mark.benchmark(group="gpu-lm-head-ce")
def test_lm_head_ce_torch(benchmark):
    torch = pytest.importorskip("torch")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    N, hidden, w, labels = _head_inputs()
    h = torch.from_numpy(hidden).to(dev).requires_grad_(True)
    wt = torch.from_numpy(w).to(dev)
    lab = torch.from_numpy(labels).long().to(dev)

    def step():
        h.grad = None
        logits = h @ wt.T
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, S["V"]),
                                                 lab[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        if dev == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    _rate(benchmark, tokens_per_s=N)
    benchmark.extra_info.update(device=dev, **S)


# ---- whole training step -----------------------------------------------------------------
# Model shape for the step benchmark: the tiny test model by default; any ModelConfig field
# through QLORA_EXT_RESIDENT_MODEL, e.g. a Qwen3-0.6B shape:
#   QLORA_EXT_RESIDENT_MODEL="hidden_size=1024,intermediate_size=3072,num_hidden_layers=28,
#     num_attention_heads=16,num_key_value_heads=8,head_dim=128,vocab_size=151936,
#     max_position_embeddings=4096" QLORA_EXT_GPU_BENCH="B=4,T=1024"
def _model_overrides():
    out = {}
    for item in filter(None, os.environ.get("QLORA_EXT_RESIDENT_MODEL", "").replace("\n", "").split(",")):
        k, _, v = item.partition("=")
        out[k.strip()] = float(v) if "." in v or "e-" in v else int(v)
    return out


@pytest.fixture(scope="module")
def step_model(tmp_path_factory):
    tests_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    from model_factory import make_tiny_checkpoint

    from qlora_ext.api import load_model
    from qlora_ext.model.lora import LoraConfig

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("gpu_step"), model_type="qwen3",
                                **_model_overrides())
    model = load_model(path, lora=LoraConfig(r=16, alpha=32), quantize="nf4", device="cpu")
    g = np.random.default_rng(0)
    ids = g.integers(0, model.config.vocab_size, size=(S["B"], S["T"]))
    return model, ids


@pytest.mark.benchmark(group="gpu-train-step")
def test_train_step_gpu(benchmark, ctx, step_model):
    from qlora_ext.train.trainer import TrainConfig, Trainer
    from gpu_support import gpu_twin

    model, ids = step_model
    gpu = gpu_twin(model, ctx)
    trainer = Trainer(gpu, TrainConfig(lr=2e-4))
    loss = trainer.step(ids, ids)
    assert np.isfinite(loss)
    benchmark.pedantic(lambda: trainer.step(ids, ids), rounds=3, warmup_rounds=1)
    _rate(benchmark, tokens_per_s=ids.size)
    benchmark.extra_info.update(adapter=ctx.adapter.info.get("device", ""),
                                gpu_bytes=gpu.memory_report(ids.shape), **S)


@pytest.mark.benchmark(group="gpu-train-step")
def test_train_step_cpu_model_reference(benchmark, step_model):
    from qlora_ext.train.optim import AdamW

    model, ids = step_model
    opt = AdamW(model.parameters(), lr=2e-4)

    def step():
        _, grads = model.loss_and_grads(ids, ids)
        opt.step(grads)

    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    _rate(benchmark, tokens_per_s=ids.size)
    benchmark.extra_info.update(device="cpu", **S)
