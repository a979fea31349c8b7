import json
import re

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


# -- nothing non-finite is saved; the state file is valid JSON and checked on load --------------
def test_nonfinite_parameters_are_never_saved(tmp_path):
    from qlora_ext.finite import NonFiniteError

    m = FakeLM()
    opt = {"step": np.array(1, np.int64)}
    save_checkpoint(tmp_path, m, state(1), opt)
    save_adapter_atomic(m, tmp_path)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()
    m.params["lm.w"][0, 0] = np.inf
    with pytest.raises(NonFiniteError, match=r"checkpoint-2: not saved: parameter lm\.w"):
        save_checkpoint(tmp_path, m, state(2), opt)
    with pytest.raises(NonFiniteError, match=r"parameter lm\.w"):
        save_adapter_atomic(m, tmp_path)
    m.params["lm.w"][0, 0] = 0
    with pytest.raises(NonFiniteError, match=r"optimizer state lm\.w\.exp_avg"):
        save_checkpoint(tmp_path, m, state(1), {**opt, "lm.w.exp_avg": np.full((2, 2), np.nan, np.float32)})
    assert latest_checkpoint(tmp_path).name == "checkpoint-1" and not (tmp_path / "checkpoint-2").exists()
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good


def test_state_file_is_strict_json(tmp_path):
    save_checkpoint(tmp_path, FakeLM(), {**state(3), "last_loss": float("nan"), "elapsed": float("inf")},
                    {"step": np.array(3, np.int64)})
    text = (tmp_path / "checkpoint-3" / "trainer_state.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in trainer_state.json"))
    st, _ = load_checkpoint(tmp_path / "checkpoint-3")
    assert st["last_loss"] is None and st["elapsed"] is None


def test_nonfinite_optimizer_state_is_refused_on_load(tmp_path):
    from qlora_ext.finite import NonFiniteError

    save_checkpoint(tmp_path, FakeLM(), state(4), {"step": np.array(4, np.int64),
                                                   "lm.w.exp_avg": np.ones((2, 2), np.float32)})
    p = tmp_path / "checkpoint-4" / "optimizer.safetensors"
    write_safetensors(p, {"step": np.array(4, np.int64), "lm.w.exp_avg": np.full((2, 2), np.nan, np.float32)})
    with pytest.raises(NonFiniteError, match=r"optimizer.safetensors: lm\.w\.exp_avg"):
        load_checkpoint(tmp_path / "checkpoint-4")


def test_keep_last_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, FakeLM(), state(1), {"step": np.array(1, np.int64)}, keep_last=-1)
    assert latest_checkpoint(tmp_path) is None


def _tamper(tmp_path, edit):
    save_checkpoint(tmp_path, FakeLM(), state(6), {"step": np.array(6, np.int64)})
    p = tmp_path / "checkpoint-6" / "trainer_state.json"
    st = json.loads(p.read_text())
    edit(st)
    p.write_text(json.dumps(st))
    return tmp_path / "checkpoint-6"


@pytest.mark.parametrize("edit,msg", [
    (lambda s: s.update(data=[1, 2]), "data must be an object"),
    (lambda s: s["data"].update(row=-3), "data.row must be an int >= 0 (at most 2^53), got -3"),
    (lambda s: s["data"].update(epoch="0"), "data.epoch must be an int >= 0"),
    (lambda s: s.update(rng={"model_step": 1.5}), "rng.model_step must be null or an int >= 0"),
    (lambda s: s.update(elapsed="1h"), "elapsed must be a finite number or null"),
    (lambda s: s.update(last_loss=[1]), "last_loss must be a finite number"),
    (lambda s: s.update(run=7), "run must be an object"),
    (lambda s: s.update(rng={"model_step": 2**70}), "rng.model_step must be null or an int >= 0 (at most 2^53)"),
])
def test_tampered_state_is_a_clear_error(tmp_path, edit, msg):
    ck = _tamper(tmp_path, edit)
    with pytest.raises(ValueError, match=r"checkpoint-6/trainer_state.json: " + re.escape(msg)):
        load_checkpoint(ck)


@pytest.mark.parametrize("text", ["[1, 2]", "[" * 100000 + "]" * 100000, '{"format": "qlora_ext-checkpoint-1"}', "\x00"])
def test_state_that_is_no_state_makes_the_checkpoint_incomplete(tmp_path, text):
    ck = _tamper(tmp_path, lambda s: None)
    (ck / "trainer_state.json").write_text(text)
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(OSError, match="not a complete qlora_ext checkpoint"):
        load_checkpoint(ck)


@pytest.mark.parametrize("header", [b"[]", b'{"a": 1}', b'{"a": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}',
                                    b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}',
                                    b'{"a": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}}',
                                    b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}'])
