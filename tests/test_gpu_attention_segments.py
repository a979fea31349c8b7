"""GPU causal GQA attention over packed rows (segment ids: documents as runs of equal ids),
forward and backward, against the float64 reference run on each document alone (nothing may
cross a boundary) and against the CPU kernel given the same segments.  Awkward sizes: T = 1,
primes, documents of length 1, boundaries on and off the tiles, documents spanning tile edges,
GQA, padding together with segments, small and uneven tilings, both GQA dk/dv modes; the
host's run starts; the GPU device's per-step upload."""
import dataclasses

import numpy as np
import pytest

from gpu_support import attention_ds_mode, attention_inputs, poison_scratch, rel_err  # noqa: F401
from test_attention_segments import ref_packed, segments_of

pytestmark = pytest.mark.gpu

TOL = 1e-5


def _grad_errs(got, want, q, k, v, do):
    """Errors of (dq, dk, dv) relative to their largest value, with the floor of
    test_attention_segments: a document of one token has dq = dk = 0 exactly (one key, pure
    cancellation), so there the scale is 1% of one term's size."""
    D = q.shape[3]
    errs = []
    for g, w, other in zip(got, want, (k, q, None)):
        floor = 0.0 if other is None else (1e-2 * np.abs(do).max() * np.abs(v).max()
                                           * np.abs(other).max() * np.sqrt(D))
        errs.append(rel_err(g, w, max(np.abs(w).max(), floor)))
    return errs


def check_packed(ctx, rows, Hq, Hkv, D, mask=None, seed=0):
    """GPU forward/backward of the packed rows (document lengths per row) against the
    per-document float64 reference and the CPU kernel; returns the GPU's results."""
    from gpu_numpy_forms import attention_backward, attention_forward
    from qlora_ext.cpu import kernels as K

    T = sum(rows[0])
    seg = np.stack([segments_of(ls) for ls in rows])
    q, k, v, do = attention_inputs(seed, len(rows), T, Hq, Hkv, D)
    o, lse = attention_forward(q, k, v, mask=mask, ctx=ctx, segments=seg)
    dq, dk, dv = attention_backward(q, k, v, o, lse, do, mask=mask, ctx=ctx, segments=seg)
    r_o, r_lse, r_dq, r_dk, r_dv = ref_packed(q, k, v, do, seg, mask)
    assert rel_err(o, r_o) <= TOL
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(r_lse))
    fin = np.isfinite(r_lse)
    assert rel_err(lse[fin], r_lse[fin]) <= TOL
    assert max(_grad_errs((dq, dk, dv), (r_dq, r_dk, r_dv), q, k, v, do)) <= TOL
    # the CPU kernel with the same segments: both within float32 rounding of each other
    cmask = None if mask is None else (mask != 0).astype(np.uint8)
    c_o, c_lse = K.attention_forward(q, k, v, mask=cmask, segments=seg)
    c_grads = K.attention_backward(q, k, v, c_o, c_lse, do, mask=cmask, segments=seg)
    assert rel_err(o, c_o) <= 2 * TOL
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(c_lse))
    assert rel_err(lse[fin], c_lse[fin]) <= 2 * TOL
    assert max(_grad_errs((dq, dk, dv), c_grads, q, k, v, do)) <= 2 * TOL
    return o, lse, dq, dk, dv


LAYOUTS = [  # per row, the document lengths; Hq, Hkv, D
    ([[1]], 1, 1, 2),                                # T = 1
    ([[1, 1, 1, 1, 1, 1, 1]], 4, 2, 8),              # only one-token documents
    ([[3, 1, 7, 2], [13]], 4, 2, 10),                # rows packed differently; D not a multiple of 4
    ([[64, 64, 3], [1, 63, 65, 2]], 2, 1, 16),       # boundaries on and one off the 64-row tiles
    ([[61, 1, 67, 2, 41], [172]], 6, 2, 12),         # documents spanning tile edges; G = 3
    ([[5, 97, 31, 2, 1, 127], [263]], 2, 2, 8),      # prime T, a document over three tiles
    ([[1] * 70 + [59]], 3, 3, 6),                    # a tile of only one-token documents
]


@pytest.mark.parametrize("rows,Hq,Hkv,D", LAYOUTS)
def test_packed_rows_match_per_document_reference(ctx, attention_ds_mode, rows, Hq, Hkv, D):
    if attention_ds_mode:   # tiles across documents are skipped: never written, never read
        T = sum(rows[0])
        poison_scratch(ctx, len(rows) * Hq * T * T)
    check_packed(ctx, rows, Hq, Hkv, D)


def test_packed_rows_with_padding(ctx, attention_ds_mode):
    """Padding keys inside a document, left padding before the first document (its queries
    see no key: o = 0, lse = -inf, zero gradients), and trailing padding as its own run."""
    rows = [[4, 9, 70, 6], [11, 72, 6]]
    mask = np.ones((2, 89), np.int64)
    mask[0, 4:6] = 0
    mask[0, 83:] = 0
    mask[1, :11] = 0
    mask[1, 83:] = 0
    o, lse, dq, dk, dv = check_packed(ctx, rows, 4, 2, 16, mask=mask)
    assert np.all(lse[1, :, :11] == -np.inf) and np.all(o[1, :11] == 0)
    assert np.all(dq[1, :11] == 0) and np.all(dk[1, :11] == 0) and np.all(dv[1, :11] == 0)


