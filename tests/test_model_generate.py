"""Generation with the KV cache: equal to recomputing the whole sequence, and to HF greedy."""
import numpy as np
import pytest
from model_factory import make_tiny_checkpoint

from qlora_ext.api import load_model
from qlora_ext.model.lora import LoraConfig


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("g") / "qwen2", model_type="qwen2", seed=4)
    m = load_model(path, lora=LoraConfig(r=4, alpha=8), device="cpu")
    rng = np.random.default_rng(2)
    m.set_parameters({k: (0.3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in m.parameters().items()})
    return m


def test_greedy_matches_full_recompute(model):
    prompt = [5, 17, 33, 8, 61]
    got = model.generate(prompt, max_new_tokens=12, stop_ids=[])
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(np.argmax(model.forward(np.array(seq))[0, -1])))
    assert got == seq[len(prompt):]


def test_stop_sampling_and_errors(model):
    prompt = [3, 9, 27]
    greedy = model.generate(prompt, max_new_tokens=6, stop_ids=[])
    assert model.generate(prompt, max_new_tokens=6, stop_ids=[greedy[2]]) == greedy[:2]
    # a tiny nucleus keeps only the top token: sampling equals greedy
    assert model.generate(prompt, 6, temperature=1.0, top_p=1e-6, seed=1, stop_ids=[]) == greedy
    a = model.generate(prompt, 8, temperature=1.5, seed=7, stop_ids=[])
    assert a == model.generate(prompt, 8, temperature=1.5, seed=7, stop_ids=[]) and len(a) == 8
    assert model.generate(prompt, 0) == []
    with pytest.raises(ValueError, match="prompt_ids"):
        model.generate([], 3)
    with pytest.raises(ValueError, match="prompt_ids"):
        model.generate([10**6], 3)


def test_greedy_matches_hf_generate(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from hf_reference import hf_from_checkpoint, peft_twin

    path = make_tiny_checkpoint(tmp_path / "q3", model_type="qwen3", seed=6)
    m = load_model(path, lora=LoraConfig(r=2, alpha=4), quantize="nf4", device="cpu")
    rng = np.random.default_rng(3)
    m.set_parameters({k: (0.3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in m.parameters().items()})
    pm = peft_twin(hf_from_checkpoint(path, m.state), m)
    prompt = [7, 44, 12, 90]
    ours = m.generate(prompt, max_new_tokens=10, stop_ids=[])
    with torch.no_grad():
        ref = pm.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                          eos_token_id=None, pad_token_id=0, min_new_tokens=10)
    assert ours == ref[0, len(prompt):].tolist()


def test_batched_prompts_equal_one_at_a_time(model):
    """Prompts of different lengths decoded together give what each gives alone, and rows
    that stop early leave the others untouched."""
    prompts = [[5, 17, 33, 8, 61], [2], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [9, 9, 9]]
    alone = [model.generate(p, max_new_tokens=9, stop_ids=[]) for p in prompts]
    assert model.generate(prompts, max_new_tokens=9, stop_ids=[]) == alone
    stop = alone[0][3]
    alone_stop = [model.generate(p, max_new_tokens=9, stop_ids=[stop]) for p in prompts]
    assert model.generate(prompts, max_new_tokens=9, stop_ids=[stop]) == alone_stop
    assert len(alone_stop[0]) == 3
    # an int array [B, T] is a batch too
    assert model.generate(np.array([[3, 9, 27], [4, 4, 4]]), 5, stop_ids=[]) == \
        [model.generate([3, 9, 27], 5, stop_ids=[]), model.generate([4, 4, 4], 5, stop_ids=[])]


def test_batched_prompt_errors_name_the_row(model):
    with pytest.raises(ValueError, match=r"prompt_ids\[1\]"):
        model.generate([[1, 2], []], 3)
    with pytest.raises(ValueError, match=r"prompt_ids\[0\] must hold integer"):
        model.generate([[1.5, 2]], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate([1, 2], 10**12)
