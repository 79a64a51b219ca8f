"""Scaling-law fit and the closed-form compute-optimal allocation."""

import numpy as np
import pytest

from spud.plan.fit import CHINCHILLA, ScalingLaw, fit_law, intervals


def test_fit_recovers_known_law_from_noisy_synthetic_runs():
    true = ScalingLaw(E=1.9, A=400.0, B=1500.0, alpha=0.33, beta=0.36)
    rng = np.random.default_rng(1)
    N = np.repeat(np.logspace(6, 9.5, 8), 5)
    D = np.tile(np.logspace(8, 11.5, 5), 8)
    L = true.loss(N, D) * np.exp(rng.normal(0, 0.003, N.size))  # 0.3% multiplicative noise
    law = fit_law(N, D, L, bootstrap=4)
    assert law.E == pytest.approx(true.E, abs=0.05)
    assert law.alpha == pytest.approx(true.alpha, abs=0.02)
    assert law.beta == pytest.approx(true.beta, abs=0.02)
    assert law.A == pytest.approx(true.A, rel=0.3)
    assert law.B == pytest.approx(true.B, rel=0.3)
    ci = intervals(law)
    assert len(law.samples) == 4 and set(ci) == {"E", "A", "B", "alpha", "beta"}
    assert all(lo <= hi for lo, hi in ci.values())


@pytest.mark.parametrize("C", [1e21, 1e23])
def test_closed_form_optimum_with_published_chinchilla_constants(C):
    A, B, a, b = 482.01, 2085.43, 0.3478, 0.3658  # Besiroglu et al. 2024 (E does not enter N*, D*)
    G = (a * A / (b * B)) ** (1 / (a + b))
    n_hand = G * (C / 6) ** (b / (a + b))
    d_hand = (1 / G) * (C / 6) ** (a / (a + b))
    n, d = CHINCHILLA.optimal(C)
    assert n == pytest.approx(n_hand, rel=1e-12)
    assert d == pytest.approx(d_hand, rel=1e-12)
    assert 6 * n * d == pytest.approx(C, rel=1e-12)
    # It is the minimum along the iso-FLOP line: moving N either way raises the loss.
    for f in (0.8, 1.25):
        assert CHINCHILLA.loss(n * f, d / f) > CHINCHILLA.loss(n, d)


def test_closed_form_values_at_1e21_and_1e23():
    # Written-out numbers (G = (αA/(βB))^(1/(α+β)) ≈ 0.1196 for the Besiroglu constants).
    G = (0.3478 * 482.01 / (0.3658 * 2085.43)) ** (1 / (0.3478 + 0.3658))
    assert G == pytest.approx(0.11963, rel=1e-3)
    n21, d21 = CHINCHILLA.optimal(1e21)
    assert n21 == pytest.approx(G * (1e21 / 6) ** (0.3658 / 0.7136), rel=1e-9)
    assert n21 == pytest.approx(2.78e9, rel=0.01) and d21 == pytest.approx(6.0e10, rel=0.01)
    n23, _ = CHINCHILLA.optimal(1e23)
    assert n23 / n21 == pytest.approx(100 ** (0.3658 / 0.7136), rel=1e-9)
