"""The dataset shipped with qlora_ext: "records", a small task written for this project.

Each example asks the chat model to turn a one-sentence description of a person into a
fixed JSON shape, e.g. "Record: Mira (34) moved to Oslo last spring." ->
{"name": "Mira", "age": 34, "city": "Oslo"}.  The answer is checkable by exact match, and
SmolLM2-135M-Instruct does not produce this shape on its own, so a short fine-tune shows a
held-out accuracy that rises.  Regenerate with `python -m qlora_ext.data.make_records`."""
from __future__ import annotations

from pathlib import Path

SPLITS = ("train", "eval")


def dataset_path(split: str = "train") -> Path:
    """Path of the shipped records_<split>.jsonl ('train' or 'eval')."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return Path(__file__).with_name(f"records_{split}.jsonl")
