"""Training data: JSONL files -> token rows -> shuffled, resumable global batches.

Record formats (one JSON object per line, blank lines skipped):
  {"text": str}                                  loss on every token
  {"prompt": str, "completion": str}             loss on the completion (and the EOS after it)
  {"messages": [{"role", "content"}, ...]}       the tokenizer's chat template; loss on the
                                                 assistant replies and their end-of-turn tokens

Labels align with input_ids and use -100 for "no loss" (the model shifts internally).
A row is one example padded (pad mode) or a seq_len slice of the shuffled, concatenated
examples (pack mode).  Epoch e's row order comes from numpy's default_rng([seed, e]), so the
position (epoch, row) alone determines every later batch: that is what a checkpoint stores.
"""
from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Bad training data; the message starts with `<file>:<line>:`."""

    def __init__(self, path, line: int, what: str):
        super().__init__(f"{path}:{line}: {what}")
        self.path, self.line = str(path), line


@dataclass
class Example:
    ids: list
    labels: list
    line: int  # 1-based line of the JSONL file it came from


def read_jsonl(path) -> list:
    """[(line number, dict)] of the non-blank lines; DataError on anything malformed."""
    path = Path(path)
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
            records.append((lineno, obj))
    if not records:
        raise DataError(path, 1, 'no examples (empty file); expected JSON lines with "text", '
                                 '"prompt"+"completion" or "messages"')
    return records


def _valid_text(v: str, what: str, path, lineno) -> str:
    """v, unless it holds a lone surrogate (JSON's "\\ud800" escapes parse to one; no
    tokenizer can encode it)."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(path, lineno, f"{what} holds a lone surrogate ({v[e.start]!r} at character {e.start}), "
                                      "which is not valid Unicode text") from None
    return v


def _need_str(obj, key, path, lineno) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        got = "missing" if key not in obj else f"a {type(v).__name__}"
        raise DataError(path, lineno, f'field "{key}" must be a string, got {got}')
    return _valid_text(v, f'field "{key}"', path, lineno)


def _check_messages(msgs, path, lineno) -> list:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(path, lineno, '"messages" must be a non-empty list of {"role", "content"} objects')
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(path, lineno, f'messages[{i}] must be an object with string "role" and "content"')
        if m["role"] not in ROLES:
            raise DataError(path, lineno, f'messages[{i}] has role {m["role"]!r}; expected one of {", ".join(ROLES)}')
        _valid_text(m["content"], f"messages[{i}] content", path, lineno)
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(path, lineno, '"messages" has no assistant turn, so nothing would be trained')
    return msgs


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


def record_kind(obj, path, lineno) -> str:
    if "messages" in obj:
        return "messages"
    if "prompt" in obj or "completion" in obj:
        return "prompt"
    if "text" in obj:
        return "text"
    raise DataError(path, lineno, f'expected a "text", "prompt"+"completion" or "messages" field; '
                                  f'got keys {sorted(obj)[:5]}')


def check_records(path) -> int:
    """Validate every record of a JSONL file without a tokenizer (so that bad data fails
    before a model loads); returns the number of records."""
    records = read_jsonl(path)
    for lineno, obj in records:
        kind = record_kind(obj, path, lineno)
        if kind == "text":
            _need_str(obj, "text", path, lineno)
        elif kind == "prompt":
            _need_str(obj, "prompt", path, lineno)
            _need_str(obj, "completion", path, lineno)
        else:
            _check_messages(obj["messages"], path, lineno)
    return len(records)


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
    if kind == "text":
        ids = list(tokenizer.encode(_need_str(obj, "text", path, lineno), add_special_tokens=True)) + [eos]
        return ids, list(ids)
    if kind == "prompt":
        p = list(tokenizer.encode(_need_str(obj, "prompt", path, lineno), add_special_tokens=True))
        c = list(tokenizer.encode(_need_str(obj, "completion", path, lineno), add_special_tokens=False)) + [eos]
        return p + c, [IGNORE] * len(p) + c
    return chat_example(tokenizer, _check_messages(obj["messages"], path, lineno), path, lineno)


@dataclass
class LoadStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # no target left after truncation
    tokens: int = 0


