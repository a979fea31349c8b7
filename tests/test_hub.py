"""Models by Hugging Face hub id, from a cache built in a temp dir (the documented layout:
models--{owner}--{name}/refs/{branch or tag} holding a commit hash, snapshots/{commit}/ the
files), with downloading off (HF_HUB_OFFLINE)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("huggingface_hub")

from model_factory import make_tiny_checkpoint  # noqa: E402

import qlora_ext as qx  # noqa: E402
from qlora_ext.model.loading import resolve_model_path  # noqa: E402

COMMIT_MAIN, COMMIT_V1 = "a" * 40, "b" * 40
SRC = os.path.dirname(os.path.dirname(os.path.abspath(qx.__file__)))


def add_snapshot(cache, repo_id, commit, refs=("main",), **kw):
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = make_tiny_checkpoint(repo / "snapshots" / commit, **kw)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    c = tmp_path / "hub"
    add_snapshot(c, "acme/tiny", COMMIT_MAIN, model_type="qwen3", seed=1)
    add_snapshot(c, "acme/tiny", COMMIT_V1, refs=("v1",), model_type="qwen3", seed=2)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(c))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return c


def test_hub_id_and_revisions_resolve_from_the_cache(cache):
    main = str(cache / "models--acme--tiny" / "snapshots" / COMMIT_MAIN)
    v1 = str(cache / "models--acme--tiny" / "snapshots" / COMMIT_V1)
    assert resolve_model_path("acme/tiny") == main
    assert resolve_model_path("acme/tiny@main") == main
    assert resolve_model_path("acme/tiny@v1") == v1 == resolve_model_path("acme/tiny", revision="v1")
    assert resolve_model_path(f"acme/tiny@{COMMIT_V1}") == v1
    a = qx.load_model("acme/tiny", quantize=None, device="cpu")
    b = qx.load_model("acme/tiny", revision="v1", quantize=None, device="cpu")
    ids = np.array([[1, 2, 3, 4]])
    assert a.state.source == main and not np.allclose(a.forward(ids), b.forward(ids))
    with pytest.raises(ValueError, match="two revisions"):
        resolve_model_path("acme/tiny@main", revision="v1")


def test_missing_repo_or_revision_names_repo_and_cache(cache):
    with pytest.raises(OSError) as e:
        resolve_model_path("acme/absent")
    msg = str(e.value)
    assert "acme/absent" in msg and str(cache) in msg and "HF_HUB_OFFLINE" in msg and "hf download acme/absent" in msg
    with pytest.raises(OSError, match="acme/tiny@v9.*not in the Hugging Face cache"):
        resolve_model_path("acme/tiny@v9")
    with pytest.raises(OSError, match="not a known model name.*repo id"):
        resolve_model_path("no-such-model")


def test_incomplete_snapshot_says_which_files_are_missing(cache):
    snap = add_snapshot(cache, "acme/sharded", COMMIT_MAIN, model_type="llama", sharded=True)
    os.unlink(os.path.join(snap, "model-00002-of-00003.safetensors"))
    with pytest.raises(OSError, match="lacks model-00002-of-00003.safetensors"):
        resolve_model_path("acme/sharded")
    snap = add_snapshot(cache, "acme/noconfig", COMMIT_MAIN, model_type="llama")
    os.unlink(os.path.join(snap, "config.json"))
    with pytest.raises(OSError, match="lacks config.json"):
        qx.load_model("acme/noconfig", device="cpu")


def test_local_paths_win_and_take_no_revision(cache, tmp_path, monkeypatch):
    d = make_tiny_checkpoint(tmp_path / "acme" / "tiny", model_type="llama")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("acme/tiny") == "acme/tiny"  # an existing directory is a path
    with pytest.raises(ValueError, match="applies to hub ids"):
        resolve_model_path(d, revision="main")


def _cli(args, cache):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_CACHE=str(cache),
               HF_HUB_OFFLINE="1", QLORA_EXT_PROGRESS="0")
    return subprocess.run([sys.executable, "-m", "qlora_ext.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_with_hub_id_offline(cache, tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": f"the {i} then"}) + "\n" for i in range(4)))
    r = _cli(["eval", "--model", "acme/tiny", "--revision", "v1", "--data", str(data), "--device", "cpu",
              "--seq-len", "16", "--quiet"], cache)
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout
    r = _cli(["eval", "--model", "acme/absent", "--data", str(data), "--device", "cpu"], cache)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "acme/absent" in r.stderr and str(cache) in r.stderr and "Traceback" not in r.stderr
