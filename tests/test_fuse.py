"""Fuse and export: the fused HF directory against transformers, the fused GGUF and the
adapter GGUF read back through the `gguf` package and our own reader, the CLI commands,
and (where llama-cpp-python is importable) llama.cpp itself."""
import json
import os

import numpy as np
import pytest

from hf_reference import randomize_lora
from model_factory import SPECIALS, make_tiny_checkpoint

import qlora_ext as qx
from qlora_ext.model.fuse import BaseCheckpoint, merge
from qlora_ext.model.gguf import GGUFFile
from qlora_ext.model.gguf_export import read_adapter_gguf, write_adapter_gguf
from qlora_ext.model.safetensors_io import SafetensorsFile

IDS = np.array([[1, 5, 9, 20, 33, 7, 8, 250, 99], [3, 4, 150, 6, 7, 8, 9, 10, 11]])
V = 300  # byte-level vocabulary: 3 specials, 256 bytes, merges


def byte_level_tokenizer_json() -> str:
    """A GPT-2 style byte-level BPE (what Qwen/SmolLM ship), so the GGUF tokenizer metadata
    has a llama.cpp form."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    vocab = {t: i for i, t in enumerate(SPECIALS + pre_tokenizers.ByteLevel.alphabet())}
    merges = []
    for a, b in [("t", "h"), ("th", "e"), ("Ġ", "t"), ("i", "n"), ("a", "n"), ("Ġ", "a"), ("e", "r")]:
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok.to_str()


def checkpoint(path, model_type, **kw):
    d = make_tiny_checkpoint(path, model_type=model_type, seed=3, vocab_size=V, **kw)
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        f.write(byte_level_tokenizer_json())
    return d


def trained(base, adapter_dir, quantize=None, **lora):
    model = qx.load_model(base, lora=qx.LoraConfig(**{"r": 4, "alpha": 8, **lora}), quantize=quantize, device="cpu")
    randomize_lora(model, seed=1)
    model.save_adapter(adapter_dir)
    return model


def hf_logits(d, ids=IDS):
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.numpy()


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("model_type,rslora", [("qwen3", False), ("qwen2", True), ("llama", False)])
def test_fused_dir_matches_adapter_in_transformers(tmp_path, model_type, rslora):
    pytest.importorskip("transformers")
    base = checkpoint(tmp_path / "base", model_type)
    model = trained(base, tmp_path / "adapter", use_rslora=rslora)
    out = qx.fuse(base, tmp_path / "adapter", out=tmp_path / "fused", max_shard_size=40_000)["out"]
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1  # sharded, as asked
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(os.listdir(out))
    # fp32 rounding only: the fused weights are W + s·BA rounded once, the adapter model sums
    # W x and s·B(A x) in its own order; the qwen2 + rsLoRA case measured 1.03e-5 (AVX-512
    # kernels) and above 1e-5 with numpy's products too
    assert rel(hf_logits(out), model.forward(IDS)) <= 3e-5


def test_fuse_keeps_bf16_and_touches_only_adapted_weights(tmp_path):
    base = checkpoint(tmp_path / "base", "qwen3", dtype="bfloat16")
    model = trained(base, tmp_path / "adapter", target_modules=("q", "down"))
    out = qx.fuse(base, tmp_path / "adapter", out=tmp_path / "fused")["out"]
    with SafetensorsFile(os.path.join(base, "model.safetensors")) as src, \
            SafetensorsFile(os.path.join(out, "model.safetensors")) as dst:
        assert set(dst.keys()) == set(src.keys())
        for name in src.keys():
            assert dst.info(name)["dtype"] == "BF16"
            if name.endswith(("q_proj.weight", "down_proj.weight")):
                layer, proj = int(name.split(".")[2]), name.split(".")[-2]
                pair = model.lora.get(layer, proj)
                want = merge(src.get(name), pair.A, pair.B, pair.scale)
                from qlora_ext.model.safetensors_io import f32_to_bf16_bits

                assert np.array_equal(dst.get_raw(name), f32_to_bf16_bits(want))
                assert not np.array_equal(dst.get_raw(name), src.get_raw(name))
            else:
                assert np.array_equal(dst.get_raw(name), src.get_raw(name))


def test_dequantize_merges_into_the_nf4_base(tmp_path):
    base = checkpoint(tmp_path / "base", "llama")
    model = trained(base, tmp_path / "adapter", quantize="nf4")
    out = qx.fuse(base, tmp_path / "adapter", out=tmp_path / "fused", dequantize=True)["out"]
    fused = qx.load_model(out, quantize=None, device="cpu")
    assert rel(fused.forward(IDS), model.forward(IDS)) <= 1e-5
    # and Model.fuse() returns the same fused projections in memory
    arrays = model.fuse()
    with SafetensorsFile(os.path.join(out, "model.safetensors")) as f:
        assert set(arrays) == {k for k in f.keys() if k.endswith("_proj.weight")}
        for name, w in arrays.items():
            np.testing.assert_array_equal(w, f.get(name))


def test_model_fuse_writes_from_the_original_weights(tmp_path):
    base = checkpoint(tmp_path / "base", "qwen2")
    model = trained(base, tmp_path / "adapter", quantize="nf4")
    model.fuse(tmp_path / "fused")
    qx.fuse(base, tmp_path / "adapter", out=tmp_path / "fused2")
    with SafetensorsFile(tmp_path / "fused" / "model.safetensors") as a, \
            SafetensorsFile(tmp_path / "fused2" / "model.safetensors") as b:
        for name in a.keys():
            np.testing.assert_array_equal(a.get(name), b.get(name))


def test_trained_lm_head_unties_the_fused_model(tmp_path):
    pytest.importorskip("transformers")
    base = checkpoint(tmp_path / "base", "llama")  # tied embeddings
    model = qx.load_model(base, lora=qx.LoraConfig(r=2, alpha=4), quantize=None, device="cpu", train_lm_head=True)
    randomize_lora(model, seed=2)
    model.lm_head += 0.01
    model.save_adapter(tmp_path / "adapter")
    out = qx.fuse(base, tmp_path / "adapter", out=tmp_path / "fused")["out"]
    assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is False
    # fp32 rounding only: the fused weights are W + s·BA rounded once, the adapter model sums
    # W x and s·B(A x) in its own order; the qwen2 + rsLoRA case measured 1.03e-5 (AVX-512
    # kernels) and above 1e-5 with numpy's products too
    assert rel(hf_logits(out), model.forward(IDS)) <= 3e-5
    with pytest.raises(ValueError, match="LM head"):
        write_adapter_gguf(tmp_path / "a.gguf", model.lora, model.config, lm_head=model.lm_head)


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2", "llama"])
def test_fused_gguf_reads_back_through_gguf_package_and_ours(tmp_path, model_type):
    gguf = pytest.importorskip("gguf")
    base = checkpoint(tmp_path / "base", model_type)
    model = trained(base, tmp_path / "adapter")
    path = qx.fuse(base, tmp_path / "adapter", gguf=tmp_path / "fused.gguf", outtype="f32")["gguf"]
    ours = qx.load_model(path, quantize=None, device="cpu")
    assert rel(ours.forward(IDS), model.forward(IDS)) <= 1e-5
    reader = gguf.GGUFReader(path)
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == model_type
    with GGUFFile(path) as g:
        assert g.metadata["tokenizer.ggml.model"] == "gpt2" and g.metadata["tokenizer.ggml.pre"] == "gpt-2"
        for t in reader.tensors:
            np.testing.assert_array_equal(np.asarray(t.data).reshape(g.info(t.name).shape), g.get(t.name))
    # the tokenizer travels: the GGUF's rebuilds the HF directory's encoding
    text = "<|im_start|>the answer: 42 and then some\n"
    assert ours.tokenizer.encode(text) == model.tokenizer.encode(text)


@pytest.mark.parametrize("outtype,tol", [("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 3e-2)])
def test_fused_gguf_outtypes(tmp_path, outtype, tol):
    base = checkpoint(tmp_path / "base", "qwen3")
    model = trained(base, tmp_path / "adapter")
    path = qx.fuse(base, tmp_path / "adapter", gguf=tmp_path / "f.gguf", outtype=outtype)["gguf"]
    with GGUFFile(path) as g:
        want = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[outtype]
        assert g.info("blk.0.ffn_down.weight").type_name == want
        assert g.info("blk.0.attn_norm.weight").type_name == "F32"
    assert rel(qx.load_model(path, quantize=None, device="cpu").forward(IDS), model.forward(IDS)) <= tol


def test_fuse_from_a_gguf_base_with_llama3_rope(tmp_path):
    """A GGUF base (llama: Q/K permuted in the file) fused to an HF directory and to GGUF."""
    pytest.importorskip("transformers")
    from model_factory import gguf_from_hf

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    hf_dir = checkpoint(tmp_path / "hf", "llama", rope_scaling=scaling)
    from qlora_ext.model.config import ModelConfig
    from qlora_ext.model.gguf_export import _rope_freqs

    gbase = gguf_from_hf(hf_dir, tmp_path / "base.gguf", rope_freqs=_rope_freqs(ModelConfig.from_file(
        os.path.join(hf_dir, "config.json"))), extra_metadata={"llama.rope.scaling.original_context_length": 32})
    model = trained(gbase, tmp_path / "adapter")
    res = qx.fuse(gbase, tmp_path / "adapter", out=tmp_path / "fused", gguf=tmp_path / "fused.gguf", outtype="f32")
    assert rel(hf_logits(res["out"]), model.forward(IDS)) <= 1e-5
    again = qx.load_model(res["gguf"], quantize=None, device="cpu")
    assert again.config.rope_scaling["factor"] == 8.0
    assert rel(again.forward(IDS), model.forward(IDS)) <= 1e-5


@pytest.mark.parametrize("model_type,rslora", [("llama", False), ("qwen3", True)])
def test_adapter_gguf_round_trip(tmp_path, model_type, rslora):
    gguf = pytest.importorskip("gguf")
    base = checkpoint(tmp_path / "base", model_type)
    model = trained(base, tmp_path / "adapter", r=3, alpha=5, use_rslora=rslora, target_modules=("q", "k", "o", "up"))
    path = write_adapter_gguf(tmp_path / "lora.gguf", model.lora, model.config)
    # the gguf package's view: llama.cpp's keys and names
    reader = gguf.GGUFReader(path)

    def value(key):
        f = reader.fields[key]
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else float(v[0])

    assert value("general.type") == "adapter" and value("adapter.type") == "lora"
    assert value("general.architecture") == model_type
    assert value("adapter.lora.alpha") == pytest.approx(5 * (np.sqrt(3) if rslora else 1), rel=1e-6)
    names = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    assert names["blk.1.attn_q.weight.lora_a"] == (64, 3)  # ggml order: [in, r]
    assert names["blk.1.ffn_up.weight.lora_b"] == (3, 96)  # [r, out]
    assert len(names) == 2 * 4 * 2
    # our reader: the same adapter, so the same logits
    lora = read_adapter_gguf(path, model.config)
    other = qx.load_model(base, lora=lora.config, quantize=None, device="cpu")
    other.set_parameters(lora.named_parameters())
    assert rel(other.forward(IDS), model.forward(IDS)) <= 1e-6
    # the gguf package's tensors, mapped back by hand (llama: lora_b rows of Q/K un-permuted)
    from qlora_ext.model.gguf import unpermute_qk
    from qlora_ext.model.lora import peft_name

    short = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_output": "o_proj", "ffn_up": "up_proj"}
    params = {}
    for t in reader.tensors:
        _, layer, kind, _, which = t.name.split(".")
        w = np.asarray(t.data, dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
        proj = short[kind]
        if which == "lora_b" and model_type == "llama" and proj in ("q_proj", "k_proj"):
            w = unpermute_qk(w, 4 if proj == "q_proj" else 2)
        params[peft_name(int(layer), proj, "A" if which == "lora_a" else "B")] = w
    other.set_parameters(params)
    assert rel(other.forward(IDS), model.forward(IDS)) <= 1e-6


def test_adapter_gguf_applies_to_a_gguf_base(tmp_path):
    """llama: lora_b rows of Q/K are permuted like the base's; base GGUF + adapter GGUF read
    through our loader give the adapted model's logits."""
    from model_factory import gguf_from_hf

    base = checkpoint(tmp_path / "base", "llama")
    model = trained(base, tmp_path / "adapter")
    gbase = gguf_from_hf(base, tmp_path / "base.gguf")
    path = write_adapter_gguf(tmp_path / "lora.gguf", model.lora, model.config, outtype="f32")
    on_gguf = qx.load_model(gbase, lora=model.lora.config, quantize=None, device="cpu")
    on_gguf.set_parameters(read_adapter_gguf(path, on_gguf.config).named_parameters())
    assert rel(on_gguf.forward(IDS), model.forward(IDS)) <= 1e-5


