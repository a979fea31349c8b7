"""Tokenized data on disk: files tokenized once, then memory-mapped.

Tokenizing streams the data file one record at a time and appends each example's tokens to
flat files (int32 ids, a uint8 "trained" flag per token, int64 example offsets and source
lines), so memory stays bounded whatever the file's size; training then reads examples from
the memory-mapped arrays.  The arrays live in a cache beside the data,
`<data dir>/.qlora_ext_cache/<file name>-<key>/`, where the key hashes the data file's
content, the tokenizer (its tokenizer.json form, chat template and special ids), seq_len and
this format's version: a second run on the same data and model skips tokenizing, and any
change of those makes a new entry (the newest few per file are kept).  The dataset shipped
inside the package, and data in a directory that is not writable, are cached in the user's
cache directory instead ($XDG_CACHE_HOME or ~/.cache, then qlora_ext/tokens/); with
QLORA_EXT_DATA_CACHE=0, or where nothing is writable, the arrays go to a temporary
directory removed with the data object."""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import tempfile
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..progress import Progress
from .records import DataError, iter_records, record_kind
from .tokenize import IGNORE, tokenize_record

FORMAT_VERSION = 1
CACHE_DIR = ".qlora_ext_cache"
KEEP_PER_FILE = 4
_CHUNK = 1 << 20


@dataclass
class Example:
    ids: list
    labels: list
    line: int  # 1-based line (or Parquet row) of the file it came from


@dataclass
class LoadStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # no target left after truncation
    tokens: int = 0
    cached: bool = False  # read from the cache instead of tokenized


def file_digest(path) -> str:
    """blake2b of a file's bytes, streamed (about 1 GB/s: small beside tokenizing)."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """What of a tokenizer decides the tokens: its serialized form, template and special ids."""
    h = hashlib.blake2b(digest_size=20)
    backend = getattr(tokenizer, "backend", None)
    h.update((backend.to_str() if backend is not None else type(tokenizer).__qualname__).encode())
    h.update(repr((getattr(tokenizer, "chat_template", None), tokenizer.bos_token_id, tokenizer.eos_token_id,
                   getattr(tokenizer, "pad_token_id", None))).encode())
    return h.hexdigest()


class TokenizedFile:
    """One data file's examples as flat arrays (memory-mapped from a cache directory)."""

    def __init__(self, directory: Path, path, keep=None):
        self.path, self.directory, self._keep = str(path), directory, keep  # keep: a TemporaryDirectory
        meta = json.loads((directory / "meta.json").read_text())
        self.stats = LoadStats(**meta["stats"])
        self.offsets = np.load(directory / "offsets.npy")
        self.lines = np.load(directory / "lines.npy")
        n_tok = int(self.offsets[-1])
        if (directory / "ids.i32").stat().st_size != 4 * n_tok or (directory / "trained.u8").stat().st_size != n_tok:
            raise ValueError(f"{directory}: cache arrays do not match their index")
        self.ids = np.memmap(directory / "ids.i32", dtype=np.int32, mode="r") if n_tok else np.zeros(0, np.int32)
        self.trained = np.memmap(directory / "trained.u8", dtype=np.uint8, mode="r") if n_tok else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> Example:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = np.asarray(self.ids[a:b], dtype=np.int64)
        labels = np.where(self.trained[a:b] != 0, ids, IGNORE)
        return Example(ids.tolist(), labels.tolist(), int(self.lines[i]))


class TokenizedData:
    """The examples of one or more files, indexable as one sequence; `weights` (one per
    file, or None) is the mixture the DataLoader samples epochs from."""

    def __init__(self, files: list, weights: list | None = None):
        self.files, self.weights = files, weights
        self.starts = [0]
        for f in files:
            self.starts.append(self.starts[-1] + len(f))
        s = LoadStats()
        for f in files:
            for k in ("examples", "truncated", "dropped", "tokens"):
                setattr(s, k, getattr(s, k) + getattr(f.stats, k))
        s.cached = all(f.stats.cached for f in files)
        self.stats = s

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> Example:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self.starts, i) - 1
        return self.files[k][i - self.starts[k]]

    def lengths(self) -> np.ndarray:
        """int64 [len(self)]: each example's token count, from the index (nothing read)."""
        return np.concatenate([np.diff(f.offsets) for f in self.files]).astype(np.int64)

    @property
    def sources(self) -> list:
        """[(start, count)] of each file's examples in this sequence."""
        return [(self.starts[k], len(f)) for k, f in enumerate(self.files)]


def _pieces(obj, ids, labels, seq_len, path, where, stats):
    """"text" records longer than seq_len are cut into seq_len pieces; the other kinds are
    truncated (counted in stats.truncated)."""
    if len(ids) <= seq_len:
        return [(ids, labels)]
    if record_kind(obj, path, where) == "text":
        return [(ids[i:i + seq_len], labels[i:i + seq_len]) for i in range(0, len(ids), seq_len)]
    stats.truncated += 1
    return [(ids[:seq_len], labels[:seq_len])]


