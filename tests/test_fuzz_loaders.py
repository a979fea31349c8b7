"""Fuzzing the file readers with hypothesis, on a bounded budget (a few seconds each): the
safetensors and GGUF readers, config.json and adapter_config.json parsing.  Whatever the
bytes, the outcome is the documented error (ValueError or OSError) or a valid result —
never another exception type, a crash or a hang."""
import json
import os
import struct
import tempfile

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from model_factory import quantize_q8_0, write_gguf  # noqa: E402
from qlora_ext.model.config import ModelConfig  # noqa: E402
from qlora_ext.model.gguf import GGUFFile  # noqa: E402
from qlora_ext.model.lora import LoraConfig, LoraWeights, load_peft_adapter, save_peft_adapter  # noqa: E402
from qlora_ext.model.safetensors_io import SafetensorsFile, save_file  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DOCUMENTED = (ValueError, OSError)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12)


def _mutate(data: bytes, edits, cut):
    """Apply (position, byte) overwrites, then cut the tail to `cut` of its length."""
    b = bytearray(data)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b[:max(0, int(len(b) * cut))])


edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=6)
cuts = st.sampled_from([1.0, 1.0, 1.0, 0.9, 0.5, 0.1])


def _scratch():
    return tempfile.TemporaryDirectory(prefix="qlora-fuzz-")


# ---- safetensors ----

def _valid_safetensors(path):
    rng = np.random.default_rng(0)
    save_file({"a": rng.standard_normal((3, 5)).astype(np.float32), "b": np.ones(7, np.float16),
               "c": np.zeros((2, 0), np.float32)}, path, metadata={"format": "pt"})
    with open(path, "rb") as f:
        return f.read()


def _read_all_safetensors(path):
    try:
        with SafetensorsFile(path) as f:
            for name in f.keys():
                arr = f.get(name)
                assert arr.dtype == np.float32 and arr.shape == f.info(name)["shape"]
    except DOCUMENTED:
        pass


@FUZZ
@given(edits=edits, cut=cuts)
def test_fuzz_safetensors_mutated(edits, cut):
    with _scratch() as d:
        p = os.path.join(d, "m.safetensors")
        data = _valid_safetensors(p)
        with open(p, "wb") as f:
            f.write(_mutate(data, edits, cut))
        _read_all_safetensors(p)


entries = st.dictionaries(
    st.text(max_size=6),
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "BF16", "I8", 3]),
                           "shape": st.lists(st.integers(-1, 2**65), max_size=3) | json_values,
                           "data_offsets": st.lists(st.integers(-1, 64), min_size=2, max_size=2) | json_values}),
    max_size=3) | json_values


@FUZZ
@given(header=entries, data=st.binary(max_size=64))
def test_fuzz_safetensors_headers(header, data):
    with _scratch() as d:
        p = os.path.join(d, "h.safetensors")
        raw = json.dumps(header).encode()
        with open(p, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw + data)
        _read_all_safetensors(p)


# ---- GGUF ----

def _valid_gguf(path):
    x = np.arange(64, dtype=np.float32).reshape(2, 32)
    md = {"general.architecture": "llama", "llama.block_count": 1, "t.list": ["x", "yz"], "t.ints": [1, -2, 3],
          "t.flag": True, "t.f": 0.5}
    write_gguf(path, md, {"a": ("F32", x.shape, x.tobytes()), "b": ("Q8_0", (1, 32), quantize_q8_0(x[1])),
                          "c": ("F16", (2, 32), x.astype("<f2").tobytes())})
    with open(path, "rb") as f:
        return f.read()


@FUZZ
@given(edits=edits, cut=cuts)
def test_fuzz_gguf_mutated(edits, cut):
    with _scratch() as d:
        p = os.path.join(d, "m.gguf")
        data = _valid_gguf(p)
        with open(p, "wb") as f:
            f.write(_mutate(data, edits, cut))
        try:
            with GGUFFile(p) as g:
                for name in g.keys():
                    arr = g.get(name)
                    assert arr.dtype == np.float32 and arr.shape == g.info(name).shape
        except DOCUMENTED:
            pass


# ---- config.json ----

BASE_CONFIG = {"model_type": "qwen3", "vocab_size": 101, "hidden_size": 64, "intermediate_size": 96,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
               "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 128,
               "tie_word_embeddings": False, "rope_scaling": None, "eos_token_id": 2}


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(sorted(BASE_CONFIG) + ["rope_parameters", "hidden_act", "attention_bias"]),
                               json_values, max_size=4))
def test_fuzz_config(changes):
    try:
        c = ModelConfig.from_hf(dict(BASE_CONFIG, **changes), source="config.json")
    except ValueError as e:
        assert "config.json" in str(e)
        return
    assert isinstance(c.num_hidden_layers, int) and isinstance(c.tie_word_embeddings, bool)
    assert ModelConfig.from_hf(c.to_hf()) == c


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_fuzz_config_text(text):
    with _scratch() as d:
        p = os.path.join(d, "config.json")
        with open(p, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        try:
            ModelConfig.from_file(p)
        except DOCUMENTED:
            pass


# ---- adapter_config.json ----

SHAPES = [{"q_proj": (8, 8), "k_proj": (4, 8), "v_proj": (4, 8), "o_proj": (8, 8),
           "gate_proj": (12, 8), "up_proj": (12, 8), "down_proj": (8, 12)}]


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(["r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
                                                "peft_type", "bias", "fan_in_fan_out", "use_dora", "rank_pattern"]),
                               json_values, max_size=3))
def test_fuzz_adapter_config(changes):
    with _scratch() as d:
        save_peft_adapter(d, LoraWeights.init(LoraConfig(r=2, target_modules=("q", "v")), SHAPES))
        p = os.path.join(d, "adapter_config.json")
        with open(p) as f:
            cfg = json.load(f)
        cfg.update(changes)
        with open(p, "w") as f:
            json.dump(cfg, f)
        try:
            lw, _ = load_peft_adapter(d, SHAPES)
        except DOCUMENTED:
            return
        assert isinstance(lw.config.r, int) and isinstance(lw.config.use_rslora, bool)
