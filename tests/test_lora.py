"""LoRA adapters: PEFT-format save/load round trip, interop with PEFT both ways, bad files."""
import json
import os

import numpy as np
import pytest

from qlora_ext.model.lora import (LoraConfig, LoraWeights, load_peft_adapter, peft_name,
                                  save_peft_adapter)


def _shapes(L=2, H=12, I=20, q=12, kv=4):
    s = {"q_proj": (q, H), "k_proj": (kv, H), "v_proj": (kv, H), "o_proj": (H, q),
         "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    return [dict(s) for _ in range(L)]


def test_save_load_round_trip(tmp_path):
    shapes = _shapes()
    lw = LoraWeights.init(LoraConfig(r=3, alpha=7, target_modules=("q", "o", "up"), use_rslora=True), shapes, seed=4)
    for p in lw.pairs.values():
        p.B[...] = np.random.default_rng(0).standard_normal(p.B.shape)
    head = np.arange(30, dtype=np.float32).reshape(5, 6)
    save_peft_adapter(tmp_path, lw, base_model="tiny", lm_head=head)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 3 and cfg["target_modules"] == ["q_proj", "o_proj", "up_proj"]
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none" and cfg["use_rslora"] is True
    back, head2 = load_peft_adapter(tmp_path, shapes, lm_head_shape=(5, 6))
    assert back.config.r == 3 and back.config.alpha == 7 and back.config.use_rslora
    assert back.config.scale == pytest.approx(7 / np.sqrt(3))
    assert np.array_equal(head2, head)
    a, b = lw.named_parameters(), back.named_parameters()
    assert list(a) == list(b)
    for k in a:
        assert np.array_equal(a[k], b[k])


def test_bad_adapter_files(tmp_path):
    shapes = _shapes()
    with pytest.raises(OSError, match="adapter_config.json"):
        load_peft_adapter(tmp_path, shapes)
    lw = LoraWeights.init(LoraConfig(r=2), shapes)
    save_peft_adapter(tmp_path, lw)
    with pytest.raises(ValueError, match="expected \\(2, 20\\)"):        # wrong model: another hidden size
        load_peft_adapter(tmp_path, _shapes(H=20))
    with pytest.raises(ValueError, match="layer 1"):
        load_peft_adapter(tmp_path, _shapes(L=1))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="LORA"):
        load_peft_adapter(tmp_path, shapes)
    cfg["peft_type"] = "LORA"
    cfg["target_modules"] = ["q_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not in target_modules"):
        load_peft_adapter(tmp_path, shapes)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_peft_adapter(tmp_path, shapes)


def test_adapter_interop_with_peft(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from hf_reference import randomize_lora, state_from_hf, tiny_hf_model

    from qlora_ext.engine.model import Model

    hf = tiny_hf_model("qwen3", seed=8)
    model = Model(state_from_hf(hf), LoraConfig(r=4, alpha=16, target_modules=("q", "k", "gate", "down")))
    randomize_lora(model, seed=5)
    ids = np.random.default_rng(1).integers(0, 97, (1, 9))
    ours = model.forward(ids)

    # ours -> PEFT
    model.save_adapter(tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        theirs = pm(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(theirs - ours).max() <= 1e-4 * np.abs(ours).max()

    # PEFT -> ours: perturb PEFT's weights, save with PEFT, load into a model with another config
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.1)
    pm.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        theirs = pm(input_ids=torch.from_numpy(ids)).logits.numpy()
    other = Model(model.state, LoraConfig(r=2, alpha=2))
    other.load_adapter(tmp_path / "peft")
    assert other.lora_config.r == 4 and other.lora_config.alpha == 16
    assert set(other.lora_config.target_modules) == {"q_proj", "k_proj", "gate_proj", "down_proj"}
    assert other.lora.get(0, "v_proj") is None
    got = other.forward(ids)
    assert np.abs(got - theirs).max() <= 1e-4 * np.abs(theirs).max()
    assert os.path.exists(tmp_path / "ours" / "adapter_model.safetensors")
    assert peft_name(1, "down_proj", "B") in other.parameters()


def test_model_load_adapter_keeps_live_arrays(tmp_path):
    from model_factory import make_tiny_checkpoint

    from qlora_ext.api import load_model

    path = make_tiny_checkpoint(tmp_path / "ck", model_type="llama", seed=1)
    m = load_model(path, lora=LoraConfig(r=2, alpha=4), device="cpu", train_lm_head=True)
    live = m.parameters()
    saved = {k: np.random.default_rng(0).standard_normal(v.shape).astype(np.float32) for k, v in live.items()}
    m.set_parameters(saved)
    m.save_adapter(tmp_path / "a")
    m.set_parameters({k: np.zeros_like(v) for k, v in saved.items()})
    m.load_adapter(tmp_path / "a")
    after = m.parameters()
    for k in live:
        assert after[k] is live[k] and np.array_equal(live[k], saved[k]), k