def _build(path, tokenizer, seq_len: int, directory: Path, key: str, progress) -> None:
    stats = LoadStats()
    offsets, lines = array("q", [0]), array("q")
    with open(directory / "ids.i32", "wb") as fi, open(directory / "trained.u8", "wb") as ft, \
            Progress(None, f"tokenizing {Path(path).name}", unit="record", enabled=progress) as bar:
        for where, obj in iter_records(path):
            ids, labels = tokenize_record(obj, tokenizer, path, where)
            for pi, pl in _pieces(obj, ids, labels, seq_len, path, where, stats):
                trained = np.asarray(pl) != IGNORE
                if not trained[1:].any():  # nothing to predict (position 0 is never a target)
                    stats.dropped += 1
                    continue
                fi.write(np.asarray(pi, dtype=np.int32).tobytes())
                ft.write(trained.astype(np.uint8).tobytes())
                offsets.append(offsets[-1] + len(pi))
                lines.append(int(where))
                stats.tokens += len(pi)
            bar.update(1)
    stats.examples = len(lines)
    if not stats.examples:
        raise DataError(path, 1, f"no example has a target token within seq_len={seq_len}")
    np.save(directory / "offsets.npy", np.frombuffer(offsets, dtype=np.int64))
    np.save(directory / "lines.npy", np.frombuffer(lines, dtype=np.int64))
    # written last: a directory with meta.json is complete
    (directory / "meta.json").write_text(json.dumps({"key": key, "source": str(path), "seq_len": seq_len,
                                                     "stats": asdict(stats)}))


def _cache_enabled() -> bool:
    return os.environ.get("QLORA_EXT_DATA_CACHE", "").strip().lower() not in ("0", "false", "no", "off")


def _prune(cache: Path, name: str, keep: Path) -> None:
    """Keep the newest KEEP_PER_FILE entries of one data file."""
    entries = sorted((p for p in cache.glob(f"{name}-*") if p.is_dir() and p != keep and len(p.name) ==
                      len(name) + 1 + 24), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP_PER_FILE - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def tokenized_file(path, tokenizer, seq_len: int, progress: bool | None = False) -> TokenizedFile:
    """The examples of one data file, from the cache beside it or tokenized into it."""
    path = Path(path)
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    key = hashlib.blake2b(json.dumps([FORMAT_VERSION, file_digest(path), tokenizer_fingerprint(tokenizer),
                                      seq_len]).encode(), digest_size=12).hexdigest()
    caches = _cache_dirs(path) if _cache_enabled() else []
    for cache in caches:
        final = cache / f"{path.name}-{key}"
        if (final / "meta.json").is_file():
            hit = _open_entry(final, path, key)
            if hit is not None:
                return hit
    work = cache = None
    for cache in caches:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=cache))
            os.chmod(work, 0o755)  # readable like the data beside it (mkdtemp makes it private)
            break
        except OSError:  # not writable: the next place
            continue
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="qlora_ext_tokens_")
        _build(path, tokenizer, seq_len, Path(tmp.name), key, progress)
        return TokenizedFile(Path(tmp.name), path, keep=tmp)
    final = cache / f"{path.name}-{key}"
    try:
        _build(path, tokenizer, seq_len, work, key, progress)
        try:
            os.replace(work, final)
        except OSError:  # another run published the same entry first: use that one
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _prune(cache, path.name, final)
    return TokenizedFile(final, path)


def _cache_dirs(path: Path) -> list:
    """Where a data file's cache may live, in order of preference."""
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora_ext" / "tokens"
    package = Path(__file__).resolve().parent.parent
    if package in path.resolve().parents:  # the shipped dataset: never write into the installed package
        return [user]
    return [path.parent / CACHE_DIR, user]


def _open_entry(final: Path, path, key: str):
    """The cached examples in `final`, or None (after removing it) when it is damaged."""
    try:
        f = TokenizedFile(final, path)
        if json.loads((final / "meta.json").read_text()).get("key") == key:
            f.stats.cached = True
            os.utime(final)  # most recently used: kept by _prune
            return f
    except (OSError, ValueError):  # a damaged entry: tokenize again
        pass
    shutil.rmtree(final, ignore_errors=True)
    return None


def load_examples(path, tokenizer, seq_len: int, progress: bool | None = False) -> tuple:
    """(TokenizedData, LoadStats) of one file.  "text" records longer than seq_len are cut
    into seq_len pieces; the other kinds are truncated (stats.truncated).  Examples whose
    labels have no target after position 0 (nothing to predict) are dropped."""
    data = TokenizedData([tokenized_file(path, tokenizer, seq_len, progress)])
    return data, data.stats


def load_data(spec: list, tokenizer, seq_len: int, progress: bool | None = False) -> tuple:
    """(TokenizedData, LoadStats) of [(path, weight or None)] (records.parse_data_spec)."""
    files = [tokenized_file(p, tokenizer, seq_len, progress) for p, _ in spec]
    weights = [w for _, w in spec] if spec and spec[0][1] is not None else None
    data = TokenizedData(files, weights)
    return data, data.stats
