"""wgpu FFN backend with weights larger than the storage binding limit: a small max_binding
forces gate|up and down to split by output rows (NF4 pieces on block boundaries, one piece
holding the end of gate and the start of up); forward and backward against the float64
reference and against the unsplit run, streaming and resident."""
from __future__ import annotations

import pytest

from test_ffn_cpu import check_backend, fake_state, make_lora, rel_err

pytestmark = pytest.mark.gpu


# (nf4, H, I, max_binding, pieces of gate|up, pieces of down)
CASES = [
    # NF4 blocks of 64 over rows of 40: 8-row steps; gate|up 0:56 | 56:72+0:40 | 40:72, down 0:32 | 32:40
    (True, 40, 72, 1280, 3, 2),
    # fp32, rows of 40 floats: 25 rows a piece, gate's last piece joined by up's first rows
    (False, 40, 72, 4096, 6, 3),
    # fp32 with odd rows·cols: gate and up never share a piece (their bytes would need padding)
    (False, 41, 73, 2048, 14, 7),
]


@pytest.mark.parametrize("nf4,H,I,max_binding,n_gu,n_d", CASES)
@pytest.mark.parametrize("resident", [False, True])
def test_gpu_ffn_split_weights_match_float64_and_unsplit(gpu_ctx, nf4, H, I, max_binding, n_gu, n_d, resident):
    from qlora_ext.gpu.ffn import WgpuFfnBackend

    state = fake_state(H, I, n_layers=2, nf4=nf4)
    be = WgpuFfnBackend(gpu_ctx, resident=resident, max_binding=max_binding)
    be.prepare(state)
    plan = be.plans[0]
    assert (len(plan.gu), len(plan.d)) == (n_gu, n_d)
    assert max(plan.sizes.values()) <= max_binding
    # the pieces tile the output rows exactly
    assert [s for p in plan.gu for s in p[:2]][0] == 0 and plan.gu[-1][1] == 2 * I
    assert all(a[1] == b[0] for a, b in zip(plan.gu, plan.gu[1:])) and plan.d[-1][1] == H
    whole = WgpuFfnBackend(gpu_ctx, resident=resident)
    whole.prepare(state)
    # unsplit: one piece each, except fp32 gate and up whose odd byte counts cannot sit back to back
    assert (len(whole.plans[0].gu), len(whole.plans[0].d)) == (1 if nf4 or H * I % 2 == 0 else 2, 1)
    lora = make_lora(H, I, 3)  # LoRA on gate, up and down
    for layer, lo in ((0, lora), (1, None), (1, lora), (0, lora)):
        y, g = check_backend(be, state, layer, 13, lo, tol=1e-5)
        y1, g1 = check_backend(whole, state, layer, 13, lo, tol=1e-5)
        assert rel_err(y, y1) <= 1e-5 and rel_err(g.dx, g1.dx) <= 1e-5
        for p in (lo.pairs if lo is not None else {}):
            assert rel_err(g.lora[p][0], g1.lora[p][0]) <= 1e-5 and rel_err(g.lora[p][1], g1.lora[p][1]) <= 1e-5


def test_gpu_ffn_split_dropout(gpu_ctx):
    """Dropout masks follow global rows, unchanged by weight pieces and row chunks."""
    from qlora_ext.gpu.ffn import WgpuFfnBackend

    state = fake_state(40, 72, n_layers=1)
    lora = make_lora(40, 72, 4, dropout=0.25, seed=7)
    be = WgpuFfnBackend(gpu_ctx, max_binding=1280)
    be.prepare(state)
    check_backend(be, state, 0, 11, lora, tol=1e-5)


def test_gpu_ffn_binding_limit_too_small(gpu_ctx):
    from qlora_ext.gpu.ffn import WgpuFfnBackend

    be = WgpuFfnBackend(gpu_ctx, max_binding=64)
    with pytest.raises(ValueError, match="binding limit"):
        be.prepare(fake_state(40, 72, n_layers=1))
