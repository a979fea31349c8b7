"""Packed rows (model/packing.py): documents packed into one row attend only within
themselves, restart their positions and do not predict each other, so a packed batch gives
the summed loss, the LoRA gradients and the logits of running each document on its own; in
every placement (split and gpu on lavapipe where no GPU)."""
import numpy as np
import pytest
from model_factory import make_tiny_checkpoint

from hf_reference import randomize_lora

from qlora_ext.api import load_model
from qlora_ext.model.lora import LoraConfig
from qlora_ext.model.loss import IGNORE_INDEX
from qlora_ext.model.packing import check_packing, mask_cross_document_targets, restarted_positions

V = 97


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("pack") / "ckpt", model_type="qwen3", seed=3, vocab_size=V)


def _model(ckpt, placement, **kw):
    lora = LoraConfig(r=4, alpha=8)
    if placement == "cpu":
        model = load_model(ckpt, lora=lora, quantize="nf4", device="cpu", **kw)
    else:
        from qlora_ext.gpu.runtime import GpuError, pick_adapter

        if pick_adapter(allow_software=True) is None:
            pytest.skip("no wgpu adapter (install a Vulkan driver such as Mesa lavapipe)")
        try:
            model = load_model(ckpt, lora=lora, quantize="nf4", device="gpu", placement=placement, **kw)
        except GpuError as e:
            pytest.skip(f"wgpu adapter unusable: {e}")
    randomize_lora(model, seed=1)
    return model


def _documents(seed=0):
    """Two rows of documents of awkward lengths (1, primes, the rest), the second padded."""
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, V, n) for n in (1, 7, 15)],
            [rng.integers(0, V, n) for n in (5, 11, 2)]]


def _packed(rows, T):
    B = len(rows)
    ids = np.zeros((B, T), np.int64)
    seg = np.zeros((B, T), np.int64)
    mask = np.zeros((B, T), np.int64)
    for b, docs in enumerate(rows):
        t = 0
        for i, d in enumerate(docs):
            ids[b, t:t + len(d)] = d
            seg[b, t:t + len(d)] = i
            t += len(d)
        mask[b, :t] = 1
        seg[b, t:] = len(docs)       # the padding: a run of its own
    labels = np.where(mask == 1, ids, IGNORE_INDEX)
    return ids, labels, mask, seg


def _per_document(model, rows):
    """Summed loss and summed gradients of every document run alone."""
    total, grads = 0.0, None
    for docs in rows:
        for d in docs:
            loss, g = model.loss_and_grads(d[None], d[None], reduction="sum")
            total += loss
            grads = g if grads is None else {k: grads[k] + v for k, v in g.items()}
    return total, grads


@pytest.mark.parametrize("placement", ["cpu", "split", "gpu"])
@pytest.mark.parametrize("gc", [False, True])
def test_packed_rows_equal_per_document_runs(ckpt, placement, gc):
    model = _model(ckpt, placement, gradient_checkpointing=gc)
    rows = _documents()
    ids, labels, mask, seg = _packed(rows, T=26)
    want_loss, want = _per_document(model, rows)
    loss, got = model.loss_and_grads(ids, labels, mask, reduction="sum", segment_ids=seg)
    assert loss == pytest.approx(want_loss, rel=2e-5)
    for k in want:
        scale = float(np.abs(want[k]).max()) or 1.0
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=5e-5 * scale, err_msg=k)
    # the mean divides by the targets that stay: no document predicts the next one's first token
    mean, _ = model.loss_and_grads(ids, labels, mask, segment_ids=seg)
    count = sum(len(d) - 1 for docs in rows for d in docs)
    assert model.count_tokens(labels, seg) == count
    assert mean == pytest.approx(want_loss / count, rel=2e-5)
    assert model.loss(ids, labels, mask, reduction="sum", segment_ids=seg) == pytest.approx(want_loss, rel=2e-5)


@pytest.mark.parametrize("placement", ["cpu", "gpu"])
def test_packed_logits_equal_per_document_logits(ckpt, placement):
    model = _model(ckpt, placement)
    rows = _documents(seed=2)
    ids, _, mask, seg = _packed(rows, T=26)
    logits = model.forward(ids, mask, segment_ids=seg)
    for b, docs in enumerate(rows):
        t = 0
        for d in docs:
            alone = model.forward(d[None])[0]
            np.testing.assert_allclose(logits[b, t:t + len(d)], alone, rtol=0, atol=1e-4)
            t += len(d)


def test_without_segments_documents_attend_across(ckpt):
    """The check above can fail: the same packed row without segment ids differs."""
    model = _model(ckpt, "cpu")
    ids, labels, mask, seg = _packed(_documents(), T=26)
    with_seg, _ = model.loss_and_grads(ids, labels, mask, reduction="sum", segment_ids=seg)
    without, _ = model.loss_and_grads(ids, labels, mask, reduction="sum")
    assert abs(with_seg - without) > 1e-3


def test_explicit_position_ids(ckpt):
    """position_ids given with the segments are used as given (here: the restart they imply)."""
    model = _model(ckpt, "cpu")
    ids, labels, mask, seg = _packed(_documents(), T=26)
    a, _ = model.loss_and_grads(ids, labels, mask, reduction="sum", segment_ids=seg)
    b, _ = model.loss_and_grads(ids, labels, mask, reduction="sum", segment_ids=seg,
                                position_ids=restarted_positions(seg.astype(np.int32)))
    assert a == b
    c, _ = model.loss_and_grads(ids, labels, mask, reduction="sum", segment_ids=seg,
                                position_ids=np.broadcast_to(np.arange(26), ids.shape))
    assert c != a


def test_packing_helpers():
    seg = np.array([[0, 0, 1, 1, 1, 0, 2]])
    np.testing.assert_array_equal(restarted_positions(seg), [[0, 1, 0, 1, 2, 0, 0]])
    lab = np.arange(7)[None]
    np.testing.assert_array_equal(mask_cross_document_targets(lab, seg), [[0, 1, -100, 3, 4, -100, -100]])
    assert mask_cross_document_targets(lab, np.zeros_like(seg)) is lab
    pos, segs = check_packing((1, 7), None, seg[0], 100)
    assert segs.dtype == np.int32 and pos.tolist() == restarted_positions(seg).tolist()


@pytest.mark.parametrize("kw, msg", [
    ({"segment_ids": np.zeros((2, 5), np.int64)}, "segment_ids has shape"),
    ({"segment_ids": np.zeros((1, 6), np.float32)}, "segment_ids must be integers"),
    ({"position_ids": -np.ones((1, 6), np.int64)}, "position_ids must be in"),
    ({"position_ids": np.full((1, 6), 10**9)}, "position_ids must be in"),
])
def test_bad_packing_inputs(ckpt, kw, msg):
    model = _model(ckpt, "cpu")
    ids = np.arange(6)[None]
    with pytest.raises(ValueError, match=msg):
        model.loss_and_grads(ids, ids, **kw)
