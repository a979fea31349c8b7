"""Training data: files -> token rows -> shuffled, resumable global batches.

records.py reads and validates the files (JSONL or Parquet, streamed), tokenize.py turns a
record into (ids, labels), token_cache.py keeps the tokenized examples on disk; this module
makes batches.  A row is one example padded (pad mode) or whole shuffled examples packed one
after another until the next would pass seq_len (pack mode: each example a document of its
own, told apart by segment ids, so that it attends only to itself and restarts its positions:
model/packing.py).  Epoch e's row order comes from numpy's
default_rng([seed, e]) (for a weighted mixture of files, each file's share of the epoch is
drawn from the same generator), so the position (epoch, row) alone determines every later
batch: that is what a checkpoint stores.

Pad mode pads a batch only to its longest row, rounded up to the model's `pad_multiple`
(the tile its kernels and buffer shapes want), and with group_by_length draws rows of
similar length into the same batch (length_grouped_order), so that little of each batch
is padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# the names callers use, from the modules that define them
from .records import DataError, check_records, parse_data_spec  # noqa: F401
from .token_cache import Example, LoadStats, TokenizedData, load_data, load_examples  # noqa: F401
from .tokenize import IGNORE, generation_pairs, require_tokenizer, tokenize_record  # noqa: F401


@dataclass
class Batch:
    """input_ids, labels, attention_mask: int64 [rows, T] (T = longest row of the batch,
    rounded up to `multiple` where the width allows); segment_ids int64 [rows, T] for packed
    rows (documents as runs of equal ids, the padding a run of its own), else None."""

    input_ids: np.ndarray
    labels: np.ndarray
    attention_mask: np.ndarray
    multiple: int = 1
    segment_ids: np.ndarray | None = None

    def __len__(self):
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> "Batch":
        """Rows [start, stop), with trailing all-padding columns trimmed (down to the longest
        of these rows, rounded up to `multiple`)."""
        m = self.attention_mask[start:stop]
        t = int(m.any(axis=0).nonzero()[0].max()) + 1 if m.size and m.any() else 0
        t = padded_width(t, self.multiple, m.shape[1]) if t else 0
        seg = None if self.segment_ids is None else self.segment_ids[start:stop, :t]
        return Batch(self.input_ids[start:stop, :t], self.labels[start:stop, :t], m[:, :t], self.multiple, seg)

    def shard(self, rank: int, size: int) -> "Batch":
        """This rank's disjoint, contiguous slice of a global batch (may be empty)."""
        n = len(self)
        return self.rows(n * rank // size, n * (rank + 1) // size)

    def micro_batches(self, micro_size: int) -> list:
        """as_tuple()s of at most micro_size rows each."""
        return [self.rows(i, min(i + micro_size, len(self))).as_tuple() for i in range(0, len(self), micro_size)]

    def as_tuple(self) -> tuple:
        """(input_ids, labels, attention_mask[, segment_ids]): Trainer.step's arguments."""
        if self.segment_ids is None:
            return self.input_ids, self.labels, self.attention_mask
        return self.input_ids, self.labels, self.attention_mask, self.segment_ids


def padded_width(longest: int, multiple: int, limit: int) -> int:
    """`longest` rounded up to a multiple of `multiple`, but not past `limit` (the widest a
    row may be) unless `longest` itself is."""
    return max(longest, min(-(-longest // multiple) * multiple, limit))


def length_grouped_order(order: np.ndarray, lengths: np.ndarray, batch_rows: int, rng,
                         group_batches: int = 50) -> np.ndarray:
    """`order` rearranged so that each run of `batch_rows` holds rows of similar length (as
    HF's group_by_length does): the shuffled order is cut into groups of `group_batches`
    batches, each group sorted by length (stable: ties keep the shuffled order) and cut into
    batches, and the full batches are shuffled by `rng` so that neither the epoch nor a
    group runs from long to short.  A short last batch stays last; the result is a
    permutation of `order`."""
    group = batch_rows * group_batches
    parts = [chunk[np.argsort(lengths[chunk], kind="stable")]
             for chunk in (order[i:i + group] for i in range(0, len(order), group))]
    grouped = np.concatenate(parts) if parts else order
    full = len(grouped) // batch_rows
    batches = grouped[:full * batch_rows].reshape(full, batch_rows)[rng.permutation(full)]
    return np.concatenate([batches.reshape(-1), grouped[full * batch_rows:]])


def example_lengths(examples) -> np.ndarray:
    """Token count of each example: from a TokenizedData's index, else by reading them."""
    if isinstance(examples, TokenizedData):
        return examples.lengths()
    return np.array([len(e.ids) for e in examples], np.int64)


def make_batch(rows: list, pad_id: int, width: int | None = None, multiple: int = 1) -> Batch:
    """rows: [(ids, labels)] (pad mode) or [(ids, labels, segment_ids)] (packed rows) ->
    right-padded Batch of width `width`, or else the longest row rounded up to `multiple`."""
    t = width or -(-max(len(r[0]) for r in rows) // multiple) * multiple
    ids = np.full((len(rows), t), pad_id, dtype=np.int64)
    labels = np.full((len(rows), t), IGNORE, dtype=np.int64)
    mask = np.zeros((len(rows), t), dtype=np.int64)
    packed = len(rows[0]) == 3
    seg = np.zeros((len(rows), t), dtype=np.int64) if packed else None
    for i, r in enumerate(rows):
        n = len(r[0])
        ids[i, :n] = r[0]
        labels[i, :len(r[1])] = r[1]
        mask[i, :n] = 1
        if packed:
            seg[i, :n] = r[2]
            seg[i, n:] = (r[2][-1] + 1) if n else 0     # the padding: a run of its own
    return Batch(ids, labels, mask, multiple, seg)


def pack_rows(examples, seq_len: int) -> list:
    """Examples (ids, labels), in order, into rows of at most seq_len tokens: an example goes
    into the current row when it fits, else it starts the next one (examples are at most
    seq_len long: tokenization cuts longer ones).  Each row is (ids, labels, segment ids);
    the label of every example's first token after the row's first is IGNORE (no example
    learns to predict the next one's start).  Rows with no target left are dropped."""
    rows, cur = [], ([], [], [])
    for ids, labels in examples:
        if cur[0] and len(cur[0]) + len(ids) > seq_len:
            rows.append(cur)
            cur = ([], [], [])
        doc = cur[2][-1] + 1 if cur[2] else 0
        first = list(labels[:1]) if not cur[0] else [IGNORE] * min(1, len(labels))
        cur[0].extend(ids[:seq_len])
        cur[1].extend(first + list(labels[1:seq_len]))
        cur[2].extend([doc] * min(len(ids), seq_len))
    if cur[0]:
        rows.append(cur)
    return [r for r in rows if any(l != IGNORE for l in r[1][1:])]


def mixture_counts(sizes: list, weights: list) -> list:
    """Rows per file in one epoch of sum(sizes) rows: proportional to the weights, rounded
    by largest remainder so that they add up exactly."""
    total = sum(sizes)
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    raw = w * total
    counts = np.floor(raw).astype(np.int64)
    for k in np.argsort(-(raw - counts), kind="stable")[:total - int(counts.sum())]:
        counts[k] += 1
    return counts.tolist()


class DataLoader:
    """Global batches of `batch_rows` rows, reshuffled every epoch, resumable by position.

    `examples` is any sequence of Example (a TokenizedData reads them from disk as batches
    need them: pad mode holds only the epoch's order in memory).  A TokenizedData with
    weights is a mixture: each epoch has as many rows as all files together, each file's
    share given by its weight, its examples drawn without replacement (then again, reshuffled,
    when a share is larger than the file).

    Pad mode: a batch is as wide as its longest row rounded up to `pad_multiple` (at most
    seq_len); with `group_by_length` each epoch's order is length_grouped_order's."""

    def __init__(self, examples, seq_len: int, batch_rows: int, seed: int = 0, pack: bool = False,
                 pad_id: int = 0, shuffle: bool = True, pad_multiple: int = 1, group_by_length: bool = False):
        if not len(examples):
            raise ValueError("DataLoader needs at least one example")
        if batch_rows < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_rows!r}")
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple!r}")
        self.examples, self.seq_len, self.batch_rows = examples, seq_len, batch_rows
        self.seed, self.pack, self.pad_id, self.shuffle = seed, pack, pad_id, shuffle
        self.pad_multiple, self.group_by_length = int(pad_multiple), bool(group_by_length)
        self.epoch, self.row = 0, 0
        self._rows_epoch, self._rows = None, None
        self._lengths = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        if not self.shuffle:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, epoch])
        weights = getattr(self.examples, "weights", None)
        if not weights:
            return rng.permutation(n)
        sources = self.examples.sources
        parts = []
        for (start, size), count in zip(sources, mixture_counts([c for _, c in sources], weights)):
            reps = -(-count // size)
            parts.append(start + np.concatenate([rng.permutation(size) for _ in range(reps)])[:count]
                         if count else np.zeros(0, np.int64))
        return rng.permutation(np.concatenate(parts))

    def _epoch_rows(self, epoch: int):
        """Pack mode: the epoch's [(ids, labels)] rows; pad mode: the epoch's example order."""
        if self._rows_epoch != epoch:
            order = self._epoch_order(epoch)
            if self.pack:
                rows = pack_rows(self._take_examples(order), self.seq_len)
            elif self.group_by_length and self.shuffle:
                if self._lengths is None:
                    self._lengths = example_lengths(self.examples)
                # a generator of its own: the shuffled order stays the same with grouping off
                rows = length_grouped_order(order, self._lengths, self.batch_rows,
                                            np.random.default_rng([self.seed, epoch, 1]))
            else:
                rows = order
            self._rows_epoch, self._rows = epoch, rows
        return self._rows

    def _take(self, rows) -> list:
        return list(rows) if self.pack else self._take_examples(rows)

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
        chunk = self._take(rows[self.row:self.row + self.batch_rows])
        self.row += len(chunk)
        return self._padded(chunk)

    def _padded(self, rows: list) -> Batch:
        width = padded_width(max(len(r[0]) for r in rows), self.pad_multiple, self.seq_len)
        return make_batch(rows, self.pad_id, width, self.pad_multiple)

    def __iter__(self):
        """Batches of one pass in file order (for evaluation; does not move the position)."""
        n = len(self.examples)
        for i in range(0, n, self.batch_rows):
            yield self._padded(self._take_examples(range(i, min(i + self.batch_rows, n))))

    def _take_examples(self, indices) -> list:
        return [(e.ids, e.labels) for e in (self.examples[int(i)] for i in indices)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data position was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.row = int(state["epoch"]), int(state["row"])
