import json

import numpy as np
import pytest

from fake_lm import FakeLM
from qlora_ext.train.checkpoint import (
    latest_checkpoint, list_checkpoints, load_checkpoint, read_safetensors, save_adapter_atomic,
    save_checkpoint, write_safetensors)


def test_safetensors_roundtrip_and_interop(tmp_path):
    t = {"a": np.arange(7, dtype=np.float32).reshape(7, 1), "step": np.array(5, np.int64),
         "z": np.zeros((0, 3), np.float32), "d": np.linspace(0, 1, 5)}
    write_safetensors(tmp_path / "x.safetensors", t)
    back = read_safetensors(tmp_path / "x.safetensors")
    for k in t:
        assert back[k].dtype == t[k].dtype and np.array_equal(back[k], t[k])
    st = pytest.importorskip("safetensors.numpy")
    other = st.load_file(str(tmp_path / "x.safetensors"))
    assert all(np.array_equal(other[k], t[k]) for k in t)


def test_corrupt_safetensors_is_oserror(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x10\x00")
    with pytest.raises(OSError, match="truncated"):
        read_safetensors(p)
    p.write_bytes((100).to_bytes(8, "little") + b"{}")
    with pytest.raises(OSError, match="exceeds the file size"):
        read_safetensors(p)


def state(step):
    return {"step": step, "data": {"epoch": 0, "row": step * 4}, "last_loss": 1.5}


def test_save_load_latest_and_keep_last(tmp_path):
    m = FakeLM()
    opt = {"step": np.array(3, np.int64), "lm.w.exp_avg": np.ones((2, 2), np.float32)}
    for s in (2, 10, 4):
        save_checkpoint(tmp_path, m, state(s), opt)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4", "checkpoint-10"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    st, o = load_checkpoint(tmp_path / "checkpoint-4")
    assert st == state(4) and np.array_equal(o["lm.w.exp_avg"], opt["lm.w.exp_avg"])
    save_checkpoint(tmp_path, m, state(12), opt, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-12"]
    m.params["lm.b"][:] = 7
    save_checkpoint(tmp_path, m, state(12), opt)  # re-saving a step replaces it
    m2 = FakeLM()
    m2.load_adapter(tmp_path / "checkpoint-12")
    assert (m2.params["lm.b"] == 7).all()
    assert not list(tmp_path.glob(".tmp-*"))


def test_incomplete_checkpoints_are_ignored(tmp_path):
    m = FakeLM()
    opt = {"step": np.array(1, np.int64)}
    save_checkpoint(tmp_path, m, state(1), opt)
    # a crash while writing: a temp dir, and a checkpoint dir missing its state
    (tmp_path / ".tmp-checkpoint-2-999").mkdir()
    bad = tmp_path / "checkpoint-3"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{}")
    wrong = tmp_path / "checkpoint-5"
    save_checkpoint(tmp_path, m, state(5), opt)
    (wrong / "trainer_state.json").write_text(json.dumps({"format": "qlora_ext-checkpoint-1", "step": 4}))
    assert latest_checkpoint(tmp_path).name == "checkpoint-1"
    with pytest.raises(OSError, match="not a complete qlora_ext checkpoint"):
        load_checkpoint(bad)
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_failed_save_leaves_no_checkpoint(tmp_path):
    class Broken(FakeLM):
        def save_adapter(self, d):
            super().save_adapter(d)
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, Broken(), state(7), {"step": np.array(7, np.int64)})
    assert latest_checkpoint(tmp_path) is None and not (tmp_path / "checkpoint-7").exists()
    save_checkpoint(tmp_path, FakeLM(), state(8), {"step": np.array(8, np.int64)})
    assert not list(tmp_path.glob(".tmp-*"))  # the next save cleans the debris


def test_save_adapter_atomic(tmp_path):
    m = FakeLM()
    m.params["lm.b"][:] = 3
    save_adapter_atomic(m, tmp_path / "out")
    m2 = FakeLM()
    m2.load_adapter(tmp_path / "out")
    assert (m2.params["lm.b"] == 3).all() and not list((tmp_path / "out").glob(".tmp-*"))
