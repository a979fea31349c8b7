"""load_state on HF directories: weights equal to what transformers loads, NF4 state equal to
quantize_nf4 of those weights, tokenizer and chat template, memory report, progress bar, and
bad input named precisely."""
import json
import os

import numpy as np
import pytest

from model_factory import make_tiny_checkpoint, tiny_config, tiny_weights
from qlora_ext import NF4Tensor, dequantize_nf4, quantize_nf4
from qlora_ext.model.loading import load_state
from qlora_ext.model.lora import PROJECTIONS
from qlora_ext.model.safetensors_io import save_file
from qlora_ext.progress import Progress

MODULE = {p: "self_attn" if p in PROJECTIONS[:4] else "mlp" for p in PROJECTIONS}


def state_dict_of(st) -> dict:
    """HF-named float32 arrays of a quantize=None state."""
    sd = {"model.embed_tokens.weight": st.embed_tokens, "model.norm.weight": st.norm}
    if st.lm_head is not None:
        sd["lm_head.weight"] = st.lm_head
    for i, l in enumerate(st.layers):
        pre = f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"] = l.input_layernorm
        sd[pre + "post_attention_layernorm.weight"] = l.post_attention_layernorm
        for p, w in l.proj.items():
            sd[f"{pre}{MODULE[p]}.{p}.weight"] = w
        for p, b in l.bias.items():
            sd[f"{pre}self_attn.{p}.bias"] = b
        if l.q_norm is not None:
            sd[pre + "self_attn.q_norm.weight"] = l.q_norm
            sd[pre + "self_attn.k_norm.weight"] = l.k_norm
    return sd


