"""The command line under bad input: every numeric flag range-checked before any work, outputs
checked before the first step, an --out owned by one run, NaN/Inf stopping a run without
saving it, and every error one line with exit status 2.  A stand-in model (fake_lm) keeps
these fast; the tests at the end use a tiny real checkpoint where the model itself checks."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import qlora_ext
from fake_lm import FakeLM
from qlora_ext import cli
from qlora_ext.train.checkpoint import latest_checkpoint

SRC = str(Path(qlora_ext.__file__).resolve().parents[1])


@pytest.fixture
def loads(monkeypatch):
    """Replaces the CLI's model loader with FakeLM; records each call's keyword arguments."""
    calls = []

    def fake_load(path, **kw):
        calls.append(kw)
        return FakeLM()

    monkeypatch.setattr(cli, "load_model", fake_load)
    return calls


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"a{i}:", "completion": f" {i}"}) + "\n" for i in range(12)))
    return p


def train(tmp_path, data, *extra, out="o"):
    args = ["train", "--data", str(data), "--out", str(tmp_path / out), "--quiet", "--batch-size", "2",
            "--seq-len", "16", "--lr", "0.05", *map(str, extra)]
    if "--epochs" not in args and "--steps" not in args:
        args += ["--steps", "3"]
    return cli.main(args)


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qlora-ext: error: "), err
    return err[0]


@pytest.mark.parametrize("args,msg", [
    (["--lr", "inf"], "--lr must be a finite number >= 0, got inf"),
    (["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
    (["--epochs", "inf"], "--epochs must be a finite number > 0"),
    (["--epochs", "1e300"], "--epochs must be a finite number > 0 and <= 1e+06"),
    (["--lora-rank", str(2**40)], "--lora-rank must be >= 1 and <= 65,536"),
    (["--lora-alpha", "nan"], "--lora-alpha must be a finite number > 0"),
    (["--lora-dropout", "1"], "--lora-dropout must be a finite number in [0, 1)"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--grad-clip", "inf"], "--grad-clip must be a finite number >= 0"),
    (["--seq-len", "0"], "--seq-len must be >= 1"),
    (["--batch-size", "100000"], "--batch-size must be >= 1 and <= 65,536"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--eval-accuracy", "-1"], "--eval-accuracy must be >= 0"),
    (["--keep-last", "-1"], "--keep-last must be >= 0"),
    (["--save-every", "-2"], "--save-every must be >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_train_flags_are_range_checked_before_loading(tmp_path, data, loads, capsys, args, msg):
    assert train(tmp_path, data, *args) == 2
    assert msg in one_error(capsys) and not loads and not (tmp_path / "o").exists()


@pytest.mark.parametrize("cmd,args,msg", [
    ("eval", ["--accuracy", "-1"], "--accuracy must be >= 0"),
    ("eval", ["--seq-len", "0"], "--seq-len must be >= 1"),
    ("eval", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("generate", ["--max-new-tokens", str(10**12)], "--max-new-tokens must be >= 0 and <= 1,048,576"),
    ("generate", ["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    ("generate", ["--top-p", "0"], "--top-p must be a finite number in (0, 1]"),
    ("generate", ["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    ("generate", ["--seed", "-5"], "--seed must be >= 0"),
    ("generate", ["--top-k", "-1"], "--top-k must be >= 0"),
    ("generate", ["--threads", "-3"], "--threads must be >= 1"),
])
def test_eval_and_generate_flags_are_range_checked(loads, capsys, cmd, args, msg):
    extra = ["--prompt", "hi"] if cmd == "generate" else []
    assert cli.main([cmd, "--quiet", *extra, *args]) == 2
    assert msg in one_error(capsys) and not loads


def test_huge_thread_count_is_brought_down_with_a_note(tmp_path, data, loads, capsys):
    from qlora_ext.cli_checks import available_cpus

    assert train(tmp_path, data, "--threads", 100000) == 0
    assert loads[0]["threads"] == available_cpus()
    assert f"--threads 100000 is more than the {available_cpus()} CPUs available" in capsys.readouterr().err


def test_outputs_are_checked_before_the_model_loads(tmp_path, data, loads, capsys):
    assert train(tmp_path, data, "--trace", tmp_path / "no-dir" / "t.json") == 2
    assert "--trace" in one_error(capsys) and not loads
    (tmp_path / "file").write_text("")
    assert train(tmp_path, data, out="file/sub") == 2
    assert "--out" in one_error(capsys) and "cannot write there" in capsys.readouterr().err + "cannot write there"
    assert not loads


def test_plot_without_matplotlib_fails_at_once(tmp_path, data, loads, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert train(tmp_path, data, "--plot", tmp_path / "p.png") == 2
    assert "--plot needs matplotlib" in one_error(capsys) and not loads


# -- a run owns its --out -----------------------------------------------------------------------
def _run_id(ckpt):
    return json.loads((ckpt / "trainer_state.json").read_text())["run"]["run_id"]


def test_new_run_into_a_used_out_is_refused_unless_overwrite(tmp_path, data, loads, capsys):
    assert train(tmp_path, data, "--save-every", 1) == 0
    first = _run_id(latest_checkpoint(tmp_path / "o"))
    capsys.readouterr()
    assert train(tmp_path, data, "--steps", 2) == 2
    msg = one_error(capsys)
    assert "holds files of an earlier run (adapter_config.json" in msg and "--resume" in msg and "--overwrite" in msg
    assert latest_checkpoint(tmp_path / "o").name == "checkpoint-3"  # untouched
    assert train(tmp_path, data, "--steps", 2, "--overwrite") == 0
    out = tmp_path / "o"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert _run_id(out / "checkpoint-2") != first
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert cli.main(["train", "--resume", str(out), "--overwrite", "--quiet"]) == 2
    assert "--overwrite would delete the run that --resume continues" in one_error(capsys)


def test_resume_keeps_the_run_id_and_refuses_mixed_runs(tmp_path, data, loads, capsys):
    import shutil

    assert train(tmp_path, data) == 0
    assert train(tmp_path, data, "--steps", 5, out="other") == 0
    out = tmp_path / "o"
    rid = _run_id(out / "checkpoint-3")
    assert cli.main(["train", "--resume", str(out), "--steps", "4", "--quiet"]) == 0
    assert _run_id(out / "checkpoint-4") == rid
    shutil.copytree(tmp_path / "other" / "checkpoint-5", out / "checkpoint-5")
    assert cli.main(["train", "--resume", str(out), "--steps", "6", "--quiet"]) == 2
    assert "holds checkpoints of two runs (checkpoint-5 and checkpoint-3)" in one_error(capsys)


def test_out_locked_by_a_live_run_is_refused(tmp_path, data, loads, capsys):
    from qlora_ext.train.outdir import RunLock

    with RunLock(tmp_path / "o"):
        assert train(tmp_path, data) == 2
        assert f"is in use by another qlora-ext run (pid {os.getpid()})" in one_error(capsys)
    assert train(tmp_path, data) == 0  # released


def test_lock_of_a_killed_process_does_not_block(tmp_path, data, loads, capsys):
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from qlora_ext.train.outdir import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)", str(out)],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=SRC))
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train(tmp_path, data) == 2
        assert f"pid {holder.pid}" in one_error(capsys)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ".lock").read_text().strip() == str(holder.pid)  # stale file, no lock behind it
    assert train(tmp_path, data) == 0


# -- resume: settings and state from the checkpoint are checked like flags ----------------------
def test_resume_with_another_rank_or_targets_is_one_line(tmp_path, data, loads, capsys):
    assert train(tmp_path, data, "--lora-rank", 4) == 0
    out = str(tmp_path / "o")
    assert cli.main(["train", "--resume", out, "--lora-rank", "8", "--steps", "4", "--quiet"]) == 2
    assert "--lora-rank 8 differs from 4 in" in one_error(capsys)
    assert cli.main(["train", "--resume", out, "--targets", "q,v", "--steps", "4", "--quiet"]) == 2
    assert "--targets q,v differs from" in one_error(capsys)
    assert cli.main(["train", "--resume", out, "--lora-rank", "4", "--steps", "4", "--quiet"]) == 0


@pytest.mark.parametrize("edit,msg", [
    (lambda s: s["run"].update(lr="abc"), "trainer_state.json: run.lr must be a finite number >= 0, got 'abc'"),
    (lambda s: s["run"].update(lora_rank=2**40), "trainer_state.json: run.lora_rank must be >= 1"),
    (lambda s: s["run"].update(schedule="zigzag"), "trainer_state.json: run.schedule must be one of constant"),
    (lambda s: s["data"].update(row=-1), "trainer_state.json: data.row must be an int >= 0"),
    (lambda s: s.update(step="3"), "no complete checkpoint"),
])
def test_tampered_trainer_state_is_one_line(tmp_path, data, loads, capsys, edit, msg):
    assert train(tmp_path, data) == 0
    p = tmp_path / "o" / "checkpoint-3" / "trainer_state.json"
    state = json.loads(p.read_text())
    edit(state)
    p.write_text(json.dumps(state))
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(tmp_path / "o"), "--steps", "4", "--quiet"]) == 2
    assert msg in one_error(capsys)


# -- NaN/Inf during a run ------------------------------------------------------------------------
class DivergingLM(FakeLM):
    """Its gradients turn NaN from the `bad_call`-th micro-batch on."""

    bad_call = 3

    def loss_and_grads(self, *a, **kw):
        loss, grads = super().loss_and_grads(*a, **kw)
        if self.calls >= self.bad_call:
            grads["lm.b"][:] = np.nan
        return loss, grads


def test_nan_stops_the_run_names_step_and_tensor_and_saves_nothing_bad(tmp_path, data, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_model", lambda path, **kw: DivergingLM())
    assert train(tmp_path, data, "--steps", 5, "--save-every", 1) == 2
    msg = one_error(capsys)
    out = tmp_path / "o"
    assert "step 3: non-finite value (NaN or Inf) in gradient of lm.b" in msg
    assert f"the newest good checkpoint is {out / 'checkpoint-2'}" in msg
    assert not (out / "adapter_model.safetensors").exists()
    lines = [json.loads(l, parse_constant=pytest.fail) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    m = FakeLM()
    m.load_adapter(latest_checkpoint(out))
    assert np.isfinite(m.params["lm.b"]).all()


def test_metrics_lines_are_valid_json():
    from qlora_ext.train.loop import MetricsLog

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        log = MetricsLog(Path(d) / "m.jsonl")
        log.write({"step": 1, "loss": math.inf, "grad_norm": math.nan, "lr": np.float32(0.5)})
        log.close()
        line = json.loads((Path(d) / "m.jsonl").read_text(), parse_constant=pytest.fail)
    assert line == {"step": 1, "loss": None, "grad_norm": None, "lr": 0.5}


# -- every error class is one line, exit 2; QLORA_EXT_DEBUG=1 shows the traceback ---------------
@pytest.mark.parametrize("exc,msg", [
    (MemoryError("Unable to allocate 64.0 GiB"), "out of memory (Unable to allocate 64.0 GiB)"),
    (RecursionError("maximum recursion depth exceeded"), "input nested too deeply"),
    (RuntimeError("boom"), "RuntimeError: boom (an internal error; QLORA_EXT_DEBUG=1 shows where)"),
    (OverflowError("cannot convert float infinity to integer"), "OverflowError: cannot convert"),
])
def test_every_error_is_one_line(monkeypatch, capsys, exc, msg):
    def broken(path, **kw):
        raise exc

    monkeypatch.setattr(cli, "load_model", broken)
    assert cli.main(["eval", "--quiet"]) == 2
    assert msg in one_error(capsys)
    monkeypatch.setenv("QLORA_EXT_DEBUG", "1")
    with pytest.raises(type(exc)):
        cli.main(["eval", "--quiet"])


def test_gpu_error_is_one_line(monkeypatch, capsys):
    from qlora_ext.gpu.runtime import GpuError

    def broken(path, **kw):
        raise GpuError("device lost")

    monkeypatch.setattr(cli, "load_model", broken)
    assert cli.main(["generate", "--prompt", "x", "--quiet"]) == 2
    assert one_error(capsys) == "qlora-ext: error: GPU: device lost"


# -- the model's own checks, on a tiny real checkpoint ------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("tokenizers")
    from model_factory import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", model_type="llama")


def _with_bad_weight(tiny, tmp_path, name):
    from model_factory import tiny_config, tiny_weights
    from qlora_ext.model.safetensors_io import save_file

    import shutil

    d = tmp_path / "bad-model"
    shutil.copytree(tiny, d)
    w = tiny_weights(tiny_config("llama"))
    w[name].reshape(-1)[5] = np.nan
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("name,shown", [
    ("model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("model.layers.1.post_attention_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"),
    ("model.norm.weight", "model.norm.weight"),
])
def test_nan_base_weight_is_refused_at_load(tiny, tmp_path, capsys, name, shown):
    bad = _with_bad_weight(tiny, tmp_path, name)
    assert cli.main(["eval", "--model", str(bad), "--quiet", "--device", "cpu"]) == 2
    assert f"base weight {shown} holds NaN or Inf values" in one_error(capsys)


def test_nan_adapter_or_alpha_is_refused_by_load_adapter(tiny, tmp_path):
    from qlora_ext.finite import NonFiniteError
    from qlora_ext.api import load_model
    from qlora_ext.model.lora import LoraConfig
    from qlora_ext.model.safetensors_io import save_file

    model = load_model(tiny, lora=LoraConfig(r=2), placement="cpu")
    model.save_adapter(tmp_path / "a")
    params = {k: v.copy() for k, v in model.parameters().items()}
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "lora_alpha": float("nan")}))
    with pytest.raises(ValueError, match="adapter_config.json: NaN is not valid JSON"):   # the strict reader
        model.load_adapter(tmp_path / "a")
    cfg_path.write_text(json.dumps(cfg))
    name = next(iter(params))
    save_file({**params, name: np.full_like(params[name], np.inf)}, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(NonFiniteError, match=f"adapter tensor {name} is NaN or Inf"):
        model.load_adapter(tmp_path / "a")
    assert all(np.array_equal(model.parameters()[k], v) for k, v in params.items())  # unchanged


def test_adapter_files_get_the_same_mode(tiny, tmp_path):
    from qlora_ext.api import load_model

    model = load_model(tiny, placement="cpu")
    model.save_adapter(tmp_path / "a")
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "a").iterdir()}
    assert modes == {"adapter_config.json": 0o666 & ~mask, "adapter_model.safetensors": 0o666 & ~mask}


def test_generate_rejects_float_ids_and_lengths_past_the_context(tiny, capsys):
    from qlora_ext.api import load_model

    model = load_model(tiny, placement="cpu", progress=False)
    with pytest.raises(ValueError, match="integer token ids"):
        model.generate([1.5, 2.0], max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the model's context of 128 positions"):
        model.generate([1, 2], max_new_tokens=127)
    assert cli.main(["generate", "--model", str(tiny), "--prompt", "a", "--max-new-tokens", "500", "--quiet",
                     "--device", "cpu"]) == 2
    assert "context of 128 positions" in one_error(capsys)


def test_resume_with_another_rank_on_a_real_model(tiny, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"word {i} " * 3}) + "\n" for i in range(8)))
    common = ["--quiet", "--device", "cpu", "--threads", "1"]
    assert cli.main(["train", "--model", str(tiny), "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "2",
                     "--lora-rank", "2", "--seq-len", "16", "--batch-size", "2", *common]) == 0
    t0 = time.time()
    assert cli.main(["train", "--resume", str(tmp_path / "o"), "--lora-rank", "8", "--steps", "3", *common]) == 2
    assert "--lora-rank 8 differs from 2" in one_error(capsys) and time.time() - t0 < 5


@pytest.mark.parametrize("args,msg", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--lora-rank", str(2**40)], "--lora-rank must be >= 1 and <= 65,536"),
    (["--seq-len", str(2**40)], "--seq-len must be >= 1 and <= 1,048,576"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--trace", "/nonexistent-dir/t.json"], "--trace /nonexistent-dir/t.json: cannot write there"),
])
def test_profile_flags_and_outputs_fail_before_loading(monkeypatch, capsys, args, msg):
    import qlora_ext as qx

    monkeypatch.setattr(qx, "load_model", lambda *a, **kw: pytest.fail("the model was loaded"))
    assert cli.main(["profile", "--device", "cpu", *args]) == 2
    assert msg in one_error(capsys)


def test_lora_rank_that_does_not_fit_is_refused_before_loading(tiny, tmp_path, data, loads, capsys, monkeypatch):
    from qlora_ext import cli_checks

    # 2 layers, projections summing to 928 rows + columns: 4 float32 copies of r=65536 are 1.8 GiB
    monkeypatch.setattr(cli_checks, "available_memory", lambda: 2**30)
    assert train(tmp_path, data, "--model", tiny, "--lora-rank", 65536) == 2
    assert "--lora-rank 65536: the adapters, their gradients and AdamW moments need 1.8 GiB, more than the 1.0 GiB" \
        in one_error(capsys) and not loads
    assert train(tmp_path, data, "--model", tiny, "--lora-rank", 64) == 0


def test_lora_rank_check_on_the_default_model(tmp_path, data, loads, capsys):
    from qlora_ext.model.loading import resolve_model_path

    try:
        resolve_model_path(cli.DEFAULT_MODEL)
    except OSError as e:
        pytest.skip(str(e))
    from qlora_ext.cli_checks import available_memory

    if (available_memory() or 0) > 300 * 2**30:
        pytest.skip("this machine holds r=65536 on the default model")
    assert train(tmp_path, data, "--lora-rank", 65536) == 2  # ~320 GiB
    assert "--lora-rank 65536: the adapters" in one_error(capsys) and not loads
