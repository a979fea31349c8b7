"""Fuzzing the data reader (hypothesis, bounded): any file gives the documented result, a
DataError naming the file and a line of it, or examples whose labels are their ids or -100."""
import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fake_lm import ByteTokenizer  # noqa: E402
from qlora_ext.train.data import IGNORE, DataError, check_records, load_examples  # noqa: E402

TOK = ByteTokenizer()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=12)
json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | text,
                          lambda kids: st.lists(kids, max_size=3) | st.dictionaries(text, kids, max_size=3),
                          max_leaves=8)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "bot"]),
                                 "content": text | st.integers()})
record = st.one_of(
    st.fixed_dictionaries({"text": text | json_value}),
    st.fixed_dictionaries({"prompt": text, "completion": text | st.none()}),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=4) | json_value}),
    st.dictionaries(text, json_value, max_size=3),
)
line = st.one_of(record.map(json.dumps), json_value.map(json.dumps),
                 st.binary(max_size=30).map(lambda b: b.decode("latin-1")), st.just(""),
                 st.just('{"text": "\\ud800"}'), st.just("[" * 5000), st.just('{"text": 1' + "0" * 5000 + "}"))


def check(path, n_lines):
    try:
        n = check_records(path)
    except DataError as e:
        assert str(e).startswith(f"{path}:") and 1 <= e.line <= max(n_lines, 1)
        with pytest.raises(DataError) as again:  # the loader finds the same fault
            load_examples(path, TOK, 16)
        assert str(again.value) == str(e)
        return
    assert n >= 1
    try:
        data, stats = load_examples(path, TOK, 16)
    except DataError as e:  # only "nothing to train within seq_len" remains possible
        assert "no example has a target token" in str(e)
        return
    assert stats.examples == len(data) >= 1
    for i in range(len(data)):
        ex = data[i]
        assert len(ex.ids) == len(ex.labels) <= 16 and 1 <= ex.line <= n_lines
        assert all(l in (IGNORE, t) for t, l in zip(ex.ids, ex.labels))


@FUZZ
@given(lines=st.lists(line, min_size=0, max_size=6))
def test_any_jsonl_gives_examples_or_a_data_error(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    check(path, len(lines))


@FUZZ
@given(raw=st.binary(max_size=200))
def test_any_bytes_give_examples_or_a_data_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    path.write_bytes(raw)
    check(path, raw.count(b"\n") + 1)