@pytest.mark.parametrize("model_type, dtype, sharded, tie", [
    ("qwen3", "bfloat16", True, False), ("qwen2", "float32", False, True), ("llama", "float16", False, True),
    ("llama", "bfloat16", True, False),
])
def test_weights_equal_transformers(tmp_path, model_type, dtype, sharded, tie):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = make_tiny_checkpoint(tmp_path, model_type, dtype=dtype, sharded=sharded, tie_word_embeddings=tie,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    st = load_state(d, quantize=None, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ref = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ours = state_dict_of(st)
    if tie:
        np.testing.assert_array_equal(ref.pop("lm_head.weight"), st.lm_head_weight)
    assert sorted(ours) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    hc = model.config
    assert hc.head_dim == st.config.head_dim and hc.tie_word_embeddings == tie
    rp = getattr(hc, "rope_parameters", None) or hc.rope_scaling
    assert rp["rope_type"] == "llama3" and st.config.rope_scaling["factor"] == rp["factor"] == 8.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("double_quant, blocksize", [(False, 64), (True, 64), (False, 128)])
def test_nf4_state_equals_quantize_of_weights(tmp_path, dtype, double_quant, blocksize):
    d = make_tiny_checkpoint(tmp_path, "qwen3", dtype=dtype)
    ref = load_state(d, quantize=None, progress=False)
    st = load_state(d, quantize="nf4", double_quant=double_quant, blocksize=blocksize, progress=False)
    assert st.quantize == "nf4" and st.double_quant == double_quant and st.blocksize == blocksize
    for lr, ln in zip(ref.layers, st.layers):
        for p in PROJECTIONS:
            t = ln.proj[p]
            assert isinstance(t, NF4Tensor) and t.shape == lr.proj[p].shape and t.double_quant == double_quant
            q = quantize_nf4(lr.proj[p], blocksize=blocksize, double_quant=double_quant)
            np.testing.assert_array_equal(t.packed, q.packed)
            np.testing.assert_array_equal(t.absmax, q.absmax)
            out = np.empty(t.shape, np.float32)
            assert ln.weight(p, out=out) is out
            np.testing.assert_array_equal(out, dequantize_nf4(q))
        np.testing.assert_array_equal(ln.q_norm, lr.q_norm)
    np.testing.assert_array_equal(st.embed_tokens, ref.embed_tokens)


def test_fp32_weight_accessor(tmp_path):
    st = load_state(make_tiny_checkpoint(tmp_path, "llama"), quantize=None, progress=False)
    l = st.layers[1]
    assert l.weight("down_proj") is l.proj["down_proj"] and l.weight("down_proj").shape == (64, 96)
    out = np.zeros((64, 96), np.float32)
    np.testing.assert_array_equal(l.weight("down_proj", out=out), l.proj["down_proj"])
    with pytest.raises(KeyError, match="no projection 'w1'"):
        l.weight("w1")
    assert st.lm_head is None and st.lm_head_weight is st.embed_tokens  # llama tiny default: tied


def test_memory_report(tmp_path):
    d = make_tiny_checkpoint(tmp_path, "qwen2", tie_word_embeddings=False)
    c = tiny_config("qwen2", tie_word_embeddings=False)
    n_proj = sum(o * i for o, i in c.projection_shapes().values())
    st = load_state(d, progress=False)
    r = st.memory_report()
    # every projection's size is a multiple of 64 here, so blocks are full
    assert r["nf4_codes"] == c.num_hidden_layers * n_proj // 2
    assert r["absmax"] == c.num_hidden_layers * n_proj // 64 * 4
    assert r["embeddings"] == r["lm_head"] == 101 * 64 * 4
    assert r["norms"] == (2 * c.num_hidden_layers + 1) * 64 * 4
    assert r["biases"] == c.num_hidden_layers * (c.q_dim + 2 * c.kv_dim) * 4
    assert r["fp32_projections"] == 0
    assert r["total"] == sum(v for k, v in r.items() if k != "total")
    r32 = load_state(d, quantize=None, progress=False).memory_report()
    assert r32["fp32_projections"] == c.num_hidden_layers * n_proj * 4 and r32["nf4_codes"] == 0


def test_tokenizer_from_dir(tmp_path):
    st = load_state(make_tiny_checkpoint(tmp_path, "qwen3"), progress=False)
    tok = st.tokenizer
    assert tok.vocab_size == 101 and tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.pad_token_id == 0
    ids = tok.encode("the thin inner")
    assert tok.token_to_id("th") in ids and tok.decode(ids) == "the thin inner"
    assert tok.encode("<|im_start|>hi") == [1] + tok.encode("hi")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for s in ["the thin inner", "Hello, World! 123", "<|im_end|> x"]:
        assert tok.encode(s) == ref(s, add_special_tokens=False)["input_ids"]


def test_chat_template_is_sandboxed(tmp_path):
    d = make_tiny_checkpoint(tmp_path, "qwen3")
    cfg = json.load(open(os.path.join(d, "tokenizer_config.json")))
    cfg["chat_template"] = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"))
    tok = load_state(d, progress=False).tokenizer
    with pytest.raises(ValueError, match="chat template failed"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    cfg["chat_template"] = "{{ raise_exception('only user turns') }}"
    json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"))
    with pytest.raises(ValueError, match="only user turns"):
        load_state(d, progress=False).tokenizer.apply_chat_template([{"role": "user", "content": "x"}])


def test_no_tokenizer_is_none(tmp_path):
    d = make_tiny_checkpoint(tmp_path, "llama")
    os.unlink(os.path.join(d, "tokenizer.json"))
    assert load_state(d, progress=False).tokenizer is None


def test_progress_bar(tmp_path, capsys):
    d = make_tiny_checkpoint(tmp_path, "llama")
    load_state(d, progress=None)  # stderr is not a terminal under pytest: plain lines, no bar
    err = capsys.readouterr().err
    assert "tensors, done in" in err and "\r" not in err
    load_state(d, progress=True)
    assert "tensor" in capsys.readouterr().err
    with Progress(3, "x", enabled=False) as p:
        p.update(2)
        assert not p.enabled


# ---- bad input ----

def rewrite(d, fn):
    """Apply fn to the tiny checkpoint's weight dict and write it back."""
    c = tiny_config("qwen3")
    w = tiny_weights(c)
    fn(w)
    save_file(w, os.path.join(d, "model.safetensors"))


def test_missing_tensor(tmp_path):
    d = make_tiny_checkpoint(tmp_path, "qwen3")
    rewrite(d, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        load_state(d, progress=False)


def test_wrong_shape(tmp_path):
    d = make_tiny_checkpoint(tmp_path, "qwen3")
    rewrite(d, lambda w: w.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' "
                                         r"has shape \(64, 64\), expected \(48, 64\)"):
        load_state(d, progress=False)


def test_unexpected_tensor(tmp_path):
    d = make_tiny_checkpoint(tmp_path, "qwen3")
    rewrite(d, lambda w: w.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(96, np.float32),
                                   "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(12, np.float32)}))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        load_state(d, progress=False)


def test_truncated_shard(tmp_path):
    d = make_tiny_checkpoint(tmp_path, "qwen3", sharded=True)
    p = os.path.join(d, "model-00002-of-00003.safetensors")
    data = open(p, "rb").read()
    open(p, "wb").write(data[:-100])
    with pytest.raises(ValueError, match="model-00002-of-00003.safetensors: tensor .* out of bounds"):
        load_state(d, progress=False)


def test_index_errors(tmp_path):
    d = make_tiny_checkpoint(tmp_path, "qwen3", sharded=True)
    idx_path = os.path.join(d, "model.safetensors.index.json")
    idx = json.load(open(idx_path))
    good = json.loads(json.dumps(idx))
    idx["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    json.dump(idx, open(idx_path, "w"))
    with pytest.raises(OSError, match="model-00009-of-00009.safetensors: shard listed in .* not found"):
        load_state(d, progress=False)
    idx["weight_map"]["model.norm.weight"] = "../../etc/passwd"
    json.dump(idx, open(idx_path, "w"))
    with pytest.raises(ValueError, match="is not a file name in the directory"):
        load_state(d, progress=False)
    name = next(iter(good["weight_map"]))
    other = {f for f in good["weight_map"].values() if f != good["weight_map"][name]}.pop()
    good["weight_map"][name] = other
    json.dump(good, open(idx_path, "w"))
    with pytest.raises(ValueError, match=f"tensor '{name}' listed in the index is not in this shard"):
        load_state(d, progress=False)


def test_missing_files(tmp_path):
    with pytest.raises(OSError, match="no such file or directory"):
        load_state(tmp_path / "nothing", progress=False)
    d = make_tiny_checkpoint(tmp_path / "a", "qwen3")
    os.unlink(os.path.join(d, "model.safetensors"))
    with pytest.raises(OSError, match="no model.safetensors nor model.safetensors.index.json"):
        load_state(d, progress=False)
    open(os.path.join(d, "pytorch_model.bin"), "wb").write(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle"):
        load_state(d, progress=False)
    os.unlink(os.path.join(d, "config.json"))
    with pytest.raises(OSError, match="config.json: config file not found"):
        load_state(d, progress=False)


def test_bad_arguments_and_files(tmp_path):
    d = make_tiny_checkpoint(tmp_path / "a", "qwen3")
    with pytest.raises(ValueError, match="quantize must be 'nf4' or None"):
        load_state(d, quantize="int8", progress=False)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["model_type"] = "gemma"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match="config.json: model_type 'gemma' is not supported"):
        load_state(d, progress=False)
    p = tmp_path / "weights.bin"
    p.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ValueError, match="weights.bin: not a model directory .* nor a GGUF file"):
        load_state(p, progress=False)
