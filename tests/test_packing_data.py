"""Packed batches reach the model: `qlora-ext train --pack`'s micro-batches carry segment ids
(several documents in a row, each restarting its positions), and evaluate_loss scores packed
tuples (Batch.as_tuple) without letting documents see each other."""
import numpy as np

from hf_reference import randomize_lora
from model_factory import make_tiny_checkpoint
from test_cli import TRAIN_ARGS, tiny  # noqa: F401 (tiny: the fixture)

from qlora_ext.api import load_model
from qlora_ext.model.lora import LoraConfig
from qlora_ext.train.data import IGNORE, DataLoader, Example
from qlora_ext.train.trainer import evaluate_loss


def test_train_pack_gives_the_model_segment_ids(tiny, tmp_path, monkeypatch):  # noqa: F811
    from qlora_ext import cli
    from qlora_ext.engine.model import Model

    seen = []
    real = Model.loss_and_grads

    def spy(self, *args, **kw):
        seen.append(kw.get("segment_ids"))
        return real(self, *args, **kw)

    monkeypatch.setattr(Model, "loss_and_grads", spy)
    monkeypatch.setenv("QLORA_EXT_PROGRESS", "0")
    rc = cli.main(["train", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--out",
                   str(tmp_path / "packed"), "--steps", "3", "--pack", *TRAIN_ARGS])
    assert rc == 0 and seen and all(s is not None for s in seen)
    segs = np.asarray(seen[0])
    assert segs.ndim == 2 and segs.shape[1] <= 48 and (segs.max(axis=1) >= 2).all()   # several documents a row


def test_evaluate_loss_of_packed_batches(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "ckpt", model_type="llama", seed=2, vocab_size=97)
    model = load_model(path, lora=LoraConfig(r=2, alpha=4), device="cpu")
    randomize_lora(model, seed=3)
    rng = np.random.default_rng(0)
    examples = []
    for n in (1, 5, 7, 3, 11, 2):
        ids = rng.integers(0, 97, n).tolist()
        examples.append(Example(ids, [IGNORE] + ids[1:], len(examples) + 1))
    batch = DataLoader(examples, 16, 8, seed=1, pack=True).next_batch()
    assert batch.segment_ids is not None
    per_doc = [model.loss(e.ids, e.labels, reduction="sum") for e in examples if len(e.ids) > 1]
    counted = sum(len(e.ids) - 1 for e in examples)
    got = evaluate_loss(model, [batch.as_tuple()])
    assert abs(got - sum(per_doc) / counted) <= 1e-5 * abs(got)
    leaked = evaluate_loss(model, [batch.as_tuple()[:3]])
    assert abs(leaked - got) > 1e-4 * abs(got)
