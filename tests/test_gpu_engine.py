"""The GPU placement (GpuModel) against the CPU Model on tiny checkpoints: loss and every
LoRA gradient (qwen3 with q/k norm and NF4; llama with tied embeddings and fp32 weights;
padding; gradient checkpointing), and a few AdamW steps against the CPU trainer's AdamW."""
import numpy as np
import pytest

from gpu_support import gpu_train_step, gpu_twin, rel_err
from qlora_ext.train.trainer import TrainConfig
from qlora_ext.train.update import GpuAdamW

pytestmark = pytest.mark.gpu


def _model(tmp_path, model_type, quantize, r=4, train_lm_head=False):
    from model_factory import make_tiny_checkpoint
    from qlora_ext.api import load_model
    from qlora_ext.model.lora import LoraConfig

    path = make_tiny_checkpoint(tmp_path / model_type, model_type=model_type, seed=3)
    model = load_model(path, lora=LoraConfig(r=r, alpha=2 * r), quantize=quantize, device="cpu",
                       train_lm_head=train_lm_head)
    # B starts at zero (then every A gradient is zero): give all LoRA weights random values.
    g = np.random.default_rng(0)
    model.set_parameters({n: (g.standard_normal(a.shape) * 0.05).astype(np.float32)
                          for n, a in model.parameters().items()})
    return model


def _batch(V, B=2, T=13, seed=1):
    g = np.random.default_rng(seed)
    ids = g.integers(0, V, size=(B, T))
    labels = ids.copy()
    labels[0, :4] = -100
    return ids, labels


def _compare(model, engine, ids, labels, mask=None, tol=2e-5):
    loss_ref, grads_ref = model.loss_and_grads(ids, labels, attention_mask=mask)
    loss, grads = engine.loss_and_grads(ids, labels, attention_mask=mask)
    assert abs(loss - loss_ref) <= tol * abs(loss_ref)
    assert set(grads) == set(grads_ref)
    worst = max(rel_err(grads[n], grads_ref[n]) for n in grads_ref)
    # Both sides are float32 with different summation orders through 2 layers, the LM head
    # and the chunked loss (measured: 1.5e-6 of each gradient's scale; a 1% LoRA scale error
    # gives 2e-2).
    assert worst <= tol, worst


@pytest.mark.parametrize("model_type,quantize,train_head,gemm", [
    ("qwen3", "nf4", False, "fused"), ("qwen3", "nf4", False, "dequant"), ("llama", None, False, "fused"),
    ("llama", None, False, "dequant"), ("qwen2", "nf4", False, "fused"), ("llama", "nf4", True, "fused")])
def test_engine_matches_cpu_model(ctx, tmp_path, model_type, quantize, train_head, gemm):
    """qwen3: q/k norm; llama: tied embeddings (untied when the head trains); qwen2: biases;
    both GEMM paths (gemm.wgsl's fused NF4 GEMM, and dequant + small_gemm)."""

    model = _model(tmp_path, model_type, quantize, train_lm_head=train_head)
    engine = gpu_twin(model, ctx, gemm=gemm)
    ids, labels = _batch(model.config.vocab_size)
    _compare(model, engine, ids, labels)


@pytest.mark.parametrize("weights,recompute", [("on GPU", True), ("streamed", True), ("on GPU", 1)])
def test_engine_padding_and_checkpointing(ctx, tmp_path, weights, recompute):
    """Also: the base streamed layer by layer instead of held on the GPU, and one of the two
    layers recomputing (the other keeping its activations), give the same results."""

    model = _model(tmp_path, "qwen3", "nf4")
    engine = gpu_twin(model, ctx, gradient_checkpointing=recompute, weights=weights)
    assert engine.recompute_layers == (2 if recompute is True else recompute)
    ids, labels = _batch(model.config.vocab_size, B=2, T=11, seed=4)
    mask = np.ones_like(ids)
    mask[1, :3] = 0      # left padding
    labels[1, :3] = -100
    _compare(model, engine, ids, labels, mask)
    if weights == "streamed":
        # Forward loads layers 0, 1; backward recomputes + differentiates layer 1 (still
        # loaded), then layer 0 (loaded again): 3 layer loads of 7 projections.
        per_layer = sum(arr.nbytes for proj in engine.device.streamed.host[0].values() for arr in proj.values())
        assert engine.device.streamed.bytes_streamed == 3 * per_layer


