"""Published chat templates (tests/chat_templates/): rendered as transformers renders them,
and the assistant masks built from one rendering are exactly the replies and their
end-of-turn tokens, for multi-turn conversations with and without a system prompt."""
import json
from pathlib import Path

import numpy as np
import pytest

from qlora_ext.train.data import IGNORE, DataError, load_examples

TEMPLATES = Path(__file__).with_name("chat_templates")
# template -> (bos token, end-of-turn token)
MODELS = {"qwen3": ("<|im_start|>", "<|im_end|>"), "qwen2.5": ("<|im_start|>", "<|im_end|>"),
          "llama3.2": ("<|begin_of_text|>", "<|eot_id|>"), "smollm2": ("<|im_start|>", "<|im_end|>"),
          "mistral": ("<s>", "</s>")}
EXTRA_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>"]

CONVERSATIONS = {
    "system, one turn": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}],
    "system, three turns": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Say yes."},
        {"role": "assistant", "content": "yes"},  # also occurs in the user turn before it
        {"role": "user", "content": "Two lines, please:"},
        {"role": "assistant", "content": "first line\nsecond line"},
        {"role": "user", "content": "And JSON?"},
        {"role": "assistant", "content": '{"name": "Mira", "age": 41}'}],
    "no system, two turns": [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "1, 2, 3"}],
}


@pytest.fixture(scope="module")
def base_backend():
    """The SmolLM2 GGUF's byte-level BPE (a real tokenizer with offsets), plus the special
    tokens of the other templates."""
    from tokenizers import AddedToken

    from qlora_ext.model.gguf import GGUFFile
    from qlora_ext.model.loading import resolve_model_path
    from qlora_ext.model.tokenizer import Tokenizer

    try:
        path = resolve_model_path("smollm2-135m")
    except OSError as e:
        pytest.skip(str(e))
    tok = Tokenizer.from_gguf_metadata(GGUFFile(path).metadata, source=path)
    tok.backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in EXTRA_SPECIALS])
    return tok.backend


def tokenizer_for(backend, name):
    from qlora_ext.model.tokenizer import Tokenizer

    bos, eot = MODELS[name]
    return Tokenizer(backend, bos_token_id=backend.token_to_id(bos), eos_token_id=backend.token_to_id(eot),
                     chat_template=(TEMPLATES / f"{name}.jinja").read_text(), source=f"{name}.jinja")


def trained_runs(ids, labels):
    """Maximal runs of consecutive trained positions, as lists of ids."""
    runs, cur = [], []
    for t, l in zip(ids, labels):
        if l != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_rendering_matches_transformers(base_backend, name, conversation):
    rjt = pytest.importorskip("transformers.utils.chat_template_utils")
    tok = tokenizer_for(base_backend, name)
    msgs = CONVERSATIONS[conversation]
    for gen in (False, True):
        for upto in (len(msgs), len(msgs) - 1):
            want = rjt.render_jinja_template(conversations=[msgs[:upto]], chat_template=tok.chat_template,
                                             add_generation_prompt=gen, bos_token=tok.bos_token,
                                             eos_token=tok.eos_token)[0][0]
            assert tok.apply_chat_template(msgs[:upto], add_generation_prompt=gen) == want


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_masks_are_exactly_the_replies_and_their_end_token(tmp_path, base_backend, name, conversation):
    tok = tokenizer_for(base_backend, name)
    msgs = CONVERSATIONS[conversation]
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"messages": msgs}) + "\n")
    (ex,), _ = load_examples(p, tok, 4096)
    assert ex.ids == tok.encode(tok.apply_chat_template(msgs))  # one rendering, tokenized once
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    runs = trained_runs(ex.ids, ex.labels)
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        assert run[-1] == tok.eos_token_id  # the end-of-turn token is trained
        # Mistral puts a space before each reply; the byte-level BPE folds it into the reply's first token
        assert tok.decode(run, skip_special_tokens=False).lstrip(" ") == reply + tok.eos_token
    # everything else, the prompts and headers included, is not trained
    n_trained = sum(len(r) for r in runs)
    assert sum(l != IGNORE for l in ex.labels) == n_trained
    assert all(l in (IGNORE, t) for t, l in zip(ex.ids, ex.labels))


