"""The gpu placement behind load_model(placement=...), the Trainer and `qlora-ext train`:
the automatic choice and its reason, the memory estimate it rests on, training through the
Trainer's device path against the CPU trainer (grad accumulation, clipping), and checkpoint
resume bit for bit.  Runs on lavapipe in CI (device="gpu" admits a software adapter)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from gpu_support import rel_err

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from model_factory import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("placement")
    out = {t: make_tiny_checkpoint(root / t, model_type=t, seed=4) for t in ("qwen3", "llama")}
    return out


def _load(path, placement, device="gpu", **kw):
    from qlora_ext.api import load_model
    from qlora_ext.model.lora import LoraConfig

    kw.setdefault("lora", LoraConfig(r=4, alpha=8))
    return load_model(path, placement=placement, device=device, **kw)


def _batches(V, n, B=2, T=11, seed=0):
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = g.integers(0, V, size=(B, T))
        labels = ids.copy()
        labels[0, : g.integers(1, T)] = -100
        out.append((ids, labels))
    return out


# ---- the choice -------------------------------------------------------------------------------
def test_gpu_when_asked(ctx, ckpt):
    from qlora_ext.engine.gpu_model import GpuModel

    m = _load(ckpt["qwen3"], "gpu")
    assert isinstance(m, GpuModel) and m.placement == "gpu" and "asked" in m.placement_reason
    s = _load(ckpt["qwen3"], "cpu")
    assert s.placement == "cpu" and not isinstance(s, GpuModel)


def test_auto_takes_gpu_only_with_the_memory(ctx, ckpt, monkeypatch):
    """Through load_model with the free memory set: everything on the GPU; the fewest layers
    recomputing that fit; the base streamed (checkpointing forced off); the split placement."""
    from qlora_ext.engine.gpu_memory import estimate_bytes
    from qlora_ext.placement import MARGIN_BYTES, MARGIN_FRACTION

    def with_free(nbytes, **kw):
        # (+1 KiB: the variable's GiB figure is a float; the steps between estimates are far larger)
        monkeypatch.setenv("QLORA_EXT_GPU_MEMORY_GIB", str((nbytes + 1024) / 2**30))
        return _load(ckpt["qwen3"], "auto", batch_shape=(2, 16), **kw)

    m = with_free(64 * 2**30)
    assert m.placement == "gpu" and "64.0 GiB free" in m.placement_reason and m.recompute_layers == 0
    assert m.device.streamed is None
    m = with_free(10**5)
    assert m.placement == "split" and "needs about" in m.placement_reason
    L = len(m.state.layers)
    need = lambda w, r: estimate_bytes(ctx, m.state, m.lora_config, 2, 16, r, weights=w)  # noqa: E731
    room = lambda b: b * (1 + MARGIN_FRACTION) + MARGIN_BYTES  # noqa: E731
    assert need("on GPU", L) < need("on GPU", 0) and need("streamed", 0) < need("on GPU", 0)
    m = with_free(room(need("on GPU", L)))   # fits only with every layer recomputing
    assert m.placement == "gpu" and m.recompute_layers == L and m.device.streamed is None
    assert f"{L} of {L} layers recompute" in m.placement_reason
    m = with_free(room(need("streamed", 0)), gradient_checkpointing=False)
    assert m.placement == "gpu" and m.recompute_layers == 0 and m.device.streamed is not None
    assert "per layer" in m.placement_reason and "no activation checkpointing (asked for)" in m.placement_reason
    monkeypatch.delenv("QLORA_EXT_GPU_MEMORY_GIB")
    if "nvidia" not in str(ctx.info["name"]).lower():
        m = _load(ckpt["qwen3"], "auto")   # lavapipe: wgpu reports no memory size
        assert m.placement == "split" and "QLORA_EXT_GPU_MEMORY_GIB" in m.placement_reason


def test_auto_on_cpu_and_refusals(ctx, ckpt, monkeypatch):
    from qlora_ext.model.lora import LoraConfig

    monkeypatch.setenv("QLORA_EXT_GPU_MEMORY_GIB", "64")
    assert _load(ckpt["qwen3"], "auto", device="cpu").placement == "cpu"
    with pytest.raises(ValueError, match="device='cpu'"):
        _load(ckpt["qwen3"], "gpu", device="cpu")
    assert _load(ckpt["qwen3"], "auto", lora=LoraConfig(r=2, dropout=0.1)).placement == "gpu"
    with pytest.raises(ValueError, match="placement must be"):
        _load(ckpt["qwen3"], "resident")
    from qlora_ext.gpu.runtime import pick_adapter

    if pick_adapter(allow_software=False) is None:   # only a software adapter here (lavapipe)
        for named in ("gpu", "split"):
            with pytest.raises(OSError, match="software adapters"):
                _load(ckpt["qwen3"], named, device="auto")


@pytest.mark.parametrize("model_type,recompute,head,weights", [
    ("qwen3", 0, False, "on GPU"), ("qwen3", True, True, "on GPU"), ("qwen3", 1, False, "on GPU"),
    ("llama", 0, False, "streamed")])
def test_memory_estimate_is_what_the_device_allocates(ctx, ckpt, model_type, recompute, head, weights):
    from qlora_ext.engine.gpu_memory import buffer_bytes, estimate_bytes
    from qlora_ext.engine.gpu_model import GpuModel
    from qlora_ext.train.trainer import TrainConfig, Trainer

    model = _load(ckpt[model_type], "cpu", quantize="nf4", train_lm_head=head)
    # estimated first, as the placement does: the context's scratch counts only where it grows
    R = len(model.state.layers) if recompute is True else int(recompute)
    need = estimate_bytes(ctx, model.state, model.lora_config, 3, 17, R, head, weights)
    before = ctx.allocated_bytes
    gpu = GpuModel(model.state, model.lora_config, ctx=ctx, gradient_checkpointing=recompute,
                   train_lm_head=head, weights=weights)
    Trainer(gpu, TrainConfig())    # its GpuAdamW's moments
    gpu.memory_report((3, 17))
    used = ctx.allocated_bytes - before
    # train's eval beside training: 32 prompts of 17 positions, the KV cache counted
    gen = gpu.device.generation_bytes(gpu.dims(32, 17), gpu.dims(32, 1))
    cfg = model.config
    Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    partials = 2 * buffer_bytes(4 * 3 * 17 * Hq * D) if Hq != Hkv else 0   # first GQA backward
    assert gpu.recompute_layers == R
    assert need == used + partials + gen


# ---- training through the Trainer ---------------------------------------------------------------
def _train(model, batches, accum, clip, lr=5e-3):
    from qlora_ext.train.trainer import TrainConfig, Trainer

    t = Trainer(model, TrainConfig(lr=lr, grad_clip=clip, weight_decay=0.01))
    losses, norms = [], []
    for i in range(0, len(batches), accum):
        losses.append(t.train_step(batches[i:i + accum]))
        norms.append(t.last_grad_norm)
    return t, losses, norms


@pytest.mark.parametrize("clip,dropout", [(None, 0.0), (0.05, 0.0), (0.05, 0.2)])
def test_trainer_device_path_matches_cpu_trainer(ctx, ckpt, clip, dropout):
    """Grad accumulation over unequal micro-batches, clipping active (0.05 < the norms),
    LoRA dropout (the same masks in both placements): losses, norms and weights as the CPU
    trainer's within float32 rounding."""
    from qlora_ext.model.lora import LoraConfig

    lora = LoraConfig(r=4, alpha=8, dropout=dropout)
    cpu = _load(ckpt["qwen3"], "cpu", lora=lora)
    gpu = _load(ckpt["qwen3"], "gpu", lora=lora)
    batches = _batches(cpu.config.vocab_size, 6)
    tc, lc, nc = _train(cpu, batches, 2, clip)
    tg, lg, ng = _train(gpu, batches, 2, clip)
    assert rel_err(lg, lc) <= 1e-5 and rel_err(ng, nc) <= 1e-4
    if clip:
        assert min(nc) > clip
    pc, pg = cpu.parameters(), gpu.parameters()
    assert list(pc) == list(pg)
    lr_steps = 5e-3 * 3
    for n in pc:
        # AdamW moves each weight by about lr per step whatever the gradient's size, so float32
        # differences of tiny gradients show up at the scale of lr: bound the difference by 1% of
        # the movement (a missed clip or scale would differ by about lr per step, 30x more).
        assert np.abs(pg[n] - pc[n]).max() <= 1e-2 * lr_steps, n
    assert tg.optimizer_state().keys() == tc.optimizer_state().keys()