# br,bc,tm,tn[,dk4]: tiles much smaller than the documents (many skipped key blocks and query
# blocks past a key block's documents), uneven blocks and thread tiles.
@pytest.mark.parametrize("tiles", ["16,16,2,2", "8,12,2,3", "32,8,8,1", "16,32,4,2,1"])
def test_packed_rows_tile_override(ctx, attention_ds_mode, monkeypatch, tiles):
    from qlora_ext.gpu.runtime import Tuning

    monkeypatch.setattr(ctx, "tuning", dataclasses.replace(
        ctx.tuning, attn_tiles=Tuning.from_env({"QLORA_EXT_ATTN_TILES": tiles}).attn_tiles))
    mask = np.ones((2, 71), np.int64)
    mask[0, [0, 17, 40]] = 0
    check_packed(ctx, [[9, 1, 23, 2, 36], [40, 31]], 4, 2, 20, mask=mask)


@pytest.mark.parametrize("split", [False, True])
def test_packed_rows_gqa_dkdv_modes(ctx, attention_ds_mode, monkeypatch, split):
    """GQA dk/dv per kv head over its group, and per query head with partials summed."""
    monkeypatch.setattr(ctx, "tuning", dataclasses.replace(ctx.tuning, attn_head_split=split))
    check_packed(ctx, [[13, 1, 50, 3], [2, 65]], 8, 2, 12)


def test_one_document_is_plain_causal(ctx):
    """One run per row: bit-identical to the unpacked kernels (the same arithmetic in the
    same order; only which pipeline variant runs differs)."""
    from gpu_numpy_forms import attention_backward, attention_forward

    q, k, v, do = attention_inputs(3, 2, 139, 4, 2, 16)
    seg = np.full((2, 139), 7, np.int32)
    plain = attention_forward(q, k, v, ctx=ctx)
    packed = attention_forward(q, k, v, ctx=ctx, segments=seg)
    for a, b in zip(plain, packed):
        np.testing.assert_array_equal(a, b)
    g_plain = attention_backward(q, k, v, *plain, do, ctx=ctx)
    g_packed = attention_backward(q, k, v, *packed, do, ctx=ctx, segments=seg)
    for a, b in zip(g_plain, g_packed):
        np.testing.assert_array_equal(a, b)


def test_document_starts():
    """Runs of equal ids, as the CPU kernels read them: an id that comes back later starts a
    new document."""
    from qlora_ext.model.packing import document_starts

    seg = np.array([[0, 0, 1, 1, 1, 0, 2], [5, 5, 5, 5, 5, 5, 5], [0, 1, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(document_starts(seg), [[0, 0, 2, 2, 2, 5, 6], [0] * 7, list(range(7))])
    assert document_starts(np.zeros((3, 0), np.int64)).shape == (3, 0)
    with pytest.raises(ValueError, match="segments"):
        document_starts(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="segments"):
        document_starts(np.zeros(3, np.int32))


def test_gpu_device_uploads_segments(ctx, tmp_path):
    """GpuDevice.begin(..., segments=) sends the step's document starts to the device's
    attention, forward and backward; the next step without segments attends across the row."""
    from model_factory import make_tiny_checkpoint
    from qlora_ext.api import load_model
    from qlora_ext.cpu import kernels as K
    from qlora_ext.engine.gpu_model import GpuModel
    from qlora_ext.engine.model import Model
    from qlora_ext.model.lora import LoraConfig

    model = load_model(make_tiny_checkpoint(tmp_path / "qwen3", model_type="qwen3", seed=3),
                       lora=LoraConfig(r=4, alpha=8), quantize="nf4", device="cpu")
    dev = GpuModel(model.state, model.lora_config, ctx=ctx).device
    B, T = 2, 45
    d = Model.dims_of(model.state, B, T)
    seg = np.stack([segments_of([20, 1, 24]), segments_of([3, 42])])
    q, k, v, do = attention_inputs(9, B, T, d.Hq, d.Hkv, d.D)
    up = ctx.upload
    gq, gk, gv, gdo = up(q), up(k), up(v), up(do)
    ids = np.zeros((B, T), np.int64)
    for segments in (seg, None):
        dev.begin(d, np.arange(T), None, ids, segments=segments)
        o, lse = ctx.empty(q.shape), ctx.empty((B, d.Hq, T))
        dev.attention_forward(gq, gk, gv, o, lse)
        grads = [ctx.empty(q.shape), ctx.empty(k.shape), ctx.empty(k.shape)]
        dev.attention_backward(gq, gk, gv, o, lse, gdo, *grads)
        c_o, c_lse = K.attention_forward(q, k, v, segments=segments)
        c_grads = K.attention_backward(q, k, v, c_o, c_lse, do, segments=segments)
        assert rel_err(ctx.to_numpy(o), c_o) <= 2 * TOL
        assert max(_grad_errs([ctx.to_numpy(g) for g in grads], c_grads, q, k, v, do)) <= 2 * TOL
    with pytest.raises(ValueError, match="segments"):
        dev.begin(d, np.arange(T), None, ids, segments=seg[:, :-1])
