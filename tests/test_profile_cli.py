"""`qlora-ext profile` and `train --trace` on a tiny checkpoint (CPU backend)."""
import json

from model_factory import make_tiny_checkpoint

from qlora_ext.cli import main


def test_profile_command_table_and_trace(tmp_path, capsys):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", model_type="llama", seed=1)
    trace = tmp_path / "trace.json"
    rc = main(["profile", "--model", str(ckpt), "--steps", "2", "--seq-len", "16", "--device", "cpu",
               "--trace", str(trace)])
    assert rc == 0
    out = capsys.readouterr().out
    for phase in ("attention", "ffn", "projections", "lm_head"):
        assert phase in out
    assert "overlap (ms/step)" in out and "tokens/s" in out
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e["ph"] == "X" and e["cat"] == "step" for e in events) == 2
    assert any(e["ph"] == "X" and e["name"] == "attention" for e in events)


def test_profile_command_json_and_bad_args(tmp_path, capsys):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", model_type="qwen3", seed=2)
    assert main(["profile", "--model", str(ckpt), "--steps", "1", "--seq-len", "8", "--device", "cpu", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["totals"]["steps"] == 1 and summary["phases"]
    assert main(["profile", "--model", str(ckpt), "--steps", "0", "--device", "cpu"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_train_trace(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", model_type="llama", seed=3)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"record number {i} is fine"}) for i in range(6)) + "\n")
    trace = tmp_path / "t.json"
    rc = main(["train", "--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "2",
               "--seq-len", "16", "--batch-size", "2", "--device", "cpu", "--quiet", "--trace", str(trace)])
    assert rc == 0
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e["ph"] == "X" and e["cat"] == "step" for e in events) == 2


def test_profile_command_gpu_placement_shows_per_kernel_gpu_time(tmp_path, capsys):
    """--placement gpu: the Trainer's step on the GPU (lavapipe in CI), each kernel timed by
    timestamp queries in the phase table."""
    import pytest

    pytest.importorskip("wgpu")
    from qlora_ext.gpu.runtime import shared_context, unavailable_reason

    if unavailable_reason():
        pytest.skip(unavailable_reason())
    if not shared_context().has_timestamps:
        pytest.skip("adapter without timestamp-query")
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", model_type="qwen3", seed=2)
    assert main(["profile", "--model", str(ckpt), "--steps", "1", "--seq-len", "8", "--placement", "gpu",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    phases = {(p["phase"], p["device"]) for p in summary["phases"]}
    for kernel in ("attention_fwd.forward", "attention_bwd.dq", "gemm.main", "adamw.step", "grad_norm.sq_norm"):
        assert (kernel, "gpu") in phases, kernel
    assert summary["meta"]["placement"] == "gpu"
