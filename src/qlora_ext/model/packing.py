"""Packed rows: several documents in one row of a batch, told apart by segment ids.

A document is a run of equal segment ids along a row (an id that comes back after another
starts a new document).  Inside a packed row each token attends only to earlier tokens of its
own document (the attention kernels take the segments), its RoPE position counts from its
document's first token, and no token is trained to predict the next document's first token:
the conventions of transformers' packed batches (DataCollatorWithFlattening restarts
position_ids per example and sets the label of each example's first token to -100)."""
from __future__ import annotations

import numpy as np

from .loss import IGNORE_INDEX


def document_starts(segments: np.ndarray) -> np.ndarray:
    """segments int [B, T] (documents as runs of equal ids) -> int32 [B, T]: the first
    position of each position's run."""
    if not isinstance(segments, np.ndarray) or segments.dtype.kind not in "iu" or segments.ndim != 2:
        raise ValueError(f"segments: expected an integer numpy array [B, T], got "
                         f"{getattr(segments, 'dtype', type(segments).__name__)} {getattr(segments, 'shape', '')}")
    B, T = segments.shape
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    new = np.ones((B, T), bool)
    new[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return np.maximum.accumulate(np.where(new, pos, 0), axis=1).astype(np.int32)


def restarted_positions(segments: np.ndarray) -> np.ndarray:
    """int64 [B, T]: each token's position within its document (0 at every document start)."""
    T = segments.shape[1]
    return np.arange(T, dtype=np.int64)[None, :] - document_starts(segments)


def mask_cross_document_targets(labels: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """labels with the target of every document's first token (past position 0) set to
    IGNORE_INDEX: the token before it belongs to another document.  A new array when
    anything changes, else labels itself."""
    starts = np.zeros(segments.shape, bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    if not (starts & (labels != IGNORE_INDEX)).any():
        return labels
    out = np.array(labels, copy=True)
    out[starts] = IGNORE_INDEX
    return out


def check_packing(shape: tuple, position_ids, segment_ids, max_positions: int) -> tuple:
    """(positions int64 [B, T] or None, segments int32 [B, T] or None) of a batch of `shape`
    (B, T) from the user's position_ids / segment_ids ([B, T], or [T] for one row), with a
    ValueError naming what is wrong.  Without position_ids, packed rows restart their
    positions at each document; positions must lie in [0, max_positions)."""
    def as_rows(a, name):
        out = np.asarray(a)
        if out.ndim == 1:
            out = out[None]
        if out.shape != shape:
            raise ValueError(f"{name} has shape {np.shape(a)}, expected {shape} like input_ids")
        if not np.issubdtype(out.dtype, np.integer):
            raise ValueError(f"{name} must be integers, got {out.dtype}")
        return out

    segs = None if segment_ids is None else np.ascontiguousarray(as_rows(segment_ids, "segment_ids"), np.int32)
    if position_ids is not None:
        pos = as_rows(position_ids, "position_ids").astype(np.int64)
        if pos.min() < 0 or pos.max() >= max_positions:
            raise ValueError(f"position_ids must be in [0, {max_positions}), got values in "
                             f"[{pos.min()}, {pos.max()}]")
    else:
        pos = None if segs is None else restarted_positions(segs)
    return pos, segs
