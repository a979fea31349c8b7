import json

import numpy as np
import pytest

from fake_lm import ByteTokenizer
from qlora_ext.train.data import IGNORE, DataError, DataLoader, check_records, generation_pairs, load_examples

TOK = ByteTokenizer()


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return p


def test_text_prompt_and_messages_labels(tmp_path):
    p = write(tmp_path, [
        {"text": "hi"},
        "",
        {"prompt": "Q:", "completion": "A"},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "yz"},
                      {"role": "user", "content": "w"}, {"role": "assistant", "content": "v"}]},
    ])
    ex, stats = load_examples(p, TOK, 128)
    assert [e.line for e in ex] == [1, 3, 4]
    bos, eos = TOK.bos_token_id, TOK.eos_token_id
    assert ex[0].ids == [bos, ord("h"), ord("i"), eos] and ex[0].labels == ex[0].ids
    assert ex[1].ids == [bos, ord("Q"), ord(":"), ord("A"), eos]
    assert ex[1].labels == [IGNORE] * 3 + [ord("A"), eos]
    # messages: exactly the assistant contents and the <|im_end|> after each are trained
    full = TOK.encode(TOK.apply_chat_template(json.loads(p.read_text().splitlines()[3])["messages"]))
    assert ex[2].ids == full
    trained = TOK.decode([t if l != IGNORE else 0 for t, l in zip(ex[2].ids, ex[2].labels)], False)
    assert trained.replace("\x00", "") == "yz<|im_end|>v<|im_end|>"
    assert stats.examples == 3 and stats.tokens == sum(len(e.ids) for e in ex)


def test_messages_spans_with_real_chat_template(tmp_path):
    """The tiny checkpoint's tokenizer (tokenizers + its Jinja chat template)."""
    pytest.importorskip("tokenizers")
    from model_factory import make_tiny_checkpoint
    from qlora_ext.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(make_tiny_checkpoint(tmp_path / "m", model_type="llama"))
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a b"},
            {"role": "assistant", "content": "c d"}]
    p = write(tmp_path, [{"messages": msgs}])
    (ex,), _ = load_examples(p, tok, 512)
    assert ex.ids == tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False)
    prompt = tok.encode(tok.apply_chat_template(msgs[:2], add_generation_prompt=True))
    n = len(prompt)
    assert ex.labels[:n] == [IGNORE] * n
    trained = [t for t, l in zip(ex.ids, ex.labels) if l != IGNORE]
    assert trained == ex.ids[n:n + len(trained)]  # one contiguous run right after the prompt
    assert tok.decode(trained, skip_special_tokens=False) == "c d<|im_end|>"


@pytest.mark.parametrize("line,msg", [
    ("{bad json", "d.jsonl:2: invalid JSON"),
    ("[1, 2]", "d.jsonl:2: expected a JSON object, got list"),
    ('{"prompt": "x"}', 'd.jsonl:2: field "completion" must be a string, got missing'),
    ('{"text": 3}', 'd.jsonl:2: field "text" must be a string, got a int'),
    ('{"foo": "x"}', "d.jsonl:2: expected a \"text\""),
    ('{"messages": [{"role": "user", "content": "x"}]}', "d.jsonl:2: \"messages\" has no assistant turn"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "d.jsonl:2: messages[0] has role 'bot'"),
    ('{"messages": []}', "d.jsonl:2: \"messages\" must be a non-empty list"),
])
def test_bad_data_names_file_and_line(tmp_path, line, msg):
    p = write(tmp_path, [{"text": "ok"}, line])
    with pytest.raises(DataError) as e:
        load_examples(p, TOK, 64)
    assert msg in str(e.value) and isinstance(e.value, ValueError)
    assert e.value.line == 2
    with pytest.raises(DataError) as e2:  # the tokenizer-free pre-check finds the same fault
        check_records(p)
    assert str(e2.value) == str(e.value)


def test_empty_and_undecodable_files(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty.jsonl:1: no examples"):
        load_examples(p, TOK, 64)
    p.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"empty.jsonl:2: not valid UTF-8"):
        load_examples(p, TOK, 64)
    with pytest.raises(OSError):
        load_examples(tmp_path / "missing.jsonl", TOK, 64)


def test_truncation_splitting_and_dropping(tmp_path):
    p = write(tmp_path, [{"text": "abcdefghij"}, {"prompt": "a" * 20, "completion": "b"},
                         {"prompt": "a", "completion": "bcdefghijk"}])
    ex, stats = load_examples(p, TOK, 5)
    # text: 12 tokens -> pieces of 5, 5, 2; the prompt-only piece is dropped; the third truncated
    assert [len(e.ids) for e in ex] == [5, 5, 2, 5]
    assert stats.dropped == 1 and stats.truncated == 2
    with pytest.raises(ValueError, match="seq_len"):
        load_examples(p, TOK, 1)


def make_examples(tmp_path, n=11):
    p = write(tmp_path, [{"prompt": f"p{i}", "completion": "c" * (i % 4 + 1)} for i in range(n)])
    return load_examples(p, TOK, 16)[0]


