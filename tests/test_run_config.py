"""`qlora-ext train -c run.yaml`: flags over the file over defaults, errors naming the key,
run.yaml written to --out and read back by --resume (a stand-in model: only the CLI's
settings flow is under test here; test_cli runs the real model)."""
import json

import pytest
import yaml

from fake_lm import FakeLM

from qlora_ext import cli
from qlora_ext.run_config import read_run_config


@pytest.fixture
def runs(tmp_path, monkeypatch):
    seen = []

    def fake_load(path, **kw):
        seen.append(dict(kw, path=path))
        return FakeLM()

    monkeypatch.setattr(cli, "load_model", fake_load)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of text"}) + "\n" for i in range(12)))
    return tmp_path, data, seen


def saved(out):
    return yaml.safe_load((out / "run.yaml").read_text())


def test_file_overrides_defaults_and_flags_override_the_file(runs):
    tmp, data, seen = runs
    cfg = tmp / "run.yaml"
    cfg.write_text(f"data: {data}\nseq-len: 32\nbatch_size: 2\nlr: 1e-2\nsteps: 3\nlora-rank: 4\npack: true\n"
                   "schedule: cosine\nsave-every: 2\nseed: 9\nrevision: null\n")
    assert cli.main(["train", "-c", str(cfg), "--out", str(tmp / "a"), "--seed", "11", "--quiet"]) == 0
    s = saved(tmp / "a")
    assert (s["seq_len"], s["batch_size"], s["lr"], s["steps"], s["lora_rank"], s["pack"]) == (32, 2, 0.01, 3, 4, True)
    assert s["schedule"] == "cosine" and s["seed"] == 11 and s["save_every"] == 2
    assert s["weight_decay"] == cli.TRAIN_DEFAULTS["weight_decay"] and s["model"] == cli.DEFAULT_MODEL
    assert seen[-1]["batch_shape"] == (2, 32)
    assert sorted(p.name for p in (tmp / "a").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    # the written file is itself a config: the same run again
    assert cli.main(["train", "--config", str(tmp / "a" / "run.yaml"), "--out", str(tmp / "b"), "--quiet"]) == 0
    assert saved(tmp / "b") == s
    # --epochs on the command line replaces the file's --steps (one of the two)
    assert cli.main(["train", "-c", str(cfg), "--out", str(tmp / "c"), "--epochs", "1", "--quiet"]) == 0
    assert saved(tmp / "c")["steps"] is None and saved(tmp / "c")["epochs"] == 1.0


def test_resume_reads_run_yaml_back(runs):
    tmp, data, seen = runs
    out = tmp / "r"
    args = ["--data", str(data), "--seq-len", "32", "--batch-size", "2", "--lr", "0.05", "--quiet"]
    assert cli.main(["train", "--out", str(out), "--steps", "2", *args]) == 0
    assert cli.main(["train", "--resume", str(out), "--steps", "4", "--quiet"]) == 0
    s = saved(out)
    assert s["lr"] == 0.05 and s["seq_len"] == 32 and s["steps"] == 4 and s["data"] == str(data)
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["run"]["lr"] == 0.05
    (out / "run.yaml").unlink()
    assert cli.main(["train", "--resume", str(out), "--steps", "5", "--quiet"]) == 2


@pytest.mark.parametrize("text,msg", [
    ("lr: 1e-3\nlearning_rate: 2\n", "unknown key 'learning_rate'"),
    ("steps: 2.5\n", "key 'steps': expected int, got float 2.5"),
    ("lr: fast\n", "key 'lr': expected float"),
    ("pack: 1\n", "key 'pack': expected true or false"),
    ("schedule: wavy\n", "key 'schedule': 'wavy' is not one of constant, linear, cosine"),
    ("model: 7\n", "key 'model': expected str"),
    ("- steps\n", "expected a mapping"),
    ("steps: [1\n", "not valid YAML"),
])
def test_bad_config_is_one_line_naming_the_key(runs, capsys, text, msg):
    tmp, data, seen = runs
    cfg = tmp / "bad.yaml"
    cfg.write_text(text)
    assert cli.main(["train", "-c", str(cfg), "--out", str(tmp / "x"), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert msg in err and str(cfg) in err and len(err.strip().splitlines()) == 1
    assert not seen  # nothing loaded


def test_missing_config_file(runs, capsys):
    tmp, _, _ = runs
    assert cli.main(["train", "-c", str(tmp / "none.yaml"), "--out", str(tmp / "x")]) == 2
    assert "none.yaml: config file not found" in capsys.readouterr().err


def test_keys_come_from_the_parser():
    sub = next(a for a in cli.build_parser()._actions if a.choices and "train" in a.choices).choices["train"]
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write("grad-accum: 3\nkeep_last: 0\nquantize: none\n")
    assert read_run_config(f.name, sub) == {"grad_accum": 3, "keep_last": 0, "quantize": "none"}
