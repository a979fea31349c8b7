"""Hostile model and adapter files: every field read is type-checked (booleans are JSON
booleans, integers are integers in a sane range), sizes are checked against the machine's RAM
before anything is allocated, duplicate names and overflowing shapes are refused, and deeply
nested JSON in any file is a ValueError naming the file — never a traceback of another type,
a silent misreading, or minutes of work."""
import json
import os
import struct

import numpy as np
import pytest

from model_factory import gguf_from_hf, make_tiny_checkpoint, write_gguf
from qlora_ext import _native
from qlora_ext.model.config import ModelConfig
from qlora_ext.model.gguf import GGUFFile
from qlora_ext.model.loading import load_state
from qlora_ext.model.lora import LoraConfig, LoraWeights, load_peft_adapter, save_peft_adapter
from qlora_ext.model.safetensors_io import read_header, save_file

DEEP = "[" * 200_000 + "]" * 200_000


@pytest.fixture
def ckpt(tmp_path):
    return make_tiny_checkpoint(tmp_path / "m", "qwen3")


def _edit_config(d, **change):
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    cfg.update(change)
    with open(p, "w") as f:
        json.dump(cfg, f)
    return p


@pytest.mark.parametrize("key, value, message", [
    ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false"),
    ("attention_bias", 1, "attention_bias must be true or false"),
    ("num_hidden_layers", 1e8, "num_hidden_layers must be a positive integer"),
    ("num_hidden_layers", 100_000_000, "num_hidden_layers must be a positive integer"),
    ("max_position_embeddings", 1e15, "max_position_embeddings must be a positive integer"),
    ("max_position_embeddings", 10**15, "max_position_embeddings must be a positive integer"),
    ("hidden_size", "64", "hidden_size must be a positive integer"),
    ("vocab_size", True, "vocab_size must be a positive integer"),
    ("num_key_value_heads", 0, "num_key_value_heads must be a positive integer"),
    ("head_dim", 24.0, "head_dim must be a positive integer"),
    ("rms_norm_eps", "1e-6", "rms_norm_eps must be a positive number"),
    ("rope_theta", [10000], "rope_theta must be a positive number"),
    ("rope_parameters", [1], "rope_parameters must be an object"),
    ("rope_scaling", {"rope_type": "linear", "factor": True}, "rope_scaling.factor"),
    ("model_type", ["qwen3"], "model_type"),
    ("hidden_act", "gelu", "hidden_act 'gelu' is not supported"),
    ("bos_token_id", "1", "bos_token_id must be a token id"),
    ("eos_token_id", [2, "3"], "eos_token_id must be a token id"),
    ("pad_token_id", -1, "pad_token_id must be a token id"),
])
def test_config_field_types_and_ranges(ckpt, key, value, message):
    p = _edit_config(ckpt, **{key: value})
    with pytest.raises(ValueError, match=message) as e:
        load_state(ckpt, progress=False)
    assert "config.json" in str(e.value)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_file(p)


def test_config_string_false_was_read_as_true(ckpt):
    """The case that used to load: bool("false") is True."""
    _edit_config(ckpt, tie_word_embeddings=False)
    assert load_state(ckpt, progress=False).config.tie_word_embeddings is False


@pytest.mark.parametrize("text, message", [
    (DEEP, "nested too deeply"), ('{"a": 1, "a": 2}', "key 'a' appears twice"),
    ('{"rope_theta": NaN}', "NaN is not valid JSON"), ('{"rope_theta": 1e400}', "overflows to infinity"),
    ("\xff", "not valid JSON"),
])
def test_config_json_strictness(ckpt, text, message):
    with open(os.path.join(ckpt, "config.json"), "w", encoding="utf-8") as f:
        f.write(text)
    with pytest.raises(ValueError, match=message) as e:
        load_state(ckpt, progress=False)
    assert "config.json" in str(e.value)


