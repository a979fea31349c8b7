"""Eval while training from the command line: --eval-every (loss, perplexity, exact-match
accuracy in metrics.jsonl), --save-best (DIR/best/), --early-stop (and its counters across
--resume).  A stand-in model, so that the CLI's flow is what is under test."""
import json
import math

import numpy as np
import pytest

from fake_lm import FakeLM

from qlora_ext import cli
from qlora_ext.train.checkpoint import read_safetensors


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda path, **kw: FakeLM())
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"add {i} 1:", "completion": f" {i + 1}"}) + "\n"
                            for i in range(16)))
    ev = tmp_path / "eval.jsonl"
    ev.write_text("".join(json.dumps({"prompt": f"add {i} 2:", "completion": f" {i + 2}"}) + "\n" for i in range(4)))

    def train(out, *extra):
        return cli.main(["train", "--data", str(data), "--eval-data", str(ev), "--out", str(tmp_path / out),
                         "--seq-len", "24", "--batch-size", "2", "--quiet", *map(str, extra)])

    return tmp_path, train


def evals(out):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "eval_loss" in m]


def test_eval_every_writes_loss_perplexity_accuracy(run, capsys):
    tmp, train = run
    assert train("a", "--steps", 6, "--eval-every", 2, "--lr", 0.05) == 0
    ev = evals(tmp / "a")
    assert [m["step"] for m in ev] == [2, 4, 6]
    for m in ev:
        assert math.isclose(m["eval_ppl"], math.exp(m["eval_loss"]), rel_tol=1e-12)
        assert 0.0 <= m["accuracy"] <= 1.0  # greedy generation of the 4 completions
    assert ev[-1]["eval_loss"] < ev[0]["eval_loss"]
    assert ev[-1]["best_eval_loss"] == min(m["eval_loss"] for m in ev)
    out = capsys.readouterr().out
    assert "eval step 2:" in out and "exact-match accuracy" in out


def test_save_best_keeps_the_lowest_eval_loss_adapter(run):
    tmp, train = run
    # a learning rate high enough to overshoot: the last adapter is not always the best
    assert train("b", "--steps", 6, "--eval-every", 1, "--save-best", "--lr", 3.0, "--save-every", 1,
                 "--keep-last", 0) == 0
    ev = evals(tmp / "b")
    best = min(ev, key=lambda m: m["eval_loss"])
    assert ev[-1]["best_step"] == best["step"] != ev[-1]["step"]
    kept = read_safetensors(tmp / "b" / "best" / "adapter_model.safetensors")
    at_step = read_safetensors(tmp / "b" / f"checkpoint-{best['step']}" / "adapter_model.safetensors")
    assert kept.keys() == at_step.keys() and all(np.array_equal(kept[k], at_step[k]) for k in kept)
    final = read_safetensors(tmp / "b" / "adapter_model.safetensors")
    assert not all(np.array_equal(kept[k], final[k]) for k in kept)


def test_early_stop_and_its_counters_survive_resume(run, capsys):
    tmp, train = run
    # lr 0: the loss never drops below the first eval's, so patience 2 stops at the third eval
    assert train("c", "--steps", 20, "--eval-every", 1, "--early-stop", 2, "--lr", 0) == 0
    assert [m["step"] for m in evals(tmp / "c")] == [1, 2, 3]
    assert "early stop at step 3" in capsys.readouterr().out
    assert (tmp / "c" / "adapter_model.safetensors").exists()
    # two evals without improvement, then resumed: one more eval ends it (the count was kept)
    assert train("d", "--steps", 2, "--eval-every", 1, "--early-stop", 3, "--lr", 0) == 0
    assert cli.main(["train", "--resume", str(tmp / "d"), "--steps", "20", "--quiet"]) == 0
    assert [m["step"] for m in evals(tmp / "d")] == [1, 2, 3, 4]


@pytest.mark.parametrize("extra,msg", [
    (["--save-best"], "--save-best needs --eval-every N"),
    (["--early-stop", "2"], "--early-stop needs --eval-every N"),
    (["--eval-every", "-1"], "--eval-every must be >= 0"),
])
def test_bad_eval_flags(run, capsys, extra, msg):
    tmp, train = run
    assert train("e", "--steps", 2, *extra) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


def test_eval_every_needs_eval_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_model", lambda path, **kw: FakeLM())
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": "some text"}) + "\n")
    assert cli.main(["train", "--data", str(data), "--out", str(tmp_path / "o"), "--eval-every", "2"]) == 2
    assert "--eval-every needs eval data" in capsys.readouterr().err