def load_examples(path, tokenizer, seq_len: int) -> tuple:
    """([Example], LoadStats).  "text" records longer than seq_len are cut into seq_len
    pieces; the other kinds are truncated (counted in stats.truncated).  Examples whose
    labels have no target after position 0 (nothing to predict) are dropped."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    stats, out = LoadStats(), []
    for lineno, obj in read_jsonl(path):
        ids, labels = tokenize_record(obj, tokenizer, path, lineno)
        pieces = [(ids, labels)]
        if len(ids) > seq_len:
            if record_kind(obj, path, lineno) == "text":
                pieces = [(ids[i:i + seq_len], labels[i:i + seq_len]) for i in range(0, len(ids), seq_len)]
            else:
                pieces = [(ids[:seq_len], labels[:seq_len])]
                stats.truncated += 1
        for pi, pl in pieces:
            if any(l != IGNORE for l in pl[1:]):
                out.append(Example(pi, pl, lineno))
                stats.tokens += len(pi)
            else:
                stats.dropped += 1
    stats.examples = len(out)
    if not out:
        raise DataError(path, 1, f"no example has a target token within seq_len={seq_len}")
    return out, stats


@dataclass
class Batch:
    """input_ids, labels, attention_mask: int64 [rows, T] (T = longest row of the batch)."""

    input_ids: np.ndarray
    labels: np.ndarray
    attention_mask: np.ndarray

    def __len__(self):
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> "Batch":
        """Rows [start, stop), with trailing all-padding columns trimmed."""
        m = self.attention_mask[start:stop]
        t = int(m.any(axis=0).nonzero()[0].max()) + 1 if m.size and m.any() else 0
        return Batch(self.input_ids[start:stop, :t], self.labels[start:stop, :t], m[:, :t])

    def shard(self, rank: int, size: int) -> "Batch":
        """This rank's disjoint, contiguous slice of a global batch (may be empty)."""
        n = len(self)
        return self.rows(n * rank // size, n * (rank + 1) // size)

    def micro_batches(self, micro_size: int) -> list:
        """(input_ids, labels, attention_mask) tuples of at most micro_size rows."""
        return [self.rows(i, min(i + micro_size, len(self))).as_tuple() for i in range(0, len(self), micro_size)]

    def as_tuple(self) -> tuple:
        return self.input_ids, self.labels, self.attention_mask


def make_batch(rows: list, pad_id: int, width: int | None = None) -> Batch:
    """rows: [(ids, labels)] -> right-padded Batch of width max(len) (or `width`)."""
    t = width or max(len(r[0]) for r in rows)
    ids = np.full((len(rows), t), pad_id, dtype=np.int64)
    labels = np.full((len(rows), t), IGNORE, dtype=np.int64)
    mask = np.zeros((len(rows), t), dtype=np.int64)
    for i, (ri, rl) in enumerate(rows):
        ids[i, :len(ri)] = ri
        labels[i, :len(rl)] = rl
        mask[i, :len(ri)] = 1
    return Batch(ids, labels, mask)


class DataLoader:
    """Global batches of `batch_rows` rows, reshuffled every epoch, resumable by position."""

    def __init__(self, examples: list, seq_len: int, batch_rows: int, seed: int = 0, pack: bool = False,
                 pad_id: int = 0, shuffle: bool = True):
        if not examples:
            raise ValueError("DataLoader needs at least one example")
        if batch_rows < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_rows!r}")
        self.examples, self.seq_len, self.batch_rows = examples, seq_len, batch_rows
        self.seed, self.pack, self.pad_id, self.shuffle = seed, pack, pad_id, shuffle
        self.epoch, self.row = 0, 0
        self._rows_epoch, self._rows = None, None

    def _epoch_rows(self, epoch: int) -> list:
        if self._rows_epoch != epoch:
            order = np.arange(len(self.examples))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            if self.pack:
                ids = [t for i in order for t in self.examples[i].ids]
                labels = [t for i in order for t in self.examples[i].labels]
                L = self.seq_len
                rows = [(ids[i:i + L], labels[i:i + L]) for i in range(0, len(ids), L)]
                # Row boundaries cut examples; a row whose only target is at position 0 trains nothing.
                rows = [r for r in rows if any(l != IGNORE for l in r[1][1:])]
            else:
                rows = [(self.examples[i].ids, self.examples[i].labels) for i in order]
            self._rows_epoch, self._rows = epoch, rows
        return self._rows

    @property
    def rows_per_epoch(self) -> int:
        return len(self._epoch_rows(self.epoch))

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.rows_per_epoch // self.batch_rows)

    def next_batch(self) -> Batch:
        """The next global batch; an epoch's last batch may be short.  Advances the position."""
        rows = self._epoch_rows(self.epoch)
        if self.row >= len(rows):
            self.epoch, self.row = self.epoch + 1, 0
            rows = self._epoch_rows(self.epoch)
        chunk = rows[self.row:self.row + self.batch_rows]
        self.row += len(chunk)
        return make_batch(chunk, self.pad_id, self.seq_len if self.pack else None)

    def __iter__(self):
        """Batches of one pass in file order (for evaluation; does not move the position)."""
        rows = [(e.ids, e.labels) for e in self.examples]
        for i in range(0, len(rows), self.batch_rows):
            yield make_batch(rows[i:i + self.batch_rows], self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data position was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.row = int(state["epoch"]), int(state["row"])


def generation_pairs(path, tokenizer) -> list:
    """[(prompt_ids, expected_text)] for exact-match accuracy: "prompt"+"completion" records,
    or "messages" records whose last turn is the assistant's (the prompt is everything
    before it, rendered with the generation prompt).  "text" records have no answer."""
    out = []
    for lineno, obj in read_jsonl(path):
        kind = record_kind(obj, path, lineno)
        if kind == "prompt":
            p = tokenizer.encode(_need_str(obj, "prompt", path, lineno), add_special_tokens=True)
            out.append((list(p), _need_str(obj, "completion", path, lineno)))
        elif kind == "messages":
            msgs = _check_messages(obj["messages"], path, lineno)
            if msgs[-1]["role"] == "assistant":
                text = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True)
                out.append((list(tokenizer.encode(text, add_special_tokens=False)), msgs[-1]["content"]))
    return out