def test_checkpoint_resume_is_bit_identical(ctx, ckpt, tmp_path):
    """fit() 4 updates unbroken == fit() 2, a fresh model restored from the checkpoint, fit() to 4."""
    from qlora_ext.train.checkpoint import latest_checkpoint
    from qlora_ext.train.data import DataLoader, Example
    from qlora_ext.train.loop import fit, restore
    from qlora_ext.train.trainer import TrainConfig, Trainer

    V = 97
    rows = [list(np.random.default_rng(i).integers(1, V, size=7 + i % 5)) for i in range(24)]
    examples = [Example([int(t) for t in r], [int(t) for t in r], i + 1) for i, r in enumerate(rows)]

    def run(out, stop_at, resume=False):
        model = _load(ckpt["qwen3"], "gpu")
        trainer = Trainer(model, TrainConfig(lr=1e-2, grad_accum=2, total_steps=4, schedule="linear"))
        loader = DataLoader(examples, 12, 4, seed=3, pad_id=0)
        if resume:
            restore(trainer, loader, latest_checkpoint(out))
        fit(trainer, loader, stop_at, 2, out_dir=out, save_every=1)
        return model.parameters(), trainer

    whole, tw = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed, tr = run(tmp_path / "b", 4, resume=True)
    assert tr.step_count == tw.step_count == 4
    for n in whole:
        np.testing.assert_array_equal(resumed[n], whole[n], err_msg=n)
    ow, orr = tw.optimizer_state(), tr.optimizer_state()
    for k in ow:
        np.testing.assert_array_equal(orr[k], ow[k], err_msg=k)