def test_loader_is_deterministic_resumable_and_reshuffles(tmp_path):
    ex = make_examples(tmp_path)
    a = DataLoader(ex, 16, 4, seed=3, pad_id=TOK.pad_token_id)
    seq = [a.next_batch() for _ in range(7)]  # crosses two epoch boundaries (3 batches/epoch)
    assert a.batches_per_epoch == 3 and [len(b) for b in seq] == [4, 4, 3, 4, 4, 3, 4]
    ep0 = sorted(tuple(r[r != TOK.pad_token_id]) for b in seq[:3] for r in b.input_ids)
    assert ep0 == sorted(tuple(e.ids) for e in ex)  # one epoch = every example once
    assert not np.array_equal(seq[0].input_ids, seq[3].input_ids)  # epoch 1 reshuffled
    b = DataLoader(ex, 16, 4, seed=3, pad_id=TOK.pad_token_id)
    for _ in range(4):
        b.next_batch()
    c = DataLoader(ex, 16, 4, seed=3, pad_id=TOK.pad_token_id)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    for want in seq[4:]:
        got = c.next_batch()
        assert np.array_equal(got.input_ids, want.input_ids) and np.array_equal(got.labels, want.labels)
    other = DataLoader(ex, 16, 4, seed=4, pad_id=TOK.pad_token_id)
    assert not np.array_equal(other.next_batch().input_ids, seq[0].input_ids)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(b.state_dict())


def test_padding_packing_and_sharding(tmp_path):
    ex = make_examples(tmp_path)
    pad = TOK.pad_token_id
    b = DataLoader(ex, 16, 5, seed=0, pad_id=TOK.pad_token_id).next_batch()
    T = max(int(m.sum()) for m in b.attention_mask)
    assert b.input_ids.shape == (5, T)  # padded to the longest row, not seq_len
    assert ((b.labels == IGNORE) | (b.attention_mask == 1)).all()
    assert (b.input_ids[b.attention_mask == 0] == pad).all()
    pk = DataLoader(ex, 16, 100, seed=0, pack=True, pad_id=TOK.pad_token_id)
    rows = pk.next_batch()
    assert rows.segment_ids is not None and rows.input_ids.shape[1] <= 16
    assert int(rows.attention_mask.sum()) == sum(len(e.ids) for e in ex)   # whole examples, none cut
    # shards: disjoint, cover the batch, possibly empty; micro-batches trim padding
    shards = [b.shard(r, 3) for r in range(3)]
    assert sum(len(s) for s in shards) == 5
    assert np.array_equal(np.concatenate([s.labels[:, :1] for s in shards]), b.labels[:, :1])
    assert len(b.rows(0, 2).shard(2, 3)) == 0 or len(b.rows(0, 2).shard(0, 3)) == 0
    for ids, labels, mask in b.micro_batches(2):
        assert ids.shape[0] <= 2 and mask[:, -1].any()


def test_generation_pairs(tmp_path):
    p = write(tmp_path, [{"text": "x"}, {"prompt": "Q", "completion": "A"},
                         {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "r"}]}])
    pairs = generation_pairs(p, TOK)
    assert pairs[0] == ([TOK.bos_token_id, ord("Q")], "A")
    assert TOK.decode(pairs[1][0], False).endswith("<|im_start|>assistant\n") and pairs[1][1] == "r"


def test_shipped_dataset_is_valid_and_deterministic(tmp_path):
    from qlora_ext.data import dataset_path, make_records

    train, evals = make_records.build()
    for split, rows in (("train", train), ("eval", evals)):
        lines = dataset_path(split).read_text().splitlines()
        assert lines == [json.dumps(r) for r in rows]  # the committed files are the script's output
    train_prompts = {r["messages"][1]["content"] for r in train}
    assert not train_prompts & {r["messages"][1]["content"] for r in evals}
    for r in evals:
        ans = json.loads(r["messages"][2]["content"])
        assert set(ans) == {"name", "age", "city"} and str(ans["age"]) in r["messages"][1]["content"]
    ex, _ = load_examples(dataset_path("train"), TOK, 256)
    assert len(ex) == len(train)
    with pytest.raises(ValueError, match="unknown split"):
        dataset_path("test")


def test_pack_rows_whole_examples_with_segments():
    from qlora_ext.train.data import make_batch, pack_rows

    ex = [([1, 2, 3], [IGNORE, 2, 3]), ([4, 5], [4, 5]), ([6], [6]), ([7, 8, 9, 10], [7, 8, 9, 10]),
          ([11] * 6, [IGNORE] * 6)]
    rows = pack_rows(ex, 6)
    # [1 2 3 | 4 5 | 6] fills 6; [7..10] starts a row; the all-IGNORE example makes a row that
    # trains nothing, so it is dropped
    assert [r[0] for r in rows] == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]]
    assert rows[0][2] == [0, 0, 0, 1, 1, 2]
    # each later example's first label is ignored: no example learns the next one's start
    assert rows[0][1] == [IGNORE, 2, 3, IGNORE, 5, IGNORE]
    assert rows[1][1] == [7, 8, 9, 10]
    b = make_batch(rows, pad_id=0, width=6)
    assert b.segment_ids.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 1, 1]]
    assert b.attention_mask.tolist()[1] == [1, 1, 1, 1, 0, 0]
    assert len(b.as_tuple()) == 4 and len(b.rows(1, 2).micro_batches(1)[0]) == 4


def test_packed_loader_is_seeded_and_resumable(tmp_path):
    ex = make_examples(tmp_path)
    a = DataLoader(ex, 24, 2, seed=3, pack=True, pad_id=TOK.pad_token_id)
    first = [a.next_batch() for _ in range(2)]
    state = a.state_dict()
    nxt = a.next_batch()
    b = DataLoader(ex, 24, 2, seed=3, pack=True, pad_id=TOK.pad_token_id)
    b.load_state_dict(state)
    again = b.next_batch()
    assert np.array_equal(nxt.input_ids, again.input_ids) and np.array_equal(nxt.segment_ids, again.segment_ids)
    c = DataLoader(ex, 24, 2, seed=3, pack=True, pad_id=TOK.pad_token_id)
    assert all(np.array_equal(x.segment_ids, c.next_batch().segment_ids) for x in first)