def test_hostile_optimizer_file_is_oserror(tmp_path, header):
    p = tmp_path / "o.safetensors"
    p.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(OSError, match="o.safetensors"):
        read_safetensors(p)


def test_trainer_state_fuzz(tmp_path_factory):
    """Any trainer_state.json content: the checkpoint is ignored as incomplete, or resuming
    from it gives a ValueError naming the checkpoint, or the resume is valid."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    from qlora_ext.train.checkpoint import is_complete
    from qlora_ext.train.data import DataLoader, Example
    from qlora_ext.train.loop import restore
    from qlora_ext.train.trainer import TrainConfig, Trainer

    base = tmp_path_factory.mktemp("fuzz")
    opt = Trainer(FakeLM(), TrainConfig()).optimizer_state()
    ck = save_checkpoint(base, FakeLM(), state(6), opt)
    good = json.loads((ck / "trainer_state.json").read_text())
    leaf = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
    value = st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                         max_leaves=8)
    keys = st.sampled_from(["step", "data", "rng", "elapsed", "last_loss", "run", "config", "format", "extra"])
    edits = st.dictionaries(keys, value, max_size=4)
    subkeys = st.dictionaries(st.sampled_from(["epoch", "row", "seed", "model_step"]), value, max_size=3)
    raw = st.binary(max_size=64)

    @hypothesis.settings(max_examples=150, deadline=None, database=None)
    @hypothesis.given(edits=edits, sub=subkeys, mode=st.sampled_from(["edit", "sub", "raw"]), blob=raw)
    def run(edits, sub, mode, blob):
        if mode == "raw":
            (ck / "trainer_state.json").write_bytes(blob)
        else:
            s = json.loads(json.dumps(good))
            if mode == "edit":
                s.update(edits)
            else:
                s["data" if "model_step" not in sub else "rng"] = sub
            (ck / "trainer_state.json").write_text(json.dumps(s))
        if not is_complete(ck):
            assert latest_checkpoint(base) is None
            return
        trainer = Trainer(FakeLM(), TrainConfig())
        loader = DataLoader([Example([1, 2, 3], [1, 2, 3], 1)] * 3, 4, 2)
        try:
            restore(trainer, loader, ck)
        except ValueError as e:
            assert "checkpoint-6" in str(e) and "\n" not in str(e)
            return
        assert trainer.step_count == 6 and loader.state_dict()["row"] >= 0
        loader.next_batch()  # the restored position is usable

    run()


# -- re-saving a step survives SIGKILL at every point ------------------------------------------
_KILL_CHILD = r"""
import os, shutil, signal, sys
import numpy as np
sys.path[:0] = sys.argv[3].split(os.pathsep)
from fake_lm import FakeLM
from qlora_ext.train.checkpoint import save_checkpoint

out, at = sys.argv[1], int(sys.argv[2])
calls = [0]
def killing(fn):
    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapped
for mod, name in ((os, "rename"), (os, "replace"), (os, "fsync"), (shutil, "rmtree"), (os, "mkdir")):
    setattr(mod, name, killing(getattr(mod, name)))
m = FakeLM()
m.params["lm.b"][:] = 2.0
save_checkpoint(out, m, {"step": 5, "data": {"epoch": 0, "row": 9}}, {"step": np.array(5, np.int64)}, keep_last=1)
"""


def test_resave_survives_sigkill_at_every_step(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import qlora_ext

    paths = os.pathsep.join([str(Path(qlora_ext.__file__).resolve().parents[1]), str(Path(__file__).parent)])
    killed = 0
    for at in range(1, 200):
        out = tmp_path / f"run{at}"
        m = FakeLM()
        m.params["lm.b"][:] = 1.0
        save_checkpoint(out, m, state(3), {"step": np.array(3, np.int64)})
        save_checkpoint(out, m, state(5), {"step": np.array(5, np.int64)})
        r = subprocess.run([sys.executable, "-c", _KILL_CHILD, str(out), str(at), paths], capture_output=True,
                           text=True, timeout=120)
        ck = latest_checkpoint(out)
        assert ck is not None and ck.name.endswith("checkpoint-5"), (at, sorted(p.name for p in out.iterdir()))
        loaded = FakeLM()
        loaded.load_adapter(ck)
        assert loaded.params["lm.b"][0] in (1.0, 2.0)
        # the next save finishes or undoes the interrupted one and leaves no debris
        save_checkpoint(out, loaded, state(5), {"step": np.array(5, np.int64)})
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
        assert latest_checkpoint(out) == out / "checkpoint-5"
        if r.returncode == 0:
            break
        assert r.returncode == -9, r.stderr
        killed += 1
    assert killed >= 8  # mkdir, the writes' fsyncs, both renames, the deletions: each one killed