def test_cli_train_gpu_and_resume(ctx, ckpt, tmp_path):
    """`qlora-ext train --device gpu --placement gpu`: says so, trains, writes a PEFT adapter;
    an interrupted run (2 steps) resumed to 3 equals the unbroken 3-step run."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"item {i} is {i * 7 % 13} and more words"}) + "\n"
                            for i in range(16)))
    base = [sys.executable, "-m", "qlora_ext.cli", "train", "--model", ckpt["qwen3"], "--data", str(data),
            "--device", "gpu", "--placement", "gpu", "--batch-size", "2", "--seq-len", "16",
            "--lora-rank", "2", "--threads", "1", "--quiet"]

    def cli(*extra):
        r = subprocess.run(base + [str(e) for e in extra], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        return r

    cli("--out", tmp_path / "a", "--steps", 3)
    cli("--out", tmp_path / "b", "--steps", 2)
    r = subprocess.run([sys.executable, "-m", "qlora_ext.cli", "train", "--resume", str(tmp_path / "b"),
                        "--steps", "3"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "placement: gpu" in r.stdout   # the placement is a run setting: kept on resume
    from safetensors.numpy import load_file

    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(np.abs(v).max() > 0 for k, v in a.items() if "lora_B" in k)


def test_adapters_save_and_load_across_placements(ctx, ckpt, tmp_path):
    """An adapter trained in the gpu placement saves in PEFT format (the GPU's weights,
    not the stale host copy) and loads into a split model with the same forward; loading one
    of another rank rebuilds the device."""
    from qlora_ext.model.lora import LoraConfig
    from qlora_ext.train.trainer import TrainConfig, Trainer

    gpu = _load(ckpt["qwen3"], "gpu", lora=LoraConfig(r=4, alpha=8))
    t = Trainer(gpu, TrainConfig(lr=1e-2))
    for ids, labels in _batches(gpu.config.vocab_size, 2):
        t.step(ids, labels)
    gpu.save_adapter(tmp_path / "a")
    cpu = _load(ckpt["qwen3"], "cpu", lora=LoraConfig(r=4, alpha=8))
    cpu.load_adapter(tmp_path / "a")
    ids = _batches(gpu.config.vocab_size, 1, seed=7)[0][0]
    assert rel_err(gpu.forward(ids), cpu.forward(ids)) <= 1e-5
    assert any(np.abs(v).max() > 0 for k, v in cpu.parameters().items() if "lora_B" in k)
    other = _load(ckpt["qwen3"], "cpu", lora=LoraConfig(r=2, alpha=2))
    other.save_adapter(tmp_path / "r2")
    gpu.load_adapter(tmp_path / "r2")
    assert list(gpu.parameters()) == list(other.parameters())   # rebuilt for rank 2
    other.set_parameters({k: v + 0.01 for k, v in other.parameters().items()})
    gpu.set_parameters(other.parameters())
    assert rel_err(gpu.forward(ids), other.forward(ids)) <= 1e-5