def test_sizes_checked_against_ram_before_loading(ckpt, monkeypatch):
    """A config within the integer limits that the machine cannot hold fails at once, naming
    the key that costs the most; what fits still loads."""
    monkeypatch.setattr(_native, "available_memory", lambda: 64 << 20)
    assert load_state(ckpt, progress=False).config.num_hidden_layers == 2
    for key, value in [("num_hidden_layers", 4000), ("vocab_size", 1 << 24), ("max_position_embeddings", 1 << 26)]:
        _edit_config(ckpt, **{key: value})
        with pytest.raises(ValueError, match=f"{key}={value}.*RAM") as e:
            load_state(ckpt, progress=False)
        assert "config.json" in str(e.value)
        _edit_config(ckpt, **{key: {"num_hidden_layers": 2, "vocab_size": 101, "max_position_embeddings": 128}[key]})


def test_gguf_metadata_types_and_sizes(tmp_path, monkeypatch):
    d = make_tiny_checkpoint(tmp_path / "hf", "llama")
    for key, value, message in [
        ("llama.block_count", "2", "llama.block_count must be a non-negative integer"),
        ("llama.attention.head_count_kv", [2, 2], "llama.attention.head_count_kv must be"),
        ("llama.rope.freq_base", "1e4", "llama.rope.freq_base must be a finite number"),
        ("llama.context_length", 10**15, "max_position_embeddings must be a positive integer"),
        ("tokenizer.ggml.eos_token_id", "2", "tokenizer.ggml.eos_token_id must be"),
    ]:
        g = gguf_from_hf(d, tmp_path / "m.gguf", extra_metadata={key: value})
        with pytest.raises(ValueError, match=message) as e:
            load_state(g, progress=False)
        assert "m.gguf" in str(e.value)
    monkeypatch.setattr(_native, "available_memory", lambda: 1 << 20)
    g = gguf_from_hf(d, tmp_path / "m.gguf", extra_metadata={"llama.block_count": 4000})
    with pytest.raises(ValueError, match="num_hidden_layers=4000.*RAM"):
        load_state(g, progress=False)


def test_gguf_duplicate_metadata_key_and_deep_arrays(tmp_path):
    p = write_gguf(tmp_path / "d.gguf", {"a": 1, "b": 2}, {})
    data = open(p, "rb").read()
    (tmp_path / "dup.gguf").write_bytes(data.replace(b"\x01\x00\x00\x00\x00\x00\x00\x00b", b"\x01\x00\x00\x00\x00\x00\x00\x00a"))
    with pytest.raises(ValueError, match="'a' appears twice"):
        GGUFFile(tmp_path / "dup.gguf")
    # 10000 arrays nested in each other: one array header each (type 9, count 1)
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9)
    nest = struct.pack("<IQ", 9, 1) * 10000 + struct.pack("<IQ", 4, 0)
    (tmp_path / "deep.gguf").write_bytes(head + nest)
    with pytest.raises(ValueError, match="nested more than"):
        GGUFFile(tmp_path / "deep.gguf")


def test_gguf_dims_overflowing_int64(tmp_path):
    x = np.zeros(32, np.float32)
    p = write_gguf(tmp_path / "o.gguf", {}, {"t": ("F32", (1, 32), x.tobytes())})
    data = bytearray(open(p, "rb").read())
    i = data.index(struct.pack("<QQ", 32, 1))
    for dims in [(2**32, 2**32), (0, 2**64 - 1), (2**63, 1)]:
        data[i:i + 16] = struct.pack("<QQ", *dims)
        (tmp_path / "bad.gguf").write_bytes(bytes(data))
        with pytest.raises(ValueError, match="'t'"):
            GGUFFile(tmp_path / "bad.gguf")


def _raw_safetensors(path, header: str, data: bytes = b""):
    raw = header.encode("utf-8")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def test_safetensors_duplicate_names_and_overflowing_shapes(tmp_path):
    p = tmp_path / "t.safetensors"
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    _raw_safetensors(p, f'{{"w": {entry}, "w": {entry}}}', bytes(4))
    with pytest.raises(ValueError, match="'w' appears twice") as e:
        read_header(p)
    assert "t.safetensors" in str(e.value)
    for shape in ([2**62, 4], [2**32, 2**32, 4], [0, 2**64], [2**63]):
        _raw_safetensors(p, json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}))
        with pytest.raises(ValueError, match="overflows int64"):
            read_header(p)
    _raw_safetensors(p, DEEP)
    with pytest.raises(ValueError, match="nested too deeply"):
        read_header(p)


