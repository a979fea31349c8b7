"""Generation on the GPU: the KV cache's store, the decode attention and the top-k kernel
against float64 / stable-sort numpy references at awkward sizes; greedy generation on the GPU
(and split) placement equal to the CPU's token for token; seeded sampling reproducible."""
import numpy as np
import pytest
from model_factory import make_tiny_checkpoint

from gpu_support import gpu_twin, rel_err

from qlora_ext.api import load_model
from qlora_ext.model.generate import Sampling, top_candidates
from qlora_ext.model.lora import LoraConfig

pytestmark = pytest.mark.gpu


def _decode_reference(q, kc, vc, valid, length):
    """float64 attention of q [B, Tn, Hq, D] over slots s < length (valid) and the new
    tokens length .. length + t (causal)."""
    q, kc, vc = (a.astype(np.float64) for a in (q, kc, vc))
    B, Tn, Hq, D = q.shape
    g = Hq // kc.shape[2]
    out = np.zeros(q.shape)
    for b in range(B):
        for t in range(Tn):
            seen = np.zeros(length + t + 1, bool)
            seen[:length] = valid[b, :length] != 0
            seen[length:] = True
            for h in range(Hq):
                s = kc[b, :length + t + 1, h // g] @ q[b, t, h] / np.sqrt(D)
                s = np.where(seen, s, -np.inf)
                if not seen.any():
                    continue
                p = np.exp(s - s.max())
                out[b, t, h] = (p / p.sum()) @ vc[b, :length + t + 1, h // g]
    return out


@pytest.mark.parametrize("B,Tn,Hq,Hkv,D,S,length", [
    (3, 1, 6, 2, 5, 37, 23),       # GQA g = 3, odd head dim, prime slots
    (2, 3, 4, 4, 67, 150, 70),     # several new tokens, D past one thread's dims, 2 key blocks
    (1, 1, 1, 1, 256, 131, 129),   # the largest head dim; 3 key blocks
    (4, 2, 2, 1, 1, 5, 0),         # an empty cache: the new tokens alone
])
def test_store_and_decode_attention_match_float64(ctx, B, Tn, Hq, Hkv, D, S, length):
    from qlora_ext.gpu.decode import decode_attention_gpu, kv_store_gpu

    g = np.random.default_rng(B * 100 + D)
    kc = g.standard_normal((B, S, Hkv, D)).astype(np.float32)
    vc = g.standard_normal((B, S, Hkv, D)).astype(np.float32)
    valid = (g.random((B, S)) < 0.7).astype(np.uint32)
    valid[0] = 0                                    # row 0 sees only its new tokens
    q = (2 * g.standard_normal((B, Tn, Hq, D))).astype(np.float32)
    kn = g.standard_normal((B, Tn, Hkv, D)).astype(np.float32)
    vn = g.standard_normal((B, Tn, Hkv, D)).astype(np.float32)
    gk, gv = ctx.upload(kc), ctx.upload(vc)
    kv_store_gpu(ctx, ctx.upload(kn), ctx.upload(vn), gk, gv, length)
    want_k, want_v = kc.copy(), vc.copy()
    want_k[:, length:length + Tn], want_v[:, length:length + Tn] = kn, vn
    out = ctx.empty(q.shape)
    decode_attention_gpu(ctx, ctx.upload(q), gk, gv, ctx.upload(valid), length, out)
    assert np.array_equal(ctx.to_numpy(gk), want_k) and np.array_equal(ctx.to_numpy(gv), want_v)
    assert rel_err(ctx.to_numpy(out), _decode_reference(q, want_k, want_v, valid, length)) < 2e-6


def test_kv_store_checks_the_cache(ctx):
    from qlora_ext.gpu.decode import kv_store_gpu

    kn = ctx.upload(np.ones((2, 4, 3, 2), np.float32))
    kc = ctx.upload(np.zeros((2, 7, 3, 2), np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        kv_store_gpu(ctx, kn, kn, kc, kc, 4)      # slots 4 .. 7 of 7


@pytest.mark.parametrize("n,k", [(1, 1), (7, 7), (1023, 2), (1025, 50), (3001, 1), (5003, 256), (151936, 5)])
def test_topk_matches_stable_sort(ctx, n, k):
    from qlora_ext.gpu.decode import topk_gpu

    g = np.random.default_rng(n + k)
    # small integers: many ties, which must come out by lower index as a stable sort gives
    x = g.integers(-20, 20, (3, n)).astype(np.float32)
    x[1] = g.standard_normal(n).astype(np.float32)
    x[2, -1] = 1e30                                   # the best at the very end of the row
    vals, ids = topk_gpu(ctx, ctx.upload(x), k)
    order = np.argsort(-x, axis=1, kind="stable")[:, :k]
    assert np.array_equal(ctx.to_numpy(ids), order)
    assert np.array_equal(ctx.to_numpy(vals), np.take_along_axis(x, order, 1))
    hv, hi = top_candidates(x, k)                     # the host's form: the same contract
    assert np.array_equal(hi, order) and np.array_equal(hv, np.take_along_axis(x, order, 1))


def test_sampling_choose_is_seeded_and_cut():
    vals = np.array([[3.0, 2.0, 1.0, -1.0], [0.5, 0.4, 0.3, 0.2]], np.float32)
    ids = np.array([[7, 3, 9, 1], [2, 5, 4, 0]])
    s = Sampling(temperature=0.7, top_k=4, top_p=0.9)
    rngs = lambda seed: [np.random.default_rng(seed), np.random.default_rng(seed + 1)]  # noqa: E731
    a = s.choose(vals, ids, np.array([True, True]), rngs(5))
    assert np.array_equal(a, s.choose(vals, ids, np.array([True, True]), rngs(5)))
    # top_p below the best token's share keeps that token only
    one = Sampling(temperature=1.0, top_k=4, top_p=0.1)
    for seed in range(5):
        got = one.choose(vals, ids, np.array([True, False]), rngs(seed))
        assert got[0] == 7 and got[1] == -1
    draws = [Sampling(1.0, 4, 1.0).choose(vals, ids, np.array([False, True]), rngs(i))[1]
             for i in range(60)]
    assert set(draws) == {2, 5, 4, 0}                # every candidate is reachable at top_p 1


PROMPTS = [[5, 17, 33, 8, 61, 2, 90], [2], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [9, 9, 9], [11, 3]]


@pytest.fixture(scope="module")
def models(ctx, tmp_path_factory):
    from qlora_ext.engine.gpu_model import SplitModel

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("gen") / "q3", model_type="qwen3", seed=4)
    cpu = load_model(path, lora=LoraConfig(r=4, alpha=8), device="cpu")
    rng = np.random.default_rng(2)
    cpu.set_parameters({k: (0.3 * rng.standard_normal(v.shape)).astype(np.float32)
                        for k, v in cpu.parameters().items()})
    split = SplitModel(cpu.state, cpu.lora_config, ctx=ctx)
    split.set_parameters(cpu.parameters())
    return cpu, gpu_twin(cpu, ctx), split


def test_gpu_greedy_equals_cpu_token_for_token(models):
    cpu, gpu, split = models
    want = cpu.generate(PROMPTS, max_new_tokens=9, stop_ids=[])
    assert all(len(w) == 9 for w in want)
    assert gpu.generate(PROMPTS, max_new_tokens=9, stop_ids=[]) == want
    assert split.generate(PROMPTS, max_new_tokens=9, stop_ids=[]) == want
    # rows that stop early: the GPU keeps them in the batch, the answer is the same
    stop = [want[0][3], want[2][1]]
    want_stop = cpu.generate(PROMPTS, max_new_tokens=9, stop_ids=stop)
    assert gpu.generate(PROMPTS, max_new_tokens=9, stop_ids=stop) == want_stop
    assert len(want_stop[0]) <= 3 and len(want_stop[2]) <= 1
    assert gpu.generate(PROMPTS[1], max_new_tokens=4, stop_ids=[]) == want[1][:4]
    # the NF4 base streamed per layer (the placement when only that fits): the same tokens
    streamed = gpu_twin(cpu, gpu.ctx, weights="streamed")
    assert streamed.generate(PROMPTS, max_new_tokens=9, stop_ids=[]) == want


def test_kv_cache_counts_what_it_allocates(ctx, models):
    _, gpu, _ = models
    before = ctx.allocated_bytes
    cache = gpu.kv_cache(5, 23)
    used = ctx.allocated_bytes - before
    assert len(cache.k) == len(gpu.state.layers) and cache.k[0].shape[:2] == (5, 23)
    with_cache = gpu.device.generation_bytes(gpu.dims(5, 23), gpu.dims(5, 1))
    without = gpu.device.generation_bytes(gpu.dims(5, 23), gpu.dims(5, 1))   # buffers kept: the cache alone
    assert without == used and with_cache >= used


def test_generation_in_row_groups(models, monkeypatch):
    """Prompts whose caches would pass GENERATE_TOKENS go a few rows at a time, with the
    answers (greedy, and seeded draws: each prompt has its own generator) of one group."""
    from qlora_ext.model import generate as gen

    cpu, gpu, _ = models
    kw = dict(max_new_tokens=5, temperature=0.8, top_k=4, seed=2, stop_ids=[])
    want, want_sampled = gpu.generate(PROMPTS, max_new_tokens=5, stop_ids=[]), gpu.generate(PROMPTS, **kw)
    monkeypatch.setattr(gen, "GENERATE_TOKENS", 2 * (len(PROMPTS[2]) + 5))   # groups of 2 rows
    assert gen.group_rows(len(PROMPTS), len(PROMPTS[2]) + 5) == 2
    assert gpu.generate(PROMPTS, max_new_tokens=5, stop_ids=[]) == want
    assert cpu.generate(PROMPTS, max_new_tokens=5, stop_ids=[]) == want
    assert gpu.generate(PROMPTS, **kw) == want_sampled


def test_lm_head_in_row_passes(models, monkeypatch):
    """More rows than one pass of the LM head's logits holds: the same tokens."""
    from qlora_ext.engine import gpu_device

    cpu, gpu, _ = models
    prompts = PROMPTS + [[7, 7], [1, 2, 3, 5, 8, 13, 21]]      # 7 rows: passes of 3, 3 and 1
    monkeypatch.setattr(gpu_device, "HEAD_ROWS", 3)
    kw = dict(max_new_tokens=4, stop_ids=[])
    assert gpu.generate(prompts, **kw) == cpu.generate(prompts, **kw)
    sampled = dict(kw, temperature=1.1, top_k=3, seed=9)
    assert gpu.generate(prompts, **sampled) == cpu.generate(prompts, **sampled)
    assert gpu.device.decode_rows(7).logits.shape[0] == 3


def test_gpu_sampling_seeded(models):
    cpu, gpu, _ = models
    kw = dict(max_new_tokens=8, temperature=1.3, top_k=5, top_p=0.95, stop_ids=[])
    a = gpu.generate(PROMPTS, seed=3, **kw)
    assert a == gpu.generate(PROMPTS, seed=3, **kw) and all(len(r) == 8 for r in a)
    assert a == cpu.generate(PROMPTS, seed=3, **kw)        # the same candidates, the same draws
    assert a != gpu.generate(PROMPTS, seed=4, **kw)
    # every token (top_k 0) comes back as the whole sorted vocabulary
    full = dict(kw, top_k=0)
    assert gpu.generate(PROMPTS, seed=3, **full) == cpu.generate(PROMPTS, seed=3, **full)
    greedy = gpu.generate(PROMPTS, max_new_tokens=6, stop_ids=[])
    assert gpu.generate(PROMPTS, max_new_tokens=6, temperature=1.0, top_k=1, seed=1, stop_ids=[]) == greedy


def test_cli_generate_and_eval_on_the_gpu(ctx, tmp_path, monkeypatch):
    """`qlora-ext generate` / `eval` as a user runs them: the automatic placement takes the GPU
    (told how much memory it has, as wgpu cannot say on lavapipe) and prints which on stderr;
    greedy answers and the accuracy equal the CPU's."""
    import json

    pytest.importorskip("tokenizers")
    from test_cli import cli

    model = make_tiny_checkpoint(tmp_path / "model", model_type="qwen3")
    ev = tmp_path / "eval.jsonl"
    ev.write_text("".join(json.dumps({"prompt": f"add {i} {i * 7 % 5}:", "completion": f" {i}"}) + "\n"
                          for i in range(6)))
    monkeypatch.setenv("QLORA_EXT_GPU_MEMORY_GIB", "8")
    args = ["--model", model, "--prompt", "add 3 1:", "--max-new-tokens", 7]
    on_gpu = cli("generate", *args, "--device", "gpu")
    assert "placement:" in on_gpu.stderr and "placement: cpu" not in on_gpu.stderr \
        and "placement: split" not in on_gpu.stderr, on_gpu.stderr
    on_cpu = cli("generate", *args, "--device", "cpu")
    assert "placement: cpu" in on_cpu.stderr
    assert on_gpu.stdout == on_cpu.stdout and on_gpu.stdout.strip()
    sampled = [cli("generate", *args, "--device", "gpu", "--temperature", "0.9", "--top-k", "7", "--seed", 11,
                   "--quiet").stdout for _ in range(2)]
    assert sampled[0] == sampled[1]
    eval_args = ["--model", model, "--data", ev, "--accuracy", 6, "--seq-len", 32]
    assert cli("eval", *eval_args, "--device", "gpu", "--quiet").stdout.split("exact-match")[1] == \
        cli("eval", *eval_args, "--device", "cpu", "--quiet").stdout.split("exact-match")[1]