def test_engine_train_steps_match_cpu_adamw(ctx, tmp_path):
    from qlora_ext.train.optim import AdamW

    model = _model(tmp_path, "llama", None)
    engine = gpu_twin(model, ctx)
    update = GpuAdamW(engine, TrainConfig(lr=1e-2, weight_decay=0.01))
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    ids, labels = _batch(model.config.vocab_size, B=1, T=9, seed=5)
    for _ in range(3):
        loss_gpu = gpu_train_step(update, ids, labels)
        loss_cpu, grads = model.loss_and_grads(ids, labels)
        opt.step(grads)
        assert abs(loss_gpu - loss_cpu) <= 1e-4 * abs(loss_cpu)
    got = engine.parameters()
    for n, a in model.parameters().items():
        assert rel_err(got[n], a) <= 1e-4, n
    # The optimizer state has the CPU AdamW's format: a checkpoint resumes in either mode.
    gpu_state, cpu_state = update.optimizer_state(), opt.state_dict()
    assert set(gpu_state) == set(cpu_state) and int(gpu_state["step"]) == 3
    for k in cpu_state:
        if k != "step":
            assert rel_err(gpu_state[k], cpu_state[k]) <= 1e-4, k
    resumed = gpu_twin(model, ctx)
    resumed_update = GpuAdamW(resumed, TrainConfig(lr=1e-2, weight_decay=0.01))
    resumed.set_parameters(got)
    resumed_update.load_optimizer_state(gpu_state)
    assert gpu_train_step(resumed_update, ids, labels) == gpu_train_step(update, ids, labels)
    np.testing.assert_array_equal(resumed.ctx.to_numpy(resumed.device.values), engine.ctx.to_numpy(engine.device.values))
    with pytest.raises(ValueError, match="exp_avg"):
        resumed_update.load_optimizer_state({"step": 1})


def test_engine_memory_report(ctx, tmp_path):

    model = _model(tmp_path, "qwen3", "nf4")
    full = gpu_twin(model, ctx).memory_report((2, 16))
    ckpt = gpu_twin(model, ctx, gradient_checkpointing=True).memory_report((2, 16))
    # NF4 codes are half a byte per weight: the resident part is far below fp32 weights.
    fp32_weights = sum(4 * np.prod(lw.shape(p)) for lw in model.state.layers for p in lw.proj)
    assert 0 < full["gpu_fixed_bytes"] < fp32_weights
    assert ckpt["gpu_activation_bytes"] < full["gpu_activation_bytes"]


@pytest.mark.parametrize("gemm,checkpointing", [("fused", False), ("dequant", False), ("fused", True)])
def test_engine_dropout_drops_what_the_cpu_model_drops(ctx, tmp_path, gemm, checkpointing):
    """LoRA dropout 0.3 on all 7 projections: the CPU model and the engine draw the same
    counter-hash masks for the same model step, so loss and every gradient agree as without
    dropout; a different step gives other masks (a different loss)."""

    model = _model(tmp_path, "qwen3", "nf4")
    model.lora_config.dropout = model.lora.config.dropout = 0.3
    model.device.recompute_layers = len(model.state.layers) if checkpointing else 0
    engine = gpu_twin(model, ctx, gemm=gemm, gradient_checkpointing=checkpointing)
    ids, labels = _batch(model.config.vocab_size)
    model.step = engine.step = 4
    loss_ref, grads_ref = model.loss_and_grads(ids, labels)   # step 4's masks; step -> 5
    loss, grads = engine.loss_and_grads(ids, labels)
    assert abs(loss - loss_ref) <= 2e-5 * abs(loss_ref)
    assert max(rel_err(grads[n], grads_ref[n]) for n in grads_ref) <= 2e-5
    engine.step = 9
    assert abs(engine.loss_and_grads(ids, labels)[0] - loss) > 1e-4 * abs(loss)
    # eval sees no dropout
    assert abs(engine.loss(ids, labels) - model.loss(ids, labels)) <= 2e-5 * abs(loss)


@pytest.mark.parametrize("blocksize", [48, 16, 8192])
def test_upload_checks_a_hand_built_nf4_blocksize(ctx, blocksize):
    """The dequant shader reads a packed word per thread, all of one block: the upload refuses a
    hand-built tensor whose blocksize nf4.py would refuse."""
    from qlora_ext.gpu.bindings.weights import upload_weight
    from qlora_ext.nf4 import quantize_nf4

    t = quantize_nf4(np.ones((4, 64), np.float32))
    t.blocksize = blocksize
    with pytest.raises(ValueError, match="blocksize"):
        upload_weight(ctx, t)