def test_errors_name_what_is_wrong(tmp_path):
    base = checkpoint(tmp_path / "base", "qwen3")
    trained(base, tmp_path / "adapter")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(OSError, match="taken.*not an empty directory"):
        qx.fuse(base, tmp_path / "adapter", out=tmp_path / "taken")
    other = checkpoint(tmp_path / "other", "qwen3", hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match="adapter_model.safetensors.*shape"):
        qx.fuse(other, tmp_path / "adapter", out=tmp_path / "x")
    with pytest.raises(ValueError, match="outtype"):
        qx.fuse(base, tmp_path / "adapter", gguf=tmp_path / "x.gguf", outtype="q4_0")
    with pytest.raises(ValueError, match="out=DIR and/or gguf=FILE"):
        qx.fuse(base, tmp_path / "adapter")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.gguf").exists()
    with BaseCheckpoint(base) as b:
        assert b.dtype == "float32" and b.config.model_type == "qwen3"


def test_cli_fuse_and_export_adapter(tmp_path, capsys):
    from qlora_ext import cli

    base = checkpoint(tmp_path / "base", "qwen3")
    model = trained(base, tmp_path / "adapter")
    rc = cli.main(["fuse", "--model", base, "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "f"),
                   "--gguf", str(tmp_path / "f.gguf"), "--outtype", "f32", "--max-shard-size", "30KB"])
    out = capsys.readouterr().out
    assert rc == 0 and "from_pretrained" in out and "llama-cli" in out
    assert (tmp_path / "f" / "model.safetensors.index.json").exists()
    fused = qx.load_model(tmp_path / "f", quantize=None, device="cpu")
    assert rel(fused.forward(IDS), model.forward(IDS)) <= 1e-5
    # the adapter's base_model_name_or_path names the base: --model is optional
    rc = cli.main(["export-adapter", "--adapter", str(tmp_path / "adapter"), "--gguf", str(tmp_path / "a.gguf")])
    assert rc == 0 and "--lora" in capsys.readouterr().out
    assert cli.main(["fuse", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "f2"), "--quiet"]) == 0
    with SafetensorsFile(tmp_path / "f2" / "model.safetensors") as f:
        assert rel(f.get("model.layers.1.mlp.up_proj.weight"), fused.state.layers[1].weight("up_proj")) == 0
    assert read_adapter_gguf(tmp_path / "a.gguf", model.config).pairs.keys() == model.lora.pairs.keys()
    for argv, msg in [(["fuse", "--model", base, "--adapter", str(tmp_path / "adapter")], "--out DIR and/or --gguf"),
                      (["fuse", "--model", base, "--adapter", str(tmp_path / "adapter"), "--out",
                        str(tmp_path / "g"), "--max-shard-size", "lots"], "--max-shard-size"),
                      (["export-adapter", "--adapter", str(tmp_path / "nothing"), "--gguf", "x.gguf"], "base_model")]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1


