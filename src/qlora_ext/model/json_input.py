"""The one place JSON from user files is parsed (config.json, adapter_config.json, safetensors
headers, shard indexes, ...): every way a file can be bad comes out as ValueError naming it,
and a missing or unreadable file as OSError naming it.

Stricter than json.loads, because each of these silently changes what a file means: a key
that appears twice in one object (json keeps the last), the non-standard constants NaN,
Infinity and -Infinity, and numbers such as 1e400 that overflow to infinity.  Nesting deep enough to exhaust the parser's recursion is refused
rather than raised as RecursionError."""
from __future__ import annotations

import json
import os


def _no_duplicates(source: str):
    def hook(pairs):
        obj = {}
        for k, v in pairs:
            if k in obj:
                raise ValueError(f"{source}: key {k!r} appears twice in one JSON object")
            obj[k] = v
        return obj
    return hook


def _no_constant(source: str):
    def hook(name):
        raise ValueError(f"{source}: {name} is not valid JSON (non-finite numbers are not allowed)")
    return hook


def _finite_float(source: str):
    def hook(text):
        v = float(text)
        if v in (float("inf"), float("-inf")):
            raise ValueError(f"{source}: number {text} is out of range (overflows to infinity)")
        return v
    return hook


def parse_json(data, source: str):
    """Parse JSON text (str, or UTF-8 bytes); ValueError naming `source` for anything that is
    not strict JSON."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{source}: not valid UTF-8 ({e})") from None
    try:
        return json.loads(data, object_pairs_hook=_no_duplicates(source),
                          parse_constant=_no_constant(source), parse_float=_finite_float(source))
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{source}: JSON nested too deeply") from None
    except ValueError as e:  # from the hooks, or an integer too long to convert
        msg = str(e)
        raise ValueError(msg if msg.startswith(source) else f"{source}: {msg}") from None


def read_json(path, what: str = "JSON file"):
    """Read and parse a JSON file.  OSError naming the path (and `what` it should be) when it
    cannot be read; ValueError naming it when its content is not strict JSON."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise OSError(f"{p}: {what} not found") from None
    except IsADirectoryError:
        raise OSError(f"{p}: is a directory, expected a {what}") from None
    except OSError as e:
        raise OSError(f"{p}: cannot read the {what} ({e.strerror or e})") from None
    return parse_json(data, p)
