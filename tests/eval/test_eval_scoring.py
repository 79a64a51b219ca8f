import math
from types import SimpleNamespace

import pytest
import torch

from spud.eval.scoring import (
    binomial_stderr,
    bootstrap_stderr,
    centered,
    choice_logprobs,
    pass_at_k,
)


def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # 1 - C(8,2)/C(10,2) = 1 - 28/45
    assert pass_at_k(10, 2, 2) == pytest.approx(1 - 28 / 45)
    # 1 - C(5,3)/C(8,3) = 1 - 10/56
    assert pass_at_k(8, 3, 3) == pytest.approx(1 - 10 / 56)
    assert pass_at_k(5, 3, 3) == 1.0  # fewer failures than k: some draw must pass
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)


def test_stderr_and_centering():
    assert binomial_stderr(0.5, 100) == pytest.approx(0.05)
    assert bootstrap_stderr([0.0, 1.0] * 50) == pytest.approx(0.05, abs=0.01)
    assert centered(0.25, 0.25) == 0.0
    assert centered(1.0, 0.25) == 1.0
    assert centered(0.5, 0.0) == 0.5


class FakeLM(torch.nn.Module):
    """Next-token distribution fixed by a table: after token t, logits = table[t]."""

    def __init__(self, table: torch.Tensor, max_seq_len: int = 16):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)

    def forward(self, idx):
        return self.table[idx]


def test_mc_scorer_picks_the_choice_the_model_prefers():
    v = 10
    table = torch.zeros(v, v)
    table[1, 7] = 5.0   # after the context's last token 1, token 7 is likely
    table[7, 8] = 5.0   # and after 7, token 8
    model = FakeLM(table)
    scores = choice_logprobs(model, [0, 1], [[3], [7], [5, 5], [7, 8]], pad_id=0)
    assert max(range(3), key=lambda i: scores[i]) == 1
    logz = math.log(math.exp(5) + v - 1)
    assert scores[0] == pytest.approx(0 - logz, abs=1e-5)
    assert scores[1] == pytest.approx(5 - logz, abs=1e-5)
    assert scores[3] == pytest.approx(2 * (5 - logz), abs=1e-5)  # padding did not leak in


def test_mc_scorer_truncates_long_context_from_the_left():
    table = torch.zeros(10, 10)
    table[1, 7] = 5.0
    model = FakeLM(table, max_seq_len=4)
    scores = choice_logprobs(model, [2] * 20 + [1], [[7, 7], [3, 3]])
    # the context keeps its last 2 tokens (..., 2, 1): the first choice token follows 1, the
    # second follows a row of zeros (uniform over 10)
    logz = math.log(math.exp(5) + 9)
    assert scores == pytest.approx([(5 - logz) - math.log(10), -logz - math.log(10)], abs=1e-5)
