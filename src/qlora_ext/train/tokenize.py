"""One record -> (ids, labels): the tokenizer, the chat template and the assistant mask.

Labels align with input_ids and use -100 for "no loss" (the model shifts internally); a
label is either its token's id (trained) or -100."""
from __future__ import annotations

import bisect

from .records import DataError, check_messages, iter_records, need_str, record_kind

IGNORE = -100


def require_tokenizer(tokenizer, model, need_eos: bool = True) -> object:
    """The model's tokenizer, checked for what data needs (an EOS token ends every text and
    completion, and pads; generation alone can do without); ValueError naming the model
    otherwise."""
    if tokenizer is None:
        raise ValueError(f"{model}: the model has no tokenizer (an HF directory needs tokenizer.json, a GGUF "
                         "file tokenizer.ggml.* metadata), so text data cannot be tokenized")
    eos = tokenizer.eos_token_id
    if need_eos and (eos is None or (isinstance(eos, (list, tuple)) and not eos)):
        raise ValueError(f"{getattr(tokenizer, 'source', '') or model}: the tokenizer has no EOS token "
                         "(tokenizer_config.json 'eos_token', config.json 'eos_token_id' or GGUF "
                         "'tokenizer.ggml.eos_token_id'), which ends every example")
    return tokenizer


def _find_content(text: str, content: str, start: int):
    """(begin, end) of a message's content in the rendered text at or after start, or None.
    Templates may strip the content or, for earlier turns, drop a reasoning part before
    '</think>' (Qwen3): those renderings are tried in turn."""
    for variant in (content, content.strip(), content.rpartition("</think>")[2].strip()):
        if variant or not content:
            k = text.find(variant, start)
            if k >= 0:
                return k, k + len(variant)
    return None


def assistant_spans(text: str, messages, path, lineno) -> list:
    """Character spans of the assistant messages' contents in one rendering of the whole
    conversation.  Messages are located in order, each after the one before it, so that an
    assistant reply that also occurs in an earlier turn is not taken for it; a non-assistant
    message the template rewrote (a system prompt merged into a user turn) moves nothing."""
    spans, pos = [], 0
    for i, m in enumerate(messages):
        found = _find_content(text, m["content"], pos)
        if m["role"] == "assistant":
            if found is None:
                raise DataError(path, lineno, f"messages[{i}] (assistant): its content does not occur in the "
                                              "chat template's rendering, so its tokens cannot be located")
            spans.append(found)
        if found is not None:
            pos = found[1]
    return spans


def chat_example(tokenizer, messages, path, lineno) -> tuple:
    """(ids, labels) of a conversation: rendered once by the chat template, tokenized once;
    the trained tokens are those of the template's `{% generation %}` blocks where it has
    them, else each assistant reply's tokens (by the tokenizer's character offsets) and the
    special token that ends its turn."""
    text, generation = tokenizer.render_chat(messages)
    spans = generation or assistant_spans(text, messages, path, lineno)
    ids, offsets = tokenizer.encode_offsets(text)
    starts = [s for s, _ in offsets]
    ends = [max(e, s + 1) for s, e in offsets]  # a zero-width (trimmed) token still has a place
    trained = [False] * len(ids)
    for begin, end in spans:
        k = bisect.bisect_right(ends, begin)  # first token ending after the span begins
        while k < len(ids) and starts[k] < end:
            trained[k] = True
            k += 1
        if not generation and k < len(ids) and ids[k] in tokenizer.special_ids:
            trained[k] = True  # the end-of-turn token (<|im_end|>, <|eot_id|>, </s>)
    return ids, [t if on else IGNORE for t, on in zip(ids, trained)]


def tokenize_record(obj, tokenizer, path, lineno) -> tuple:
    """(ids, labels) of one record, untruncated."""
    kind = record_kind(obj, path, lineno)
    eos = tokenizer.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    if kind == "text":
        ids = list(tokenizer.encode(need_str(obj, "text", path, lineno), add_special_tokens=True)) + [eos]
        return ids, list(ids)
    if kind == "prompt":
        p = list(tokenizer.encode(need_str(obj, "prompt", path, lineno), add_special_tokens=True))
        c = list(tokenizer.encode(need_str(obj, "completion", path, lineno), add_special_tokens=False)) + [eos]
        return p + c, [IGNORE] * len(p) + c
    return chat_example(tokenizer, check_messages(obj["messages"], path, lineno), path, lineno)


def generation_pairs(path, tokenizer) -> list:
    """[(prompt_ids, expected_text)] for exact-match accuracy: "prompt"+"completion" records,
    or "messages" records whose last turn is the assistant's (the prompt is everything
    before it, rendered with the generation prompt).  "text" records have no answer."""
    out = []
    for lineno, obj in iter_records(path):
        kind = record_kind(obj, path, lineno)
        if kind == "prompt":
            p = tokenizer.encode(need_str(obj, "prompt", path, lineno), add_special_tokens=True)
            out.append((list(p), need_str(obj, "completion", path, lineno)))
        elif kind == "messages":
            msgs = check_messages(obj["messages"], path, lineno)
            if msgs[-1]["role"] == "assistant":
                text = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True)
                out.append((list(tokenizer.encode(text, add_special_tokens=False)), msgs[-1]["content"]))
    return out
