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
    for kernel in ("attention_fwd.forward", "attention_bwd.dq", "gemm_f32.main", "adamw.step", "grad_norm.sq_norm"):
        assert (kernel, "gpu") in phases, kernel
    assert summary["meta"]["placement"] == "gpu"


def test_profile_command_split_lanes_overlap_cpu_and_transfers(tmp_path, capsys):
    """--placement split (lavapipe in CI): with --lanes 2 (batch 2 by default) one
    lane's transfers and GPU kernels run while the other's attention runs on the CPU, so CPU
    spans overlap transfer and GPU spans in the trace; the default runs one pass, where the CPU
    never works beside a transfer (and the GPU spans, placed from their submits, stay off the
    CPU's)."""
    import pytest

    pytest.importorskip("wgpu")
    from qlora_ext.gpu.runtime import shared_context, unavailable_reason
    from qlora_ext.profile import _intersection_length, _intervals

    if unavailable_reason():
        pytest.skip(unavailable_reason())
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", model_type="qwen3", seed=2)
    overlap = {}
    for lanes in (2, None):
        trace = tmp_path / f"trace{lanes}.json"
        args = ["profile", "--model", str(ckpt), "--steps", "2", "--seq-len", "64", "--placement", "split",
                "--json", "--trace", str(trace)]
        assert main(args + ([] if lanes is None else ["--lanes", str(lanes)])) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["meta"]["lanes"] == (2 if lanes == 2 else 1)   # the default: one pass
        assert summary["meta"]["tokens_per_step"] == 2 * 64
        events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
        spans = lambda cat: _intervals([(e["ts"], e["ts"] + e["dur"]) for e in events if e["cat"] == cat])  # noqa: E731
        overlap[lanes] = [_intersection_length(spans("cpu"), spans(other)) for other in ("transfer", "gpu")]
        assert (summary["totals"]["overlap_ms"] > 0) == (lanes == 2)
    assert overlap[2][0] > 0 and overlap[None][0] == 0
    if shared_context().has_timestamps:
        assert overlap[2][1] > 0 and overlap[None][1] == 0
    assert main(["profile", "--model", str(ckpt), "--placement", "split", "--lanes", "0"]) == 2
    assert "--lanes" in capsys.readouterr().err
