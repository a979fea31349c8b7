"""compute_dtype='bf16' for the frozen base's CPU products, on whole models and through the
command line: close to fp32 (loss 1e-2 relative, every LoRA grad 2e-2 of its largest entry, the
issue's bounds), yet not equal to it (the products really are bf16), at every SIMD level."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hf_reference import batch_with_padding, randomize_lora, rel_to_max
from model_factory import make_tiny_checkpoint

import qlora_ext
from qlora_ext.api import load_model
from qlora_ext.model.lora import LoraConfig

V = 97
SRC = str(Path(qlora_ext.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cd")
    return {t: make_tiny_checkpoint(root / t, model_type=t, seed=3, vocab_size=V) for t in ("qwen3", "qwen2", "llama")}


def _loss_grads(path, compute_dtype, **kw):
    model = load_model(path, lora=LoraConfig(r=4, alpha=8), quantize="nf4", device="cpu",
                       compute_dtype=compute_dtype, **kw)
    randomize_lora(model, seed=1)
    ids, labels, mask = batch_with_padding(0, vocab=V)
    return model, *model.loss_and_grads(ids, labels, mask)


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2", "llama"])
def test_bf16_products_stay_close_to_fp32(checkpoints, simd_level, model_type):
    _, loss32, g32 = _loss_grads(checkpoints[model_type], "fp32")
    model, loss16, g16 = _loss_grads(checkpoints[model_type], "bf16")
    assert model.lora_config.compute_dtype == "bf16"
    assert loss16 != loss32
    assert abs(loss16 - loss32) <= 1e-2 * abs(loss32)
    assert g16.keys() == g32.keys()
    for name in g32:
        assert rel_to_max(g16[name], g32[name]) <= 2e-2, name


def test_bf16_with_gradient_checkpointing_matches_without(checkpoints):
    """The recompute inside backward takes the same bf16 products as the forward."""
    _, loss_a, ga = _loss_grads(checkpoints["llama"], "bf16")
    _, loss_b, gb = _loss_grads(checkpoints["llama"], "bf16", gradient_checkpointing=True)
    assert loss_a == loss_b
    for name in ga:
        np.testing.assert_allclose(ga[name], gb[name], rtol=1e-5, atol=1e-6 * np.abs(ga[name]).max())



def test_load_adapter_keeps_the_models_compute_dtype(checkpoints, tmp_path):
    """A PEFT adapter file carries no compute dtype: loading one into a bf16 model keeps the
    model's bf16 products (the loss after loading equals the loss before saving)."""
    model, loss16, _ = _loss_grads(checkpoints["qwen3"], "bf16")
    model.save_adapter(tmp_path / "a")
    fresh = load_model(checkpoints["qwen3"], lora=LoraConfig(r=4, alpha=8), quantize="nf4", device="cpu",
                       compute_dtype="bf16")
    fresh.load_adapter(tmp_path / "a")
    assert fresh.lora_config.compute_dtype == "bf16"
    ids, labels, mask = batch_with_padding(0, vocab=V)
    assert fresh.loss_and_grads(ids, labels, mask)[0] == loss16

def _cli(*args):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), QLORA_EXT_PROGRESS="0")
    return subprocess.run([sys.executable, "-m", "qlora_ext.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_compute_dtype(tmp_path):
    pytest.importorskip("tokenizers")
    model = make_tiny_checkpoint(tmp_path / "model", model_type="llama")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"add {i} 2:", "completion": f" {i + 2}"}) + "\n"
                            for i in range(12)))
    common = ["--model", model, "--data", data, "--steps", 2, "--seq-len", 32, "--batch-size", 2,
              "--lora-rank", 4, "--threads", 1, "--device", "cpu"]
    r = _cli("train", *common, "--out", tmp_path / "bf16", "--compute-dtype", "bf16")
    assert r.returncode == 0, r.stderr
    assert "base products: bf16 (" in r.stdout
    settings = json.loads((tmp_path / "bf16" / "checkpoint-2" / "trainer_state.json").read_text())["run"]
    assert settings["compute_dtype"] == "bf16"  # kept for --resume
    r32 = _cli("train", *common, "--out", tmp_path / "fp32")
    assert r32.returncode == 0 and "base products: fp32 (exact" in r32.stdout, r32.stderr
    ev = _cli("eval", "--model", model, "--adapter", tmp_path / "bf16", "--data", data, "--quiet",
              "--device", "cpu", "--compute-dtype", "bf16")
    assert ev.returncode == 0 and "perplexity" in ev.stdout, ev.stderr
    gen = _cli("generate", "--model", model, "--prompt", "add 3 2:", "--max-new-tokens", 3, "--quiet",
               "--device", "cpu", "--compute-dtype", "bf16")
    assert gen.returncode == 0, gen.stderr
    bad = _cli("train", *common, "--out", tmp_path / "bad", "--compute-dtype", "fp16")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--compute-dtype" in bad.stderr
