"""ModelConfig: config.json of each family (transformers 4 and 5 layouts), round trips,
and errors that name the key."""
import json

import pytest

from model_factory import tiny_config
from qlora_ext.model.config import ModelConfig

QWEN3_4B = {  # Qwen3-4B's config.json (the fields that matter)
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560,
    "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_scaling": None,
    "max_position_embeddings": 40960, "tie_word_embeddings": True, "attention_bias": False,
    "bos_token_id": 151643, "eos_token_id": 151645}
LLAMA3_8B = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
QWEN2 = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
         "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
         "rope_theta": 1000000.0, "tie_word_embeddings": True}
MISTRAL = {"model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None,
           "sliding_window": None, "rope_theta": 1000000.0}


def test_qwen3():
    c = ModelConfig.from_hf(QWEN3_4B)
    assert c.model_type == "qwen3" and c.qk_norm and not c.attention_bias
    assert c.head_dim == 128 and c.q_dim == 4096 and c.kv_dim == 1024
    assert c.projection_shapes()["o_proj"] == (2560, 4096) and c.tie_word_embeddings
    assert c.rope_theta == 1e6 and c.rope_scaling is None and c.eos_token_id == 151645


def test_llama3_rope_scaling_and_eos_list():
    c = ModelConfig.from_hf(LLAMA3_8B)
    assert c.head_dim == 128 and c.rope_type == "llama3" and c.rope_scaling["factor"] == 8.0
    assert c.eos_token_id == [128001, 128008, 128009] and not c.tie_word_embeddings and not c.qk_norm


def test_qwen2_has_qkv_bias():
    c = ModelConfig.from_hf(QWEN2)
    assert c.attention_bias and c.bias_names() == ("q_proj", "k_proj", "v_proj")
    assert c.head_dim == 64 and c.num_key_value_heads == 2


def test_mistral_maps_to_llama():
    c = ModelConfig.from_hf(MISTRAL)
    assert c.model_type == "llama" and c.head_dim == 128 and c.extra["sliding_window"] is None


def test_transformers5_rope_parameters():
    d = dict(LLAMA3_8B)
    rs = d.pop("rope_scaling")
    d.pop("rope_theta")
    d["rope_parameters"] = dict(rs, rope_theta=500000.0)
    c = ModelConfig.from_hf(d)
    assert c.rope_theta == 500000.0 and c.rope_type == "llama3" and "rope_theta" not in c.rope_scaling
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
    c = ModelConfig.from_hf(d)
    assert c.rope_theta == 1234.0 and c.rope_scaling is None


def test_legacy_type_key_and_linear():
    c = ModelConfig.from_hf(dict(QWEN2, rope_scaling={"type": "linear", "factor": 2.0}))
    assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("cfg", [QWEN3_4B, LLAMA3_8B, QWEN2, MISTRAL])
def test_to_hf_round_trip(cfg):
    c = ModelConfig.from_hf(cfg)
    assert ModelConfig.from_hf(json.loads(json.dumps(c.to_hf()))) == c


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2", "llama"])
def test_to_hf_loads_in_transformers(model_type):
    transformers = pytest.importorskip("transformers")
    c = tiny_config(model_type, rope_scaling={"rope_type": "linear", "factor": 2.0})
    hf = transformers.AutoConfig.for_model(**c.to_hf())
    assert type(hf).__name__.lower().startswith(model_type)
    assert hf.head_dim == c.head_dim and hf.num_key_value_heads == c.num_key_value_heads
    assert hf.tie_word_embeddings == c.tie_word_embeddings
    rp = getattr(hf, "rope_parameters", None) or {**(hf.rope_scaling or {}), "rope_theta": hf.rope_theta}
    assert rp["rope_theta"] == c.rope_theta and rp["rope_type"] == "linear" and rp["factor"] == 2.0
    # and what transformers writes back reads as the same config
    assert ModelConfig.from_hf(hf.to_dict()) == ModelConfig.from_hf(c.to_hf())


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"hidden_size": None}, "'hidden_size' is missing"),
    ({"num_key_value_heads": 5}, "multiple of num_key_value_heads"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor is required"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer"),
    ({"head_dim": 15}, "head_dim must be even"),
])
def test_errors_name_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(dict(QWEN3_4B, **change))


def test_from_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_4B))
    assert ModelConfig.from_file(tmp_path) == ModelConfig.from_hf(QWEN3_4B)
    with pytest.raises(OSError, match="not found"):
        ModelConfig.from_file(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{bad")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        ModelConfig.from_file(tmp_path)
