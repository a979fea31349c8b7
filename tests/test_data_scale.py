"""Data at scale: the tokenization cache, bounded memory, weighted mixtures, Parquet input."""
import json
import tracemalloc

import numpy as np
import pytest

from fake_lm import ByteTokenizer
from qlora_ext.train.data import (DataError, DataLoader, check_records, load_data, load_examples,
                                  parse_data_spec)
from qlora_ext.train.data import mixture_counts
from qlora_ext.train.token_cache import CACHE_DIR

TOK = ByteTokenizer()


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def as_lists(data):
    return [(e.ids, e.labels, e.line) for e in (data[i] for i in range(len(data)))]


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "qlora_ext" / "tokens"


def test_cache_beside_the_data_is_reused_and_keyed(tmp_path, user_cache):
    p = write(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": "c" * (i % 5 + 1)} for i in range(20)])
    first, s1 = load_examples(p, TOK, 16)
    assert not s1.cached
    entries = list((tmp_path / CACHE_DIR).iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("d.jsonl-")
    again, s2 = load_examples(p, TOK, 16)
    assert s2.cached and as_lists(again) == as_lists(first)
    assert (s2.examples, s2.tokens) == (s1.examples, s1.tokens)
    # another seq_len, another content: new entries; the old ones still serve their key
    assert not load_examples(p, TOK, 8)[1].cached
    write(p, [{"text": "changed"}])
    changed, s3 = load_examples(p, TOK, 16)
    assert not s3.cached and changed[0].ids == TOK.encode("changed", add_special_tokens=True) + [TOK.eos_token_id]
    assert len(list((tmp_path / CACHE_DIR).iterdir())) == 3
    assert not user_cache.exists()


def test_damaged_cache_entry_is_rebuilt(tmp_path, user_cache):
    p = write(tmp_path / "d.jsonl", [{"text": "abc"}, {"text": "defg"}])
    want = as_lists(load_examples(p, TOK, 16)[0])
    (entry,) = (tmp_path / CACHE_DIR).iterdir()
    with open(entry / "ids.i32", "r+b") as f:
        f.truncate(4)
    data, stats = load_examples(p, TOK, 16)
    assert not stats.cached and as_lists(data) == want


def test_unwritable_data_dir_and_cache_off(tmp_path, user_cache, monkeypatch):
    d = tmp_path / "ro"
    d.mkdir()
    p = write(d / "d.jsonl", [{"text": "abc"}])
    (d / CACHE_DIR).write_text("")  # the cache cannot be made here (and root ignores permissions)
    ids = TOK.encode("abc", add_special_tokens=True) + [TOK.eos_token_id]
    assert as_lists(load_examples(p, TOK, 16)[0]) == [(ids, ids, 1)]
    assert [e.name.split("-")[0] for e in user_cache.iterdir()] == ["d.jsonl"]  # the user's cache instead
    assert load_examples(p, TOK, 16)[1].cached
    monkeypatch.setenv("QLORA_EXT_DATA_CACHE", "0")
    import shutil

    shutil.rmtree(user_cache)
    data, stats = load_examples(p, TOK, 16)
    assert as_lists(data) == [(ids, ids, 1)] and not stats.cached and not user_cache.exists()


def test_memory_stays_bounded_for_a_large_file(tmp_path, user_cache):
    """~6 MB of JSONL (1.5 M tokens: ~50 MB as Python lists) tokenized with a peak of a few
    MB of Python memory; batches read from the memory-mapped arrays."""
    from model_factory import make_tiny_checkpoint
    from qlora_ext.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(make_tiny_checkpoint(tmp_path / "m", model_type="llama"))
    p = tmp_path / "big.jsonl"
    rng = np.random.default_rng(0)
    with open(p, "w") as f:
        for i in range(12000):
            words = " ".join("the cat and her hat"[int(k) % 15:][:7] for k in rng.integers(0, 15, 60))
            f.write(json.dumps({"text": f"{i}: {words}"}) + "\n")
    assert p.stat().st_size > 5e6
    tracemalloc.start()
    data, stats = load_examples(p, tok, 128)
    loader = DataLoader(data, 128, 32, seed=1, pad_id=0)
    for _ in range(20):
        loader.next_batch()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert stats.tokens > 1_000_000 and peak < 8e6, (stats.tokens, peak)


def test_data_spec_parsing():
    assert parse_data_spec("a.jsonl") == [("a.jsonl", None)]
    assert parse_data_spec("a.jsonl:0.7,b.jsonl:0.3") == [("a.jsonl", 0.7), ("b.jsonl", 0.3)]
    assert parse_data_spec("C:\\d\\a.jsonl") == [("C:\\d\\a.jsonl", None)]
    assert parse_data_spec("x:y.jsonl:2") == [("x:y.jsonl", 2.0)]
    for bad, msg in [("a.jsonl:0.5,b.jsonl", "every file or to none"), ("a.jsonl:0", "finite number > 0"),
                     ("a.jsonl:nan", "finite number > 0"), ("a.jsonl:-1", "finite number > 0"),
                     ("a.jsonl:1,a.jsonl:2", "named twice"), ("", "expected a file"), ("a.jsonl,,b", "empty file")]:
        with pytest.raises(ValueError, match=msg):
            parse_data_spec(bad, "--data")


def test_mixture_counts_are_exact():
    assert mixture_counts([10, 10], [0.7, 0.3]) == [14, 6]
    assert mixture_counts([3, 4], [1, 1]) == [4, 3] or mixture_counts([3, 4], [1, 1]) == [3, 4]
    for sizes, w in [([5, 7, 11], [0.2, 0.5, 0.3]), ([1, 1000], [0.5, 0.5]), ([13], [3.0])]:
        c = mixture_counts(sizes, w)
        assert sum(c) == sum(sizes) and all(abs(ci - wi / sum(w) * sum(sizes)) < 1 for ci, wi in zip(c, w))


def test_mixture_epochs_have_the_weighted_shares_and_are_seeded(tmp_path, user_cache):
    a = write(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(30)])
    b = write(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    data, stats = load_data(parse_data_spec(f"{a}:0.3,{b}:0.7"), TOK, 16)
    assert len(data) == 40 and stats.examples == 40

    def epoch_rows(seed, epochs=2):
        loader = DataLoader(data, 16, 8, seed=seed, pad_id=TOK.pad_token_id)
        out = []
        for _ in range(epochs * loader.batches_per_epoch):
            batch = loader.next_batch()
            out += [TOK.decode([t for t in r if t < 256]) for r in batch.input_ids]
        return out, loader

    rows, loader = epoch_rows(3)
    assert loader.batches_per_epoch == 5
    for ep in (rows[:40], rows[40:]):
        assert sum(r.startswith("a") for r in ep) == 12 and sum(r.startswith("b") for r in ep) == 28
        b_rows = [r for r in ep if r.startswith("b")]
        assert set(b_rows) == {f"b{i}" for i in range(10)}  # 28 draws from 10: every one, reshuffled passes
        assert len(set(r for r in ep if r.startswith("a"))) == 12  # 12 of 30, without replacement
    assert rows == epoch_rows(3)[0]  # reproducible
    assert rows != epoch_rows(4)[0]
    # resuming from a position gives the same later batches
    again = DataLoader(data, 16, 8, seed=3, pad_id=TOK.pad_token_id)
    again.load_state_dict({"epoch": 1, "row": 16, "seed": 3})
    nxt = again.next_batch()
    assert [TOK.decode([t for t in r if t < 256]) for r in nxt.input_ids] == rows[56:64]


def test_unweighted_files_are_concatenated(tmp_path, user_cache):
    a = write(tmp_path / "a.jsonl", [{"text": "x"}] * 3)
    b = write(tmp_path / "b.jsonl", [{"text": "y"}] * 2)
    data, stats = load_data(parse_data_spec(f"{a},{b}"), TOK, 16)
    assert data.weights is None and len(data) == 5 and [data[i].line for i in range(5)] == [1, 2, 3, 1, 2]


def test_mixture_from_the_command_line(tmp_path, user_cache, capsys):
    pytest.importorskip("tokenizers")
    from model_factory import make_tiny_checkpoint
    from qlora_ext import cli

    model = make_tiny_checkpoint(tmp_path / "m", model_type="llama")
    a = write(tmp_path / "a.jsonl", [{"prompt": f"add {i}:", "completion": f" {i + 1}"} for i in range(12)])
    b = write(tmp_path / "b.jsonl", [{"text": f"note {i}"} for i in range(4)])
    args = ["train", "--model", model, "--data", f"{a}:0.5,{b}:0.5", "--steps", "3", "--batch-size", "4",
            "--seq-len", "32", "--device", "cpu", "--threads", "1"]
    assert cli.main(args + ["--out", str(tmp_path / "r1")]) == 0
    out = capsys.readouterr()
    assert f"data: {a}:0.5,{b}:0.5: 16 examples" in out.out
    assert "tokenizing a.jsonl: 12 records, done in" in out.err  # a log line per phase off a terminal
    assert cli.main(args + ["--out", str(tmp_path / "r2")]) == 0
    assert "(tokenized earlier: from the cache)" in capsys.readouterr().out
    l1 = (tmp_path / "r1" / "metrics.jsonl").read_text().splitlines()
    l2 = (tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in l1] == [json.loads(x)["loss"] for x in l2]
    assert cli.main(args[:4] + [f"{a}:0.5,{tmp_path / 'missing.jsonl'}:0.5"] + args[5:] + ["--out", str(tmp_path / "r3")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


# ---- Parquet ----

def parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parquet_rows_equal_jsonl_lines(tmp_path, user_cache):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(7)]
    pq_path = parquet(tmp_path / "d.parquet", rows)
    js = write(tmp_path / "d.jsonl", rows)
    assert check_records(pq_path) == 7
    assert as_lists(load_examples(pq_path, TOK, 32)[0]) == as_lists(load_examples(js, TOK, 32)[0])
    chats = [{"messages": [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"r{i}"}]}
             for i in range(3)]
    pq2 = parquet(tmp_path / "c.parquet", chats)
    assert as_lists(load_examples(pq2, TOK, 64)[0]) == as_lists(load_examples(write(tmp_path / "c.jsonl", chats),
                                                                               TOK, 64)[0])


def test_parquet_bad_row_is_named_by_row(tmp_path):
    p = parquet(tmp_path / "d.parquet", [{"text": "ok"}, {"text": None}, {"text": "x"}])
    with pytest.raises(DataError, match=r"d.parquet:row 2: expected a \"text\""):
        check_records(p)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="bad.parquet: not a readable Parquet file"):
        check_records(bad)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pyarrow(name, *a, **k):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"d.parquet: reading Parquet needs pyarrow: pip install 'qlora_ext\[parquet\]'"):
        check_records(p)
