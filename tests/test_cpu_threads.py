"""The CPU device holds numpy's BLAS to one thread while it computes (where the fused NF4
kernel runs), and gives the previous setting back afterwards."""
import numpy as np
import pytest
from model_factory import make_tiny_checkpoint

threadpoolctl = pytest.importorskip("threadpoolctl")

from qlora_ext.api import load_model  # noqa: E402
from qlora_ext.cpu.base_matmul import fused_nf4_available  # noqa: E402
from qlora_ext.engine.cpu_device import CpuDevice  # noqa: E402
from qlora_ext.model.lora import LoraConfig  # noqa: E402


def _blas_threads():
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


@pytest.mark.parametrize("entry", ["forward", "loss_and_grads", "generate"])
def test_blas_single_threaded_inside_the_step_only(tmp_path, monkeypatch, entry):
    if not _blas_threads():
        pytest.skip("threadpoolctl finds no BLAS under numpy")
    model = load_model(make_tiny_checkpoint(tmp_path / "m", seed=1), lora=LoraConfig(r=4, alpha=8),
                       quantize="nf4", device="cpu")
    seen = []
    norm = CpuDevice.rmsnorm_forward

    def spy(self, *args):
        seen.append(_blas_threads())
        return norm(self, *args)

    monkeypatch.setattr(CpuDevice, "rmsnorm_forward", spy)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        ids = np.arange(1, 12).reshape(1, 11)
        if entry == "forward":
            model.forward(ids)
        elif entry == "loss_and_grads":
            model.loss_and_grads(ids, ids)
        else:
            model.generate([1, 2, 3], max_new_tokens=2)
        assert seen
        inside = 1 if fused_nf4_available() else 2
        assert all(t == [inside] * len(t) for t in seen)
        assert all(t == 2 for t in _blas_threads())
