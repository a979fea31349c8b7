"""The qlora-ext command end to end on a tiny random llama checkpoint (subprocesses, so
that SIGKILL and SIGINT hit a real run)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import qlora_ext
from qlora_ext.train.checkpoint import latest_checkpoint, read_safetensors

# where the qlora_ext this test imported lives (site-packages when installed, src/ in a
# development build), so that subprocesses run the same package
SRC = str(Path(qlora_ext.__file__).resolve().parents[1])
TRAIN_ARGS = ["--seq-len", "48", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2", "--lora-rank", "4",
              "--threads", "1", "--seed", "5", "--quiet", "--device", "cpu", "--warmup", "2", "--schedule", "cosine"]


def cli(*args, check=True, **kw):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), QLORA_EXT_PROGRESS="0")
    r = subprocess.run([sys.executable, "-m", "qlora_ext.cli", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=300, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def popen(*args):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), QLORA_EXT_PROGRESS="0")
    return subprocess.Popen([sys.executable, "-m", "qlora_ext.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("tokenizers")
    from model_factory import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("cli")
    model = make_tiny_checkpoint(root / "model", model_type="llama")
    data = root / "train.jsonl"
    with open(data, "w") as f:
        for i in range(30):
            f.write(json.dumps({"prompt": f"add {i} {i % 7}:", "completion": f" {i + i % 7}"}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    ev = root / "eval.jsonl"
    ev.write_text("".join(json.dumps({"prompt": f"add {i} 1:", "completion": f" {i + 1}"}) + "\n" for i in range(5)))
    return {"root": root, "model": model, "data": data, "eval": ev}


def adapter(d):
    return read_safetensors(Path(d) / "adapter_model.safetensors")


def metric_losses(d):
    return [(m["step"], m["loss"], m["lr"], m["tokens"]) for m in map(json.loads, (Path(d) / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def unbroken(tiny):
    out = tiny["root"] / "unbroken"
    r = cli("train", "--model", tiny["model"], "--data", tiny["data"], "--out", out, "--steps", 12,
            "--save-every", 3, "--eval-data", tiny["eval"], "--eval-accuracy", 2, *TRAIN_ARGS)
    return out, r


def test_train_writes_adapter_checkpoints_metrics(tiny, unbroken):
    out, r = unbroken
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    # --save-every 3, and the default --keep-last 3
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6", "checkpoint-9"]
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 13))
    assert set(lines[0]) >= {"step", "loss", "lr", "tokens", "tokens_per_s", "elapsed"}
    assert lines[0]["lr"] == pytest.approx(5e-3) and lines[-1]["loss"] < lines[0]["loss"]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["after"]["eval_loss"] < ev["before"]["eval_loss"] and 0 <= ev["after"]["accuracy"] <= 1
    assert "eval before:" in r.stdout and "eval after:" in r.stdout
    peft_cfg = json.loads((out / "adapter_config.json").read_text())
    assert peft_cfg["r"] == 4 and peft_cfg["peft_type"] == "LORA"
    # the same settings give the same bits
    again = tiny["root"] / "again"
    cli("train", "--model", tiny["model"], "--data", tiny["data"], "--out", again, "--steps", 12, *TRAIN_ARGS)
    a, b = adapter(out), adapter(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_sigkill_then_resume_is_bit_identical(tiny, unbroken):
    out = tiny["root"] / "killed"
    p = popen("train", "--model", tiny["model"], "--data", tiny["data"], "--out", out, "--steps", 12,
              "--save-every", 3, *TRAIN_ARGS)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        ck = latest_checkpoint(out)
        if ck is not None and ck.name != "checkpoint-12":
            break
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    killed_at = latest_checkpoint(out)
    if killed_at is None or (out / "adapter_model.safetensors").exists():
        pytest.skip("the run finished before it could be killed mid-way (machine too fast for the poll)")
    cli("train", "--resume", out, "--threads", 1, "--quiet", "--device", "cpu")
    ref, got = adapter(unbroken[0]), adapter(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k
    assert metric_losses(out) == metric_losses(unbroken[0])


def test_sigint_saves_checkpoint_and_resumes(tiny, unbroken):
    out = tiny["root"] / "interrupted"
    p = popen("train", "--model", tiny["model"], "--data", tiny["data"], "--out", out, "--steps", 12, *TRAIN_ARGS)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the run finished before SIGINT arrived")
    assert p.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    ck = latest_checkpoint(out)
    assert ck is not None and int(ck.name.split("-")[1]) == len(metrics.read_text().splitlines()) < 12
    cli("train", "--resume", out, "--threads", 1, "--quiet", "--device", "cpu")
    ref, got = adapter(unbroken[0]), adapter(out)
    assert all(np.array_equal(ref[k], got[k]) for k in ref)


@pytest.mark.parametrize("content,where", [
    ('{"text": "ok"}\n{"text": "a"\n', "bad.jsonl:2: invalid JSON"),
    ('{"prompt": "x"}\n', 'bad.jsonl:1: field "completion" must be a string'),
    ("", "bad.jsonl:1: no examples"),
])
def test_bad_data_is_one_line_and_nonzero(tiny, content, where):
    bad = tiny["root"] / "bad.jsonl"
    bad.write_text(content)
    r = cli("train", "--model", tiny["model"], "--data", bad, "--out", tiny["root"] / "x", "--quiet", "--device", "cpu",
            check=False)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and where in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,msg", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--targets", "q,zz"], "unknown LoRA target 'zz'"),
    (["--steps", "3", "--epochs", "1"], "not allowed with argument"),
    (["--resume", "/nonexistent/run"], "no complete checkpoint"),
    (["--schedule", "cosine", "--warmup", "5", "--steps", "5"], "must exceed warmup"),
])
def test_bad_args_are_one_line_and_nonzero(tiny, args, msg):
    r = cli("train", "--model", tiny["model"], "--data", tiny["data"], "--out", tiny["root"] / "y", "--quiet",
            "--device", "cpu", *args, check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr, r.stderr


def test_missing_model_is_one_line(tiny):
    r = cli("eval", "--model", tiny["root"] / "no-such-model", "--data", tiny["eval"], "--device", "cpu", check=False)
    assert r.returncode == 2 and "no-such-model" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_eval_and_generate_with_adapter(tiny, unbroken):
    out = unbroken[0]
    base = cli("eval", "--model", tiny["model"], "--data", tiny["eval"], "--quiet", "--device", "cpu").stdout
    tuned = cli("eval", "--model", tiny["model"], "--adapter", out, "--data", tiny["eval"], "--quiet",
                "--accuracy", 3, "--device", "cpu").stdout
    loss = lambda s: float(s.split()[1])  # noqa: E731
    assert "perplexity" in base and loss(tuned) < loss(base) and "exact-match accuracy" in tuned
    ev = json.loads((out / "eval.json").read_text())
    assert loss(tuned) == pytest.approx(ev["after"]["eval_loss"], abs=1e-4)  # printed to 4 decimals
    g1 = cli("generate", "--model", tiny["model"], "--adapter", out, "--prompt", "add 3 1:", "--max-new-tokens", 5,
             "--quiet", "--device", "cpu").stdout
    g2 = cli("generate", "--model", tiny["model"], "--adapter", out, "--prompt", "add 3 1:", "--max-new-tokens", 5,
             "--quiet", "--device", "cpu").stdout
    assert g1 == g2  # greedy is deterministic
    chat = cli("generate", "--model", tiny["model"], "--prompt", "hi", "--chat", "--temperature", "0.8",
               "--seed", 1, "--max-new-tokens", 4, "--quiet", "--device", "cpu")
    assert chat.returncode == 0


def test_info():
    r = cli("info", "--json")
    info = json.loads(r.stdout)
    assert info["version"] and "cpu_features" in info and "gpu_adapter" in info and "gpu_placement" in info
    assert Path(info["dataset"]["train"]).is_file()
    assert "version:" in cli("info").stdout


def test_help_lists_subcommands():
    r = cli("--help")
    for name in ("train", "eval", "generate", "info"):
        assert name in r.stdout


def test_default_dataset_flow_in_process(tmp_path, monkeypatch, capsys):
    """No --data: the shipped records dataset, its eval split, loss and accuracy before and after
    (a stand-in model, so that only the CLI's flow is under test)."""
    from fake_lm import FakeLM

    from qlora_ext import cli

    seen = {}

    def fake_load(path, **kw):
        seen["path"] = path
        return FakeLM()

    monkeypatch.setattr(cli, "load_model", fake_load)
    rc = cli.main(["train", "--out", str(tmp_path / "o"), "--steps", "3", "--eval-accuracy", "2", "--quiet",
                   "--lr", "0.05"])
    out = capsys.readouterr().out
    assert rc == 0 and seen["path"] == cli.DEFAULT_MODEL
    assert "eval before:" in out and "eval after:" in out and "(0/2)" in out
    ev = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert ev["after"]["eval_loss"] < ev["before"]["eval_loss"]
    run = json.loads((tmp_path / "o" / "checkpoint-3" / "trainer_state.json").read_text())["run"]
    assert run["data"].endswith("records_train.jsonl") and run["eval_data"].endswith("records_eval.jsonl")
    # extending the run by --resume keeps the first segment's "before" and its settings
    rc = cli.main(["train", "--resume", str(tmp_path / "o"), "--steps", "5", "--quiet"])
    ev2 = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert rc == 0 and ev2["before"] == ev["before"] and ev2["after"] != ev["after"]
    assert json.loads((tmp_path / "o" / "checkpoint-5" / "trainer_state.json").read_text())["run"]["lr"] == 0.05


def test_two_threads_runs_are_bit_identical(tiny):
    args = [a if a != "1" else "2" for a in TRAIN_ARGS]  # --threads 2
    outs = [tiny["root"] / f"t2_{i}" for i in range(2)]
    for out in outs:
        cli("train", "--model", tiny["model"], "--data", tiny["data"], "--out", out, "--steps", 4, *args)
    a, b = adapter(outs[0]), adapter(outs[1])
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert metric_losses(outs[0]) == metric_losses(outs[1])


def test_placement_and_checkpointing_flags(tiny):
    """--placement and --gradient-checkpointing as a user gives them: said in the output, kept
    in run.yaml and on --resume; --no-gradient-checkpointing; the deprecated --mode still
    works with a line on stderr; a GPU placement with --device cpu is one error line."""
    common = ["--model", tiny["model"], "--data", tiny["data"], "--seq-len", "24", "--batch-size", "2",
              "--lora-rank", "2", "--threads", "1"]
    out = tiny["root"] / "placed"
    r = cli("train", *common, "--out", out, "--steps", 1, "--placement", "cpu", "--gradient-checkpointing")
    import yaml

    saved = yaml.safe_load((out / "run.yaml").read_text())
    assert saved["placement"] == "cpu" and saved["gradient_checkpointing"] is True and "mode" not in saved
    r = cli("train", "--resume", out, "--steps", 2)
    assert "placement: cpu (asked for; activation checkpointing on every layer (asked for))" in r.stdout
    r = cli("train", *common, "--out", tiny["root"] / "placed2", "--steps", 1, "--device", "cpu",
            "--no-gradient-checkpointing", "--mode", "split")
    assert "--mode is deprecated: use --placement cpu" in r.stderr
    assert "placement: cpu (asked for; no activation checkpointing (asked for))" in r.stdout
    r = cli("eval", "--model", tiny["model"], "--data", tiny["eval"], "--placement", "cpu", "--quiet")
    assert "loss" in r.stdout
    r = cli("generate", "--model", tiny["model"], "--prompt", "add 1 2:", "--max-new-tokens", 2,
            "--placement", "gpu", "--device", "cpu", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "placement='gpu' runs on a GPU: it needs device='auto' or 'gpu'" in r.stderr
    r = cli("generate", "--model", tiny["model"], "--prompt", "a", "--placement", "resident", check=False)
    assert r.returncode == 2 and "invalid choice: 'resident'" in r.stderr


def test_train_pack(tiny):
    """`--pack` as a user runs it: whole examples packed into rows that attend only within
    each example; the run trains, with several examples per row where padding has one."""
    runs = {}
    for name, extra in (("packed", ["--pack"]), ("padded", ["--no-group-by-length"])):
        out = tiny["root"] / name
        cli("train", "--model", tiny["model"], "--data", tiny["data"], "--out", out, "--steps", 3, *TRAIN_ARGS, *extra)
        runs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(runs["packed"]) == 3 and all(np.isfinite(m["loss"]) for m in runs["packed"])
    tokens = {k: sum(m["tokens"] for m in v) for k, v in runs.items()}
    assert tokens["packed"] > 2 * tokens["padded"]
