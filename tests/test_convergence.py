"""The convergence verdict each run's metrics.json records."""

from __future__ import annotations

import pytest

from moe_sieve.training.convergence import ABS_THRESHOLD, REL_THRESHOLD, convergence, loss_curve


def test_still_falling_is_not_converged():
    losses = [2.0 - 0.1 * i for i in range(15)]  # falls 0.1 per log: last window clearly below the one before
    record = convergence(losses)
    assert record["converged"] is False and record["window"] == 3
    before, last = sum(losses[-6:-3]) / 3, sum(losses[-3:]) / 3
    assert record["rel_drop"] == pytest.approx((before - last) / before, abs=1e-6)


def test_plateau_and_near_zero_are_converged():
    assert convergence([2.0, 1.0, *([0.5] * 10)])["converged"] is True
    tiny = [1.0, 0.5, 0.1, 0.03, 0.02, 0.015, 0.012, 0.01, 0.008, 0.006]  # halves, but by < ABS_THRESHOLD nats
    record = convergence(tiny)
    assert record["rel_drop"] > REL_THRESHOLD and record["abs_drop"] <= ABS_THRESHOLD and record["converged"] is True


def test_reaching_zero_is_converged():
    # as the facts pilot's full run: a steep fall that ends at ~0 (nothing left to learn)
    record = convergence([1.0] * 8 + [0.3, 0.1, 0.01, 0.0])
    assert record["abs_drop"] > ABS_THRESHOLD and record["converged"] is True


def test_too_few_points_is_unknown():
    assert convergence([1.0, 0.9, 0.8])["converged"] is None


def test_loss_curve_reads_every_logged_loss():
    history = [{"loss": 2.0, "step": 10}, {"drift/kl": 1.0, "step": 10}, {"loss": 1.5, "step": 20}, {"train_loss": 1}]
    assert loss_curve(history) == {"step": [10, 20], "loss": [2.0, 1.5]}
