"""Tokenizer faults a user meets from the command line: one line naming the file or key,
exit code 2 (ValueError/OSError from the API), never a traceback."""
import json
import os

import pytest

from model_factory import gguf_from_hf, make_tiny_checkpoint
from qlora_ext import cli
from qlora_ext.model.tokenizer import Tokenizer

BPE_MD = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab", "<|end|>"],
          "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [1, 1, 1, 3],
          "tokenizer.ggml.eos_token_id": 3}


def run_cli(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip()


@pytest.mark.parametrize("pre", ["default", "gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_known_gguf_pre_tokenizers_build(pre):
    tok = Tokenizer.from_gguf_metadata({**BPE_MD, "tokenizer.ggml.pre": pre}, source="m.gguf")
    assert tok.encode("ab") == [2]


def test_missing_gguf_pre_is_gpt2():
    assert Tokenizer.from_gguf_metadata(dict(BPE_MD), source="m.gguf").encode("ab") == [2]


def test_unknown_gguf_pre_tokenizer_is_an_error_naming_it(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"m.gguf: tokenizer.ggml.pre 'falcon3' is not supported.*supported: "):
        Tokenizer.from_gguf_metadata({**BPE_MD, "tokenizer.ggml.pre": "falcon3"}, source="m.gguf")
    # from the command line, through a whole GGUF file
    d = make_tiny_checkpoint(tmp_path / "hf", model_type="llama")
    path = gguf_from_hf(d, tmp_path / "m.gguf", extra_metadata={**BPE_MD, "tokenizer.ggml.pre": "falcon3"})
    code, err = run_cli(["generate", "--model", path, "--prompt", "ab", "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and "tokenizer.ggml.pre 'falcon3' is not supported" in err and path in err


def test_model_without_tokenizer_trained_on_text(tmp_path, capsys):
    d = make_tiny_checkpoint(tmp_path / "m", model_type="qwen3")
    os.remove(os.path.join(d, "tokenizer.json"))
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    code, err = run_cli(["train", "--model", d, "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "1",
                         "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 0 and f"{d}: the model has no tokenizer" in err


def test_gguf_without_tokenizer_metadata(tmp_path, capsys):
    d = make_tiny_checkpoint(tmp_path / "hf", model_type="llama")
    path = gguf_from_hf(d, tmp_path / "m.gguf")  # no tokenizer.ggml.* keys
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    code, err = run_cli(["train", "--model", path, "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "1",
                         "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and f"{path}: the model has no tokenizer" in err
    code, err = run_cli(["eval", "--model", path, "--data", str(data), "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and f"{path}: the model has no tokenizer" in err


def test_tokenizer_without_eos(tmp_path, capsys):
    d = make_tiny_checkpoint(tmp_path / "m", model_type="qwen3")
    for name, key in (("tokenizer_config.json", "eos_token"), ("config.json", "eos_token_id")):
        cfg = json.loads(open(os.path.join(d, name)).read())
        del cfg[key]
        open(os.path.join(d, name), "w").write(json.dumps(cfg))
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    code, err = run_cli(["train", "--model", d, "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "1",
                         "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and "tokenizer.json: the tokenizer has no EOS token" in err
    # generation needs no EOS: it stops at --max-new-tokens
    code, _ = run_cli(["generate", "--model", d, "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu",
                       "--quiet"], capsys)
    assert code == 0


def test_lone_surrogate_in_the_data(tmp_path, capsys):
    d = make_tiny_checkpoint(tmp_path / "m", model_type="qwen3")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "ok"}\n{"messages": [{"role": "user", "content": "a"}, '
                    '{"role": "assistant", "content": "x\\udc80y"}]}\n')
    code, err = run_cli(["train", "--model", d, "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "1",
                         "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and f"{data}:2: messages[1] content holds a lone surrogate" in err


def test_chat_template_with_include_from_the_command_line(tmp_path, capsys):
    d = make_tiny_checkpoint(tmp_path / "m", model_type="qwen3")
    cfg = json.loads(open(os.path.join(d, "tokenizer_config.json")).read())
    cfg["chat_template"] = "{% include 'other.jinja' %}"
    open(os.path.join(d, "tokenizer_config.json"), "w").write(json.dumps(cfg))
    code, err = run_cli(["generate", "--model", d, "--prompt", "hi", "--chat", "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and "tokenizer_config.json 'chat_template': chat template does not compile ('include' is not " \
                         "allowed" in err


@pytest.mark.parametrize("key,value,msg", [
    ("tokenizer.ggml.bos_token_id", 99, r"tokenizer.ggml.bos_token_id must be a token id in \[0, 4\), got 99"),
    ("tokenizer.ggml.eos_token_id", -1, r"tokenizer.ggml.eos_token_id must be a token id"),
    ("tokenizer.ggml.padding_token_id", "2", r"tokenizer.ggml.padding_token_id must be a token id"),
    ("tokenizer.ggml.tokens", ["a", 3], r"tokenizer.ggml.tokens must be a non-empty array of strings"),
    ("tokenizer.chat_template", 7, r"tokenizer.chat_template must be a string"),
])
def test_bad_gguf_tokenizer_fields(key, value, msg):
    with pytest.raises(ValueError, match=f"m.gguf: {msg}"):
        Tokenizer.from_gguf_metadata({**BPE_MD, "tokenizer.ggml.add_bos_token": True, key: value}, source="m.gguf")


@pytest.mark.parametrize("name,edit,msg", [
    ("config.json", lambda c: c.update(eos_token_id="2"), r"config.json: 'eos_token_id' must be a token id"),
    ("config.json", lambda c: c.update(eos_token_id=[1, True]), r"config.json: 'eos_token_id' must be a token id"),
    ("config.json", lambda c: c.update(bos_token_id=10**6), r"config.json: 'bos_token_id' must be a token id"),
    ("tokenizer_config.json", lambda c: c.update(chat_template=["x"]), r"'chat_template' as a list must hold"),
    ("tokenizer_config.json", lambda c: c.update(chat_template={"a": 1}), r"'chat_template' must be a string"),
])
def test_bad_hf_tokenizer_fields(tmp_path, name, edit, msg):
    d = make_tiny_checkpoint(tmp_path / "m", model_type="qwen3")
    cfg = json.loads(open(os.path.join(d, "tokenizer_config.json")).read())
    for k in ("bos_token", "eos_token"):  # so that the ids come from config.json
        cfg.pop(k)
    open(os.path.join(d, "tokenizer_config.json"), "w").write(json.dumps(cfg))
    cfg = json.loads(open(os.path.join(d, name)).read())
    edit(cfg)
    open(os.path.join(d, name), "w").write(json.dumps(cfg))
    with pytest.raises(ValueError, match=msg):
        Tokenizer.from_dir(d)


def test_deeply_nested_tokenizer_config(tmp_path):
    d = make_tiny_checkpoint(tmp_path / "m", model_type="qwen3")
    open(os.path.join(d, "tokenizer_config.json"), "w").write('{"a": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ValueError, match=r"tokenizer_config.json: not valid JSON \(nested too deeply\)"):
        Tokenizer.from_dir(d)


def test_undecodable_prompt_bytes_on_the_command_line(tmp_path):
    """An undecodable byte in argv reaches Python as a lone surrogate: one clean line."""
    import subprocess
    import sys
    from pathlib import Path

    import qlora_ext

    d = make_tiny_checkpoint(tmp_path / "m", model_type="llama")
    src = str(Path(qlora_ext.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""), QLORA_EXT_PROGRESS="0")
    for extra in ([], ["--chat"]):
        r = subprocess.run([sys.executable, "-m", "qlora_ext.cli", "generate", "--model", d, "--prompt", b"a\xffb",
                            "--device", "cpu", *extra], capture_output=True, env=env, timeout=300)
        err = r.stderr.decode(errors="replace")
        assert r.returncode == 2 and "Traceback" not in err and "lone surrogate" in err, err


@pytest.mark.parametrize("template,msg", [
    ("{{ 'x' * 100000000 }}", "chat template stopped: '*' would build 100,000,000 items"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "chat template stopped: rendering took longer than 5 s"),
])
def test_runaway_chat_template_from_the_command_line(tmp_path, capsys, template, msg):
    import time

    d = make_tiny_checkpoint(tmp_path / "m", model_type="qwen3")
    cfg = json.loads(open(os.path.join(d, "tokenizer_config.json")).read())
    cfg["chat_template"] = template
    open(os.path.join(d, "tokenizer_config.json"), "w").write(json.dumps(cfg))
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    t0 = time.perf_counter()
    code, err = run_cli(["train", "--model", d, "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "1",
                         "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and f"tokenizer_config.json 'chat_template': {msg}" in err and time.perf_counter() - t0 < 60