def test_shard_index_strictness(tmp_path):
    d = make_tiny_checkpoint(tmp_path / "m", "llama", sharded=True)
    index = os.path.join(d, "model.safetensors.index.json")
    for text, message in [(DEEP, "nested too deeply"), ("[1, 2]", "weight_map"),
                          ('{"weight_map": {"a": "x", "a": "y"}}', "appears twice")]:
        with open(index, "w") as f:
            f.write(text)
        with pytest.raises(ValueError, match=message) as e:
            load_state(d, progress=False)
        assert "index.json" in str(e.value)


# ---- adapters ----

def _shapes(L=2, H=12, I=20):
    s = {"q_proj": (12, H), "k_proj": (4, H), "v_proj": (4, H), "o_proj": (H, 12),
         "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    return [dict(s) for _ in range(L)]


@pytest.fixture
def adapter(tmp_path):
    save_peft_adapter(tmp_path, LoraWeights.init(LoraConfig(r=2), _shapes()))
    return tmp_path


def _edit_adapter(d, **change):
    p = os.path.join(d, "adapter_config.json")
    cfg = json.load(open(p))
    cfg.update(change)
    with open(p, "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("key, value, message", [
    ("use_rslora", "false", "use_rslora must be true or false"),
    ("use_rslora", 0, "use_rslora must be true or false"),
    ("r", 16.7, "r must be a positive integer"),
    ("r", "2", "r must be a positive integer"),
    ("r", True, "r must be a positive integer"),
    ("r", 0, "r must be a positive integer"),
    ("lora_alpha", "16", "lora_alpha must be a number"),
    ("lora_dropout", None, "lora_dropout must be a number"),
    ("fan_in_fan_out", True, "fan_in_fan_out=true is not supported"),
    ("use_dora", True, "use_dora=true is not supported"),
    ("use_dora", "no", "use_dora must be true or false"),
    ("target_modules", ["q_proj", 3], "target_modules must be a list"),
])
def test_adapter_config_field_types(adapter, key, value, message):
    _edit_adapter(adapter, **{key: value})
    with pytest.raises(ValueError, match=message) as e:
        load_peft_adapter(adapter, _shapes())
    assert "adapter_config.json" in str(e.value)


def test_adapter_config_json_strictness(adapter):
    p = os.path.join(adapter, "adapter_config.json")
    for text, message in [(DEEP, "nested too deeply"), ('{"r": 2, "r": 4}', "'r' appears twice"),
                          ('{"r": Infinity}', "Infinity is not valid JSON")]:
        with open(p, "w") as f:
            f.write(text)
        with pytest.raises(ValueError, match=message) as e:
            load_peft_adapter(adapter, _shapes())
        assert "adapter_config.json" in str(e.value)


def test_duplicate_adapter_tensors(adapter):
    """One tensor under its name and the '.default' form of it: the second used to replace the
    first silently."""
    from qlora_ext.model.safetensors_io import SafetensorsFile

    p = os.path.join(adapter, "adapter_model.safetensors")
    with SafetensorsFile(p) as f:
        tensors = {n: f.get(n) for n in f.keys()}
    name = next(iter(tensors))
    tensors[name.replace(".weight", ".default.weight")] = tensors[name] + 1
    save_file(tensors, p)
    with pytest.raises(ValueError, match="second lora_"):
        load_peft_adapter(adapter, _shapes())


def test_lora_rank_checked_against_ram(monkeypatch):
    with pytest.raises(ValueError, match=r"r=1099511627776.*RAM"):
        LoraWeights.init(LoraConfig(r=2**40), _shapes())
    monkeypatch.setattr(_native, "available_memory", lambda: 1 << 20)
    with pytest.raises(ValueError, match="r=4096.*RAM"):
        LoraWeights.init(LoraConfig(r=4096), _shapes())
    for bad in (True, 16.7, "4"):
        with pytest.raises(ValueError, match="rank r"):
            LoraConfig(r=bad)
    for field, bad in (("alpha", float("nan")), ("alpha", "2"), ("use_rslora", "false")):
        with pytest.raises(ValueError, match=field):
            LoraConfig(**{field: bad})
