import math

import pytest

from qlora_ext.train.schedule import lr_at


def test_warmup_then_constant():
    lrs = [lr_at(s, 1.0, warmup=4) for s in range(7)]
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]


def test_linear_and_cosine_decay():
    lin = [lr_at(s, 2.0, warmup=2, schedule="linear", total_steps=6) for s in range(6)]
    assert lin == pytest.approx([1.0, 2.0, 2.0, 1.5, 1.0, 0.5])
    cos = [lr_at(s, 1.0, warmup=0, schedule="cosine", total_steps=4) for s in range(5)]
    assert cos == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0])


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_at(0, 1.0, schedule="step")
    with pytest.raises(ValueError, match="needs total_steps"):
        lr_at(0, 1.0, schedule="cosine")
    with pytest.raises(ValueError, match="must exceed warmup"):
        lr_at(0, 1.0, warmup=5, schedule="linear", total_steps=5)
    with pytest.raises(ValueError, match="warmup"):
        lr_at(0, 1.0, warmup=-1)
