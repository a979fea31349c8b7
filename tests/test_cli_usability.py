"""What a first run shows: --version, help on every flag, README's command table, progress
lines off a terminal, and the base model named as a user would in adapter_config.json."""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import qlora_ext
from qlora_ext import cli
from qlora_ext.progress import Progress

README = Path(__file__).resolve().parents[1] / "README.md"
SRC = str(Path(qlora_ext.__file__).resolve().parents[1])


def subcommands():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub


def test_version():
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "qlora_ext.cli", "--version"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"qlora-ext {qlora_ext.__version__}"


def test_every_flag_of_every_subcommand_has_help():
    parser, sub = subcommands()
    missing = [f"qlora-ext {a.option_strings}" for a in parser._actions if not a.help]
    helps = {c.dest: c.help for c in sub._choices_actions}
    for name, p in sub.choices.items():
        if not helps.get(name):
            missing.append(f"qlora-ext {name} (the subcommand)")
        missing += [f"qlora-ext {name} {a.option_strings or a.dest}" for a in p._actions
                    if not isinstance(a, argparse._HelpAction) and not (a.help and a.help.strip())]
    assert not missing, f"flags without help text: {missing}"


def test_readme_command_table_names_every_flag():
    table = {}
    for row in README.read_text().splitlines():
        m = re.match(r"\| `qlora-ext ([\w-]+)(.*?)` \|", row)
        if m:
            table[m.group(1)] = m.group(2)
    _, sub = subcommands()
    assert set(sub.choices) <= set(table), f"commands missing from README's table: {set(sub.choices) - set(table)}"
    missing = [f"{name} {a.option_strings[-1]}" for name, p in sub.choices.items() for a in p._actions
               if a.option_strings and not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS
               and not re.search(re.escape(a.option_strings[-1]) + r"(?![\w-])", table[name])]
    assert not missing, f"flags missing from README's command table: {missing}"
    assert "qlora-ext --version" in README.read_text()


def test_progress_off_a_terminal_is_plain_lines(capsys, monkeypatch):
    monkeypatch.setenv("QLORA_EXT_PROGRESS_INTERVAL", "0")
    with Progress(3, "train", unit="step") as p:
        for _ in range(3):
            p.update(1)
            p.set_postfix("loss=1.0000")
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and len(lines) == 4
    assert lines[0].startswith("train: 1/3 steps (33%), ") and "ETA" in lines[0]
    assert re.fullmatch(r"train: 3/3 steps, done in \d+\.\ds, loss=1\.0000", lines[-1])
    monkeypatch.setenv("QLORA_EXT_PROGRESS_INTERVAL", "3600")  # the default spacing: only the closing line
    with Progress(None, "tokenizing d.jsonl", unit="record") as p:
        p.update(5)
    assert re.fullmatch(r"tokenizing d\.jsonl: 5 records, done in \d+\.\ds\n", capsys.readouterr().err)
    with pytest.raises(KeyError):  # a failed phase does not claim to be done
        with Progress(2, "saving", unit="file"):
            raise KeyError("x")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("QLORA_EXT_PROGRESS", "0")
    with Progress(2, "quiet") as p:
        p.update(2)
    assert capsys.readouterr().err == "" and not p.enabled
    monkeypatch.delenv("QLORA_EXT_PROGRESS")
    monkeypatch.setenv("QLORA_EXT_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="QLORA_EXT_PROGRESS_INTERVAL='soon'"):
        Progress(1, "x")


def test_train_log_has_a_line_per_phase(tmp_path, capsys, monkeypatch):
    """A training run logged to a file: loading, tokenizing, eval loss, accuracy, training
    and saving each leave a line."""
    from model_factory import make_tiny_checkpoint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = make_tiny_checkpoint(tmp_path / "m", model_type="llama")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"add {i}:", "completion": f" {i + 1}"}) + "\n" for i in range(8)))
    assert cli.main(["train", "--model", model, "--data", str(data), "--eval-data", str(data), "--eval-accuracy", "2",
                     "--steps", "2", "--seq-len", "32", "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    for phase in ("loading m: 20/20 tensors, done in", "tokenizing d.jsonl: 8 records, done in",
                  "eval loss (before): 2/2 batches, done in", "generating answers (before): 2/2 examples, done in",
                  "train: 2/2 steps, done in", "saving adapter: 1/1 files, done in",
                  "eval loss (after): 2/2 batches, done in", "generating answers (after): 2/2 examples, done in"):
        assert phase in err, (phase, err)


def test_base_model_is_named_as_a_user_would(tmp_path, monkeypatch):
    from model_factory import make_tiny_checkpoint
    from qlora_ext.model.loading import model_name

    assert model_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model_name("SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    snap = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / "abc123"
    assert model_name(snap) == "Qwen/Qwen3-0.6B"
    assert model_name(str(tmp_path / "my-model")) == str(tmp_path / "my-model")
    # through the command line: the path given for a local directory, the hub id of a known name
    model = make_tiny_checkpoint(tmp_path / "m", model_type="llama")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    args = ["train", "--data", str(data), "--steps", "1", "--seq-len", "32", "--device", "cpu", "--quiet"]
    assert cli.main(args + ["--model", model, "--out", str(tmp_path / "r1")]) == 0
    assert json.loads((tmp_path / "r1" / "adapter_config.json").read_text())["base_model_name_or_path"] == model
    try:
        from qlora_ext.model.loading import resolve_model_path

        resolve_model_path("smollm2-135m")
    except OSError as e:
        pytest.skip(str(e))
    assert cli.main(args + ["--out", str(tmp_path / "r2"), "--lora-rank", "2", "--targets", "q"]) == 0
    cfg = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_generating_answers_logs_the_token_being_decoded(capsys, monkeypatch):
    """One batch of prompts is one generate() call: the phase still leaves log lines while it
    decodes, naming the token reached."""
    from fake_lm import FakeLM
    from qlora_ext.train.loop import exact_match

    monkeypatch.setenv("QLORA_EXT_PROGRESS_INTERVAL", "0")
    model = FakeLM()
    pairs = [(model.tokenizer.encode("ab"), "xyz"), (model.tokenizer.encode("c"), "w")]
    with Progress(2, "generating answers", unit="example") as p:
        exact_match(model, pairs, progress=p)
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"generating answers: 0/2 examples \(0%\), \d+\.\ds elapsed, token 1/\d+", lines[0])
    assert lines[-1].startswith("generating answers: 2/2 examples, done in ")
