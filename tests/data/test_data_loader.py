"""TokenLoader: correct windows, deterministic order, exact resume, rank sharding."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from data_helpers import make_cfg, quiet

from spud.data.build import build_dataset
from spud.data.loader import TokenLoader
from spud.errors import SpudError

SEQ = 16


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer_file):
    """~30k tokens in several train shards (shard ends leave unused tails to skip over)."""
    run = tmp_path_factory.mktemp("loader") / "run"
    run.mkdir()
    shutil.copy(tokenizer_file, run / "tokenizer.json")
    cfg = make_cfg([{"name": "a", "type": "builtin", "builtin": "arithmetic"},
                    {"name": "r", "type": "builtin", "builtin": "reasoning"}],
                   total_tokens=30_000, shard_tokens=7_000, val_fraction=0.05)
    build_dataset(cfg, run, progress=False, log=quiet)
    return run


def _shard_tokens(run) -> list[np.ndarray]:
    return [np.fromfile(p, dtype="<u2") for p in sorted((run / "data").glob("train_*.bin"))]


def _batches(loader: TokenLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def test_batches_are_shifted_windows_of_the_shards(run):
    loader = TokenLoader(run, "train", 4, SEQ, seed=0)
    shards = _shard_tokens(run)
    # windows start every SEQ tokens and overlap by one: every token is a target once
    assert loader.windows_per_epoch == sum((len(s) - 1) // SEQ for s in shards)
    windows = {tuple(s[i:i + SEQ + 1].tolist())
               for s in shards for i in range(0, len(s) - SEQ, SEQ)}
    for x, y in _batches(loader, 5):
        assert x.shape == y.shape == (4, SEQ) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            assert tuple(row_x + row_y[-1:]) in windows


def test_an_epoch_visits_every_window_once(run):
    loader = TokenLoader(run, "train", 8, SEQ, seed=3)
    ids = [loader.window_ids() for _ in range(loader.batches_per_epoch)]
    flat = np.concatenate(ids)
    assert len(set(flat.tolist())) == len(flat) == loader.batches_per_epoch * 8
    assert loader.windows_per_epoch - len(flat) < 8  # only the incomplete last batch is dropped
    next_epoch = np.concatenate([loader.window_ids() for _ in range(loader.batches_per_epoch)])
    assert loader.epoch == 1 and not np.array_equal(next_epoch, flat)


def test_order_depends_only_on_seed(run):
    a = [x for x, _ in _batches(TokenLoader(run, "train", 4, SEQ, seed=5), 6)]
    b = [x for x, _ in _batches(TokenLoader(run, "train", 4, SEQ, seed=5), 6)]
    c = [x for x, _ in _batches(TokenLoader(run, "train", 4, SEQ, seed=6), 6)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


@pytest.mark.parametrize("stop_after", [3, "epoch_end", "next_epoch"])
def test_resume_from_state_dict_is_exact(run, stop_after):
    reference = TokenLoader(run, "train", 4, SEQ, seed=1)
    per_epoch = reference.batches_per_epoch
    k = {3: 3, "epoch_end": per_epoch, "next_epoch": per_epoch + 2}[stop_after]
    _batches(reference, k)
    state = json.loads(json.dumps(reference.state_dict()))  # as stored in a checkpoint
    expected = _batches(reference, per_epoch + 3)

    resumed = TokenLoader(run, "train", 4, SEQ, seed=1)
    resumed.load_state_dict(state)
    got = _batches(resumed, per_epoch + 3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got))


def test_ranks_split_each_global_batch(run):
    single = TokenLoader(run, "train", 6, SEQ, seed=2)
    ranks = [TokenLoader(run, "train", 3, SEQ, seed=2, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == single.batches_per_epoch
    seen = []
    for _ in range(single.batches_per_epoch + 2):  # into the second epoch too
        whole = single.window_ids()
        parts = [r.window_ids() for r in ranks]
        assert np.array_equal(np.concatenate(parts), whole)  # contiguous slices, in rank order
        assert not set(parts[0].tolist()) & set(parts[1].tolist())
        seen.append(whole)
    first_epoch = np.concatenate(seen[:single.batches_per_epoch])
    assert len(np.unique(first_epoch)) == len(first_epoch)


def test_iteration_and_val_split(run):
    loader = TokenLoader(run, "val", 2, SEQ, seed=0)
    x, y = next(iter(loader))
    assert x.shape == y.shape == (2, SEQ)


def test_too_few_tokens_says_what_to_change(run):
    with pytest.raises(SpudError) as err:
        TokenLoader(run, "val", 64, 512, seed=0)
    msg = str(err.value)
    assert "val split" in msg and "tokens" in msg and "needs 64 windows" in msg
    assert "train.seq_len" in msg and "data.val_fraction" in msg


def test_mismatched_state_is_rejected(run):
    state = TokenLoader(run, "train", 4, SEQ, seed=0).state_dict()
    with pytest.raises(SpudError, match="global_batch: saved 4, now 8"):
        TokenLoader(run, "train", 8, SEQ, seed=0).load_state_dict(state)


def test_bad_arguments(run):
    with pytest.raises(SpudError, match="split must be one of"):
        TokenLoader(run, "test", 4, SEQ, seed=0)
    with pytest.raises(SpudError, match="rank 2 is not in range"):
        TokenLoader(run, "train", 4, SEQ, seed=0, rank=2, world_size=2)
