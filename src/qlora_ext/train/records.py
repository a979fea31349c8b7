"""Data records: read one at a time from JSONL or Parquet, validated without a tokenizer.

Record formats (one JSON object per line, blank lines skipped; or one Parquet row with the
same columns):
  {"text": str}                                  loss on every token
  {"prompt": str, "completion": str}             loss on the completion (and the EOS after it)
  {"messages": [{"role", "content"}, ...]}       the tokenizer's chat template; loss on the
                                                 assistant replies and their end-of-turn tokens

Files are streamed: memory holds one line (or one Parquet batch), never the file.  A bad
record is a DataError naming the file and its line ("d.jsonl:12: ...") or row
("d.parquet:row 12: ...").  `--data` takes one file or a weighted mixture:
"a.jsonl:0.7,b.jsonl:0.3" (parse_data_spec)."""
from __future__ import annotations

import json
import math
from pathlib import Path

ROLES = ("system", "user", "assistant", "tool")
PARQUET_SUFFIXES = (".parquet", ".pq")
_PARQUET_BATCH = 1024


class Row(int):
    """A 1-based Parquet row number (a line number of a JSONL file is a plain int)."""


class DataError(ValueError):
    """Bad training data; the message starts with `<file>:<line>:` (`<file>:row <n>:` for Parquet)."""

    def __init__(self, path, line: int, what: str):
        where = f"row {int(line)}" if isinstance(line, Row) else str(line)
        super().__init__(f"{path}:{where}: {what}")
        self.path, self.line = str(path), int(line)


def _parse_line(raw: bytes, path, lineno: int):
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(path, lineno, "invalid JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer literal past Python's digit limit
        raise DataError(path, lineno, f"invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _iter_jsonl(path: Path):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            obj = _parse_line(raw, path, lineno)
            if obj is not None:
                yield lineno, obj


def _iter_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow: pip install 'qlora_ext[parquet]'") from None
    try:
        pf = pq.ParquetFile(path)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for a corrupt file are of several types
        raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    row = 0
    batches = pf.iter_batches(batch_size=_PARQUET_BATCH)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001
            raise DataError(path, Row(row + 1), f"unreadable Parquet data ({type(e).__name__}: {e})") from None
        for obj in batch.to_pylist():
            row += 1
            # absent columns of other record kinds come back as None: drop them
            yield Row(row), {k: v for k, v in obj.items() if v is not None}


def iter_records(path):
    """(line or Row, dict) for each record of a JSONL or Parquet file, streamed; DataError
    on anything malformed, and on a file without records."""
    path = Path(path)
    reader = _iter_parquet if path.suffix.lower() in PARQUET_SUFFIXES else _iter_jsonl
    empty = True
    for where, obj in reader(path):
        empty = False
        yield where, obj
    if empty:
        raise DataError(path, 1, 'no examples (empty file); expected JSON lines with "text", '
                                 '"prompt"+"completion" or "messages"')


def valid_text(v: str, what: str, path, lineno) -> str:
    """v, unless it holds a lone surrogate (JSON's "\\ud800" escapes parse to one; no
    tokenizer can encode it)."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(path, lineno, f"{what} holds a lone surrogate ({v[e.start]!r} at character {e.start}), "
                                      "which is not valid Unicode text") from None
    return v


def need_str(obj, key, path, lineno) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        got = "missing" if key not in obj else f"a {type(v).__name__}"
        raise DataError(path, lineno, f'field "{key}" must be a string, got {got}')
    return valid_text(v, f'field "{key}"', path, lineno)


def check_messages(msgs, path, lineno) -> list:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(path, lineno, '"messages" must be a non-empty list of {"role", "content"} objects')
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(path, lineno, f'messages[{i}] must be an object with string "role" and "content"')
        if m["role"] not in ROLES:
            raise DataError(path, lineno, f'messages[{i}] has role {m["role"]!r}; expected one of {", ".join(ROLES)}')
        valid_text(m["content"], f"messages[{i}] content", path, lineno)
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(path, lineno, '"messages" has no assistant turn, so nothing would be trained')
    return msgs


def record_kind(obj, path, lineno) -> str:
    if "messages" in obj:
        return "messages"
    if "prompt" in obj or "completion" in obj:
        return "prompt"
    if "text" in obj:
        return "text"
    raise DataError(path, lineno, f'expected a "text", "prompt"+"completion" or "messages" field; '
                                  f'got keys {sorted(map(str, obj))[:5]}')


def check_record(obj, path, lineno) -> str:
    """The record's kind, after checking every field it needs."""
    kind = record_kind(obj, path, lineno)
    if kind == "text":
        need_str(obj, "text", path, lineno)
    elif kind == "prompt":
        need_str(obj, "prompt", path, lineno)
        need_str(obj, "completion", path, lineno)
    else:
        check_messages(obj["messages"], path, lineno)
    return kind


def check_records(path) -> int:
    """Validate every record of a file without a tokenizer (so that bad data fails before a
    model loads); returns the number of records."""
    n = 0
    for where, obj in iter_records(path):
        check_record(obj, path, where)
        n += 1
    return n


def parse_data_spec(spec: str, flag: str = "--data") -> list:
    """[(path, weight or None)] from "a.jsonl" or "a.jsonl:0.7,b.jsonl:0.3" (a weight is
    the share of an epoch's rows drawn from that file).  Either every file has a weight or
    none has (then the files are simply concatenated)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{flag}: expected a file or FILE:WEIGHT,FILE:WEIGHT,...; got {spec!r}")
    out = []
    for part in spec.split(","):
        part = part.strip()
        path, sep, w = part.rpartition(":")
        weight = None
        if sep and path:
            try:
                weight = float(w)
            except ValueError:  # a ':' inside the path (C:\..., a URL-like name): no weight
                path = part
            else:
                if not (math.isfinite(weight) and weight > 0):
                    raise ValueError(f"{flag}: weight of {path!r} must be a finite number > 0, got {w!r}")
        else:
            path = part
        if not path:
            raise ValueError(f"{flag}: empty file name in {spec!r}")
        out.append((path, weight))
    given = [w is not None for _, w in out]
    if any(given) and not all(given):
        raise ValueError(f"{flag}: give a weight to every file or to none ({spec!r})")
    if len({p for p, _ in out}) != len(out):
        raise ValueError(f"{flag}: a file is named twice in {spec!r}")
    return out
