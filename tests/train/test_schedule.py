import pytest

from spud.config import TrainConfig
from spud.train.schedule import lr_at


def test_cosine_warmup_then_decay_to_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, schedule="cosine")
    lrs = [lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_wsd_holds_then_decays():
    cfg = TrainConfig(lr=1.0, warmup_steps=0, max_steps=100, decay_fraction=0.2, min_lr_ratio=0.0, schedule="wsd")
    assert lr_at(0, cfg) == 1.0 and lr_at(79, cfg) == 1.0
    assert lr_at(90, cfg) == pytest.approx(0.5)
    assert lr_at(100, cfg) == pytest.approx(0.0)


def test_constant():
    cfg = TrainConfig(lr=0.5, warmup_steps=2, max_steps=10, schedule="constant")
    assert [lr_at(s, cfg) for s in (0, 1, 5, 9)] == [0.25, 0.5, 0.5, 0.5]