def test_llama_cpp_runs_the_fused_and_adapter_gguf(tmp_path):
    """Optional: llama.cpp (through llama-cpp-python, when importable) on our files: the
    fused GGUF and base GGUF + adapter GGUF give our logits."""
    llama_cpp = pytest.importorskip("llama_cpp")

    base = checkpoint(tmp_path / "base", "qwen3")
    model = trained(base, tmp_path / "adapter")
    fused = qx.fuse(base, tmp_path / "adapter", gguf=tmp_path / "fused.gguf", outtype="f32")["gguf"]
    ids = [int(i) for i in IDS[0]]
    want = model.forward(IDS[:1])[0]

    def logits(path, lora=None):
        kw = {"lora_path": str(lora)} if lora else {}
        # an f32 KV cache: llama.cpp's default f16 cache alone moves the logits by ~4e-4
        kw.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, verbose=False, n_threads=1, **kw)
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)

    assert rel(logits(fused), want) <= 1e-4
    plain = tmp_path / "plain"  # B = 0: the fused GGUF of this adapter is the base
    qx.load_model(base, lora=model.lora.config, quantize=None, device="cpu").save_adapter(plain)
    base_gguf = qx.fuse(base, plain, gguf=tmp_path / "base.gguf", outtype="f32")["gguf"]
    adapter = write_adapter_gguf(tmp_path / "lora.gguf", model.lora, model.config)
    assert rel(logits(base_gguf, adapter), want) <= 1e-4