@pytest.mark.parametrize("shape,blocksize", [((3, 5), 64), ((7, 33), 32), ((1, 1), 64), ((37, 131), 128),
                                             ((64, 96), 64), ((5, 13), 256)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_dequant_bit_equal_to_cpu(ctx, shape, blocksize, double_quant):
    """The NF4 dequant shader gives the CPU dequantizer's floats bit for bit (odd element
    counts: a half-used last byte and word, a packed length not a multiple of 4; a last block
    shorter than the others), and leaves the rest of a longer scratch as it was."""
    from qlora_ext.gpu.bindings.weights import WeightScratch, upload_weight
    from qlora_ext.nf4 import dequantize_nf4, quantize_nf4

    w = np.random.default_rng(shape[1]).standard_normal(shape).astype(np.float32)
    t = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    n = w.size
    scratch = WeightScratch(ctx, [(shape[0] + 1, shape[1] + 3)])
    ctx.write(scratch.buf, np.full(scratch.buf.shape, 7.0, np.float32))
    scratch.fp32(upload_weight(ctx, t))
    got = ctx.to_numpy(scratch.buf)
    np.testing.assert_array_equal(got[:n].reshape(shape), dequantize_nf4(t))
    assert np.all(got[n:] == 7.0)


def _timed_step(ctx, model, ids, labels):
    """One training step on its own device (timing stays off for the other tests) with every
    kernel timed into a fresh Profiler: (kernel_times(), profiler)."""
    from qlora_ext.gpu.runtime import GpuContext
    from qlora_ext.profile import Profiler

    tctx = GpuContext(ctx.adapter)
    engine = gpu_twin(model, tctx)
    prof = Profiler()
    tctx.enable_timing(profiler=prof)
    prof.start()
    with prof.step():
        gpu_train_step(GpuAdamW(engine, TrainConfig()), ids, labels)
        times = tctx.kernel_times()
    prof.stop()
    return times, prof


def test_engine_kernel_times_in_profiler(ctx, tmp_path):
    """Per-kernel GPU times from timestamp queries reach the profiler's phase table."""
    from qlora_ext.gpu.runtime import GpuContext

    if not ctx.has_timestamps:
        pytest.skip("adapter without timestamp-query")
    model = _model(tmp_path, "qwen3", "nf4")
    ids, labels = _batch(model.config.vocab_size)
    times, prof = _timed_step(ctx, model, ids, labels)
    # With the global profiler on, the engine times its kernels by itself.
    from qlora_ext.profile import PROFILER

    auto = gpu_twin(model, GpuContext(ctx.adapter))
    PROFILER.start()
    try:
        with PROFILER.step():
            gpu_train_step(GpuAdamW(auto, TrainConfig()), ids, labels)
    finally:
        PROFILER.stop()
    assert "attention_bwd.dq" in PROFILER.table() and any(sp.device == "gpu" for sp in PROFILER.spans)
    for k in ("attention_fwd.forward", "attention_bwd.dkdv", "small_gemm.skinny", "gemm_f32.main", "nf4.dequant",
              "cross_entropy.rows", "adamw.step", "rope.apply", "rmsnorm.backward"):
        assert k in times and times[k][0] > 0 and times[k][1] >= 1, k
    assert times["attention_fwd.forward"][1] == model.config.num_hidden_layers
    assert "attention_fwd.forward" in prof.table()
    with pytest.raises(ValueError, match="timing is off"):
        ctx.kernel_times()


def test_kernel_spans_survive_a_full_query_set(ctx, tmp_path, monkeypatch):
    """A step with more passes than the query set holds: the passes resolved mid-step (set
    full) reach the profiler as well, so the phase table covers the whole step."""
    from qlora_ext.gpu.runtime import timing

    if not ctx.has_timestamps:
        pytest.skip("adapter without timestamp-query")
    monkeypatch.setattr(timing.PassTimer, "CAPACITY", 16)   # 8 passes per resolve
    model = _model(tmp_path, "qwen3", "nf4")
    times, prof = _timed_step(ctx, model, *_batch(model.config.vocab_size))
    passes = sum(n for _, n in times.values())
    assert passes > 8
    assert sum(sp.device == "gpu" for sp in prof.spans) == passes


@pytest.mark.parametrize("checkpointing", [False, True])
def test_default_gemm_path_follows_the_memory_choice(ctx, tmp_path, checkpointing):
    """Recomputing layers mean memory is short: the default GEMM path then dequantizes in the
    tile loads and holds no fp32 weight scratch; otherwise the scratch + fp32 GEMM path."""
    model = _model(tmp_path, "qwen3", "nf4")
    engine = gpu_twin(model, ctx, gradient_checkpointing=checkpointing)
    assert engine.device.fused is checkpointing
    assert (engine.device.scratch_w.buf is None) is checkpointing