def test_qwen3_rewrites_earlier_turns_and_masks_still_follow(tmp_path, base_backend):
    """Qwen3's template renders the last reply with an empty think block and earlier ones
    without, so a prefix of the conversation does not render as a prefix of the whole; and it
    drops an earlier turn's reasoning.  The masks come from the one full rendering."""
    tok = tokenizer_for(base_backend, "qwen3")
    msgs = [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nA."},
            {"role": "user", "content": "b?"}, {"role": "assistant", "content": "B."}]
    text = tok.apply_chat_template(msgs)
    assert not text.startswith(tok.apply_chat_template(msgs[:2]))
    assert "hmm" not in text and "<think>\n\n</think>\n\nB." in text
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"messages": msgs}) + "\n")
    (ex,), _ = load_examples(p, tok, 4096)
    assert [tok.decode(r, skip_special_tokens=False) for r in trained_runs(ex.ids, ex.labels)] == \
        ["A.<|im_end|>", "B.<|im_end|>"]


def test_generation_blocks_define_the_mask(tmp_path, base_backend):
    """A template with {% generation %} blocks: the trained tokens are the blocks' tokens."""
    tok = tokenizer_for(base_backend, "smollm2")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}"
                         "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}"
                         "<|im_end|>{% endif %}\n{% endfor %}")
    msgs = CONVERSATIONS["no system, two turns"]
    p = tmp_path / "g.jsonl"
    p.write_text(json.dumps({"messages": msgs}) + "\n")
    (ex,), _ = load_examples(p, tok, 4096)
    assert [tok.decode(r, skip_special_tokens=False) for r in trained_runs(ex.ids, ex.labels)] == \
        ["Hello! How can I help?<|im_end|>", "1, 2, 3<|im_end|>"]
    # transformers' assistant mask over the same template marks the same characters
    rjt = pytest.importorskip("transformers.utils.chat_template_utils")
    text, spans = rjt.render_jinja_template(conversations=[msgs], chat_template=tok.chat_template,
                                            return_assistant_tokens_mask=True)
    assert tok.render_chat(msgs) == (text[0], [tuple(s) for s in spans[0]])


def test_reply_missing_from_the_rendering_is_a_data_error(tmp_path, base_backend):
    tok = tokenizer_for(base_backend, "smollm2")
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content|upper }}\n{% endfor %}"
    p = tmp_path / "u.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "x"},
                                          {"role": "assistant", "content": "lower"}]}) + "\n")
    with pytest.raises(DataError, match=r"u.jsonl:1: messages\[1\] \(assistant\): its content does not occur"):
        load_examples(p, tok, 512)


def test_multi_turn_training_of_a_qwen3_model_with_its_template(tmp_path, capsys):
    """A tiny Qwen3 checkpoint carrying Qwen3's real template trains on multi-turn chats from
    the command line; its masks are the assistant turns."""
    from model_factory import make_tiny_checkpoint
    from qlora_ext import cli
    from qlora_ext.model.tokenizer import Tokenizer

    d = Path(make_tiny_checkpoint(tmp_path / "qwen3", model_type="qwen3"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (TEMPLATES / "qwen3.jinja").read_text()
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": CONVERSATIONS[k]} for k in sorted(CONVERSATIONS)] * 2
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = Tokenizer.from_dir(d)
    ex, _ = load_examples(data, tok, 512)
    for e, row in zip(ex, rows):
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        # (the tiny vocabulary has no newline: it round-trips as its unknown token)
        assert [tok.decode(r, skip_special_tokens=False) for r in trained_runs(e.ids, e.labels)] == \
            [tok.decode(tok.encode(r), skip_special_tokens=False) + "<|im_end|>" for r in replies]
    out = tmp_path / "run"
    assert cli.main(["train", "--model", str(d), "--data", str(data), "--out", str(out), "--steps", "3",
                     "--batch-size", "2", "--seq-len", "256", "--device", "cpu", "--quiet"]) == 0
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and np.isfinite(losses).all()
    assert (out / "adapter_model.safetensors").is_file()
