"""Non-finite steps are skipped, and too many in a row roll back to the last checkpoint.

Faults are injected with train.debug_nan_at_step (a testing aid: the loss of those steps is
multiplied by NaN once each, so the loss and every gradient are non-finite)."""

import torch
from safetensors.torch import load_file

from spud.train.metrics import read_metrics
from spud.train.schedule import lr_at
from spud.train.trainer import Trainer


def _cfg(tiny_cfg, **train):
    cfg = tiny_cfg.model_copy(deep=True)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_nonfinite_step_is_skipped(tiny_cfg, fresh_run):
    cfg = _cfg(tiny_cfg, max_steps=5, checkpoint_every=1, keep_checkpoints=10, debug_nan_at_step=[3])
    summary = Trainer(cfg, fresh_run).run()
    assert summary["step"] == 5
    records = read_metrics(fresh_run / "metrics.jsonl")
    bad = [r for r in records if r["kind"] == "event" and r["event"] == "nonfinite"]
    assert [r["step"] for r in bad] == [3] and bad[0]["consecutive"] == 1
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    assert train[3]["loss"] is None and all(train[s]["loss"] is not None for s in (1, 2, 4, 5))
    ck = fresh_run / "checkpoints"
    w2, w3, w4 = (load_file(ck / f"step_000000{s}" / "model.safetensors") for s in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # no update at step 3
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)  # training went on
    assert all(torch.isfinite(v).all() for v in w4.values())


def test_consecutive_bad_steps_roll_back(tiny_cfg, fresh_run):
    cfg = _cfg(tiny_cfg, max_steps=10, checkpoint_every=4, debug_nan_at_step=[6, 7], max_bad_steps=2,
               rollback_lr_factor=0.5)
    summary = Trainer(cfg, fresh_run).run()
    assert summary["step"] == 10
    records = read_metrics(fresh_run / "metrics.jsonl")
    events = [r for r in records if r["kind"] == "event"]
    rb = [r for r in events if r["event"] == "rollback"]
    assert len(rb) == 1 and rb[0]["step"] == 4 and rb[0]["checkpoint"] == "step_0000004"
    assert rb[0]["lr_scale"] == 0.5 and rb[0]["bad_steps"] == 2
    assert [r["step"] for r in events if r["event"] == "nonfinite"] == [6, 7]
    after = [r for r in records[records.index(rb[0]):] if r["kind"] == "train"]
    assert [r["step"] for r in after] == list(range(5, 11))  # steps 5.. are redone after the rollback
    assert all(r["loss"] is not None for r in after)
    assert all(abs(r["lr"] - 0.5 * lr_at(r["step"] - 1, cfg.train)) < 1e-12 for r in after)
    state = (fresh_run / "checkpoints" / "step_0000010" / "state.json").read_text()
    assert '"lr_scale": 0.5' in state  # a resume keeps the reduced LR
