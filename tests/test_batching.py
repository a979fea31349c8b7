"""Batches without wasted tokens: padded only to the longest row rounded up to the placement's
multiple, rows of similar length grouped (seeded, reproducible, resumable), the loss of a
padded batch equal to the rows' own losses, and the train command's --no-group-by-length and
padding counts as a user sees them."""
import json

import numpy as np
import pytest

from fake_lm import ByteTokenizer
from qlora_ext.train.data import (DataLoader, Example, IGNORE, length_grouped_order, load_examples,
                                  padded_width)

TOK = ByteTokenizer()
PAD = TOK.pad_token_id


def varied_examples(n=37, seed=0):
    """n examples of 3..40 tokens, lengths in random order (37: not a multiple of any batch)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(3, 41))
        ids = [int(t) for t in rng.integers(1, 200, k)]
        out.append(Example(ids, [IGNORE] + ids[1:], i + 1))
    return out


def rows_of(batch):
    return [tuple(int(t) for t, m in zip(r, mk) if m) for r, mk in zip(batch.input_ids, batch.attention_mask)]


def test_padded_width():
    assert [padded_width(n, 64, 256) for n in (1, 63, 64, 65, 200, 256)] == [64, 64, 64, 128, 256, 256]
    assert padded_width(70, 64, 100) == 100          # not past the widest row allowed
    assert padded_width(120, 64, 100) == 120         # unless the row itself is wider
    assert [padded_width(n, 1, 256) for n in (1, 7, 256)] == [1, 7, 256]


def test_length_grouped_order_is_a_seeded_permutation_of_similar_lengths():
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 500, 1003)
    order = rng.permutation(1003)
    got = length_grouped_order(order, lengths, 8, np.random.default_rng(1), group_batches=10)
    assert sorted(got.tolist()) == list(range(1003))
    again = length_grouped_order(order, lengths, 8, np.random.default_rng(1), group_batches=10)
    assert np.array_equal(got, again)
    assert not np.array_equal(got, length_grouped_order(order, lengths, 8, np.random.default_rng(2), group_batches=10))
    # the short last batch (1003 = 125 * 8 + 3) stays last, so every full batch is aligned
    last_group = order[960:]                                     # groups of 80: 12 full, then 43 rows
    assert np.array_equal(got[-3:], last_group[np.argsort(lengths[last_group], kind="stable")][-3:])
    spread = lambda o: np.mean([np.ptp(lengths[o[i:i + 8]]) for i in range(0, 1000, 8)])  # noqa: E731
    assert spread(got) < spread(order) / 5
    # batches are not in length order (no long-to-short run through a group)
    first = [lengths[got[i:i + 8]].max() for i in range(0, 80, 8)]
    assert first != sorted(first) and first != sorted(first, reverse=True)


@pytest.mark.parametrize("multiple", [1, 8, 64])
def test_grouped_batches_are_an_epoch_padded_to_the_rounded_longest_row(multiple):
    ex = varied_examples()
    loader = DataLoader(ex, 48, 4, seed=3, pad_id=PAD, pad_multiple=multiple, group_by_length=True)
    batches = [loader.next_batch() for _ in range(loader.batches_per_epoch)]
    seen = sorted(r for b in batches for r in rows_of(b))
    assert seen == sorted(tuple(e.ids) for e in ex)           # one epoch: every example once
    for b in batches:
        longest = int(b.attention_mask.sum(axis=1).max())
        assert b.input_ids.shape[1] == padded_width(longest, multiple, 48)
        assert (b.input_ids[b.attention_mask == 0] == PAD).all() and (b.labels[b.attention_mask == 0] == IGNORE).all()
        for ids, labels, mask in b.micro_batches(3):          # micro-batches keep the rounding
            assert ids.shape[1] == padded_width(int(mask.sum(axis=1).max()), multiple, b.input_ids.shape[1])
    plain = DataLoader(ex, 48, 4, seed=3, pad_id=PAD, pad_multiple=1)
    padded = lambda bs: sum(b.input_ids.size for b in bs)     # noqa: E731
    if multiple == 1:
        assert padded(batches) < padded([plain.next_batch() for _ in range(plain.batches_per_epoch)])
    # reproducible for a seed, resumable from a position, another seed another order
    same = DataLoader(ex, 48, 4, seed=3, pad_id=PAD, pad_multiple=multiple, group_by_length=True)
    assert all(np.array_equal(same.next_batch().input_ids, b.input_ids) for b in batches)
    part = DataLoader(ex, 48, 4, seed=3, pad_id=PAD, pad_multiple=multiple, group_by_length=True)
    for _ in range(4):
        part.next_batch()
    resumed = DataLoader(ex, 48, 4, seed=3, pad_id=PAD, pad_multiple=multiple, group_by_length=True)
    resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
    assert all(np.array_equal(resumed.next_batch().input_ids, b.input_ids) for b in batches[4:])
    other = DataLoader(ex, 48, 4, seed=4, pad_id=PAD, pad_multiple=multiple, group_by_length=True)
    assert [rows_of(other.next_batch()) for _ in range(3)] != [rows_of(b) for b in batches[:3]]


def test_grouping_reads_lengths_from_the_token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"prompt": "p" * (i % 7 + 1), "completion": "c" * (i % 5 + 1)}) + "\n"
                         for i in range(30)))
    data, _ = load_examples(p, TOK, 32)
    assert data.lengths().tolist() == [len(data[i].ids) for i in range(len(data))]
    a = DataLoader(data, 32, 4, seed=0, pad_id=PAD, group_by_length=True)
    b = DataLoader([data[i] for i in range(len(data))], 32, 4, seed=0, pad_id=PAD, group_by_length=True)
    assert all(np.array_equal(a.next_batch().input_ids, b.next_batch().input_ids) for _ in range(8))


def test_eval_batches_are_rounded_too():
    ex = varied_examples(9)
    for b in DataLoader(ex, 48, 4, pad_id=PAD, shuffle=False, pad_multiple=16):
        assert b.input_ids.shape[1] == padded_width(int(b.attention_mask.sum(axis=1).max()), 16, 48)
    with pytest.raises(ValueError, match="pad_multiple"):
        DataLoader(ex, 48, 4, pad_multiple=0)


def _tiny_model(tmp_path):
    from model_factory import make_tiny_checkpoint

    from qlora_ext.api import load_model
    from qlora_ext.model.lora import LoraConfig

    model = load_model(make_tiny_checkpoint(tmp_path / "m", model_type="llama"), lora=LoraConfig(r=4, alpha=8),
                       device="cpu")
    # a trained-looking adapter (B = 0 would hide the LoRA path from the comparison)
    rng = np.random.default_rng(0)
    model.set_parameters({k: rng.standard_normal(v.shape).astype(np.float32) * 0.05
                          for k, v in model.parameters().items()})
    return model


def _per_row_vs_padded(model, multiple):
    ex = varied_examples(6, seed=1)
    V = int(model.config.vocab_size)
    ex = [Example([t % V for t in e.ids], [IGNORE] + [t % V for t in e.ids[1:]], e.line) for e in ex]
    batch = DataLoader(ex, 128, 6, seed=0, pad_id=0, pad_multiple=multiple, group_by_length=True).next_batch()
    assert batch.input_ids.shape[1] % multiple == 0 and (batch.attention_mask == 0).any()
    padded = model.loss(*batch.as_tuple(), reduction="sum")
    rows = [(np.array([e.ids]), np.array([e.labels])) for e in ex]
    unpadded = sum(model.loss(ids, labels, reduction="sum") for ids, labels in rows)
    return batch, rows, padded, unpadded


def test_padded_loss_and_grads_equal_the_rows_own_on_the_cpu(tmp_path):
    model = _tiny_model(tmp_path)
    assert model.pad_multiple == 1
    batch, rows, padded, unpadded = _per_row_vs_padded(model, 16)
    assert padded == pytest.approx(unpadded, rel=1e-6)
    _, grads = model.loss_and_grads(*batch.as_tuple(), reduction="sum")
    want = {k: np.zeros_like(v, dtype=np.float64) for k, v in grads.items()}
    for ids, labels in rows:
        for k, g in model.loss_and_grads(ids, labels, reduction="sum")[1].items():
            want[k] += g
    for k, g in grads.items():
        assert np.abs(g - want[k]).max() <= 1e-5 * np.abs(want[k]).max(), k


def test_padded_loss_equals_the_rows_own_on_the_gpu(tmp_path):
    from gpu_support import gpu_twin, gpu_context

    ctx = gpu_context()
    gpu = gpu_twin(_tiny_model(tmp_path), ctx)
    assert gpu.pad_multiple == 64
    _, _, padded, unpadded = _per_row_vs_padded(gpu, gpu.pad_multiple)
    assert padded == pytest.approx(unpadded, rel=1e-5)


def test_train_groups_by_length_unless_told_and_reports_padding(tmp_path, monkeypatch, capsys):
    """As a user runs it: the default groups rows by length, --no-group-by-length does not
    (kept in run.yaml, so --resume keeps it); metrics.jsonl counts real and padded tokens."""
    from model_factory import make_tiny_checkpoint

    from qlora_ext import cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("QLORA_EXT_PROGRESS_INTERVAL", "0")
    model = make_tiny_checkpoint(tmp_path / "m", model_type="llama")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "w " * (i * 7 % 23 + 1), "completion": "x" * (i % 3 + 1)}) + "\n"
                            for i in range(32)))

    def train(out, *extra):
        assert cli.main(["train", "--model", model, "--data", str(data), "--epochs", "1", "--seq-len", "64",
                         "--batch-size", "4", "--device", "cpu", "--lora-rank", "2", "--out", str(tmp_path / out),
                         *extra]) == 0
        lines = [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return lines, capsys.readouterr()

    grouped, shown = train("grouped")
    assert "(real tokens; padding " in shown.err and "tokens/s on real tokens; " in shown.out
    plain, _ = train("plain", "--no-group-by-length")
    for lines in (grouped, plain):
        assert all(0 < m["tokens"] <= m["padded_tokens"] for m in lines)
        assert sum(m["tokens"] for m in lines) == sum(m["tokens"] for m in grouped)  # the same epoch
    assert sum(m["padded_tokens"] for m in grouped) < sum(m["padded_tokens"] for m in plain)
    assert "group_by_length: false" in (tmp_path / "plain" / "run.yaml").read_text()
    resumed, _ = train("plain", "--resume", str(tmp_path / "plain"), "--epochs", "2")
    assert [m["padded_tokens"] for m in resumed[:len(plain)]] == [m["padded_tokens"] for m in plain]
    again, _ = train("plain2", "-c", str(tmp_path / "plain" / "run.yaml"), "--epochs", "1")
    assert [m["padded_tokens"] for m in again] == [m["padded_tokens"] for m in plain]
