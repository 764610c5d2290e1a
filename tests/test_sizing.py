"""TOST power and seed sizing against a simulation with statsmodels' own paired TOST."""

from __future__ import annotations

import numpy as np
import pytest

from moe_sieve.sweep.sizing import seeds_for_tost, tost_power


@pytest.mark.parametrize(("sd", "n", "margin"), [(2.0, 8, 2.0), (1.5, 10, 2.0), (3.0, 12, 3.0)])
def test_power_matches_statsmodels_simulation(sd, n, margin):
    from statsmodels.stats.weightstats import ttost_paired

    rng = np.random.default_rng(0)
    sims, hits = 600, 0
    for _ in range(sims):
        d = rng.normal(0.0, sd, n)
        p, _, _ = ttost_paired(d, np.zeros(n), -margin, margin)
        hits += p < 0.05
    assert tost_power(sd, n, margin) == pytest.approx(hits / sims, abs=0.05)


def test_seeds_for_tost():
    n = seeds_for_tost(2.0, 2.0)
    assert tost_power(2.0, n, 2.0) >= 0.8 > tost_power(2.0, n - 1, 2.0)
    assert seeds_for_tost(0.1, 2.0) == 8  # the paper's minimum
    assert seeds_for_tost(50.0, 2.0, maximum=20) == 21
    assert tost_power(1.0, 1, 2.0) == 0.0
