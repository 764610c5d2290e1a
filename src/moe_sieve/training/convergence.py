"""Whether a run's training loss had stopped falling: recorded per run, never assumed.

A comparison of conditions at a fixed step budget measures learning speed, not what the adapters can hold,
when some runs are still learning at the end. Each run's ``metrics.json`` therefore keeps its logged loss
curve and a verdict: the mean loss of the last ``window`` logged points against the ``window`` points
before them. The run is ``converged`` when that drop is at most ``REL_THRESHOLD`` of the earlier mean or at
most ``ABS_THRESHOLD`` nats, or when the last window's mean is itself at most ``ABS_THRESHOLD`` (a loss already
near zero has nothing left to fall by that matters).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

WINDOW_FRACTION = 0.2
REL_THRESHOLD = 0.05
ABS_THRESHOLD = 0.02


def loss_curve(log_history: Sequence[dict[str, Any]]) -> dict[str, list]:
    """Every logged training loss of a Trainer's ``log_history`` (all resume segments: Trainer restores the
    history from the checkpoint), as ``{"step": [...], "loss": [...]}``."""
    points = [(int(log["step"]), float(log["loss"])) for log in log_history if "loss" in log and "step" in log]
    return {"step": [s for s, _ in points], "loss": [v for _, v in points]}


def convergence(losses: Sequence[float]) -> dict[str, Any]:
    """``{"converged", "rel_drop", "abs_drop", "window", "threshold", "abs_threshold"}``; ``converged`` is None
    when fewer than four losses were logged (too few to tell)."""
    values = [float(v) for v in losses if math.isfinite(float(v))]
    window = max(2, round(WINDOW_FRACTION * len(values)))
    record: dict[str, Any] = {
        "converged": None,
        "rel_drop": None,
        "abs_drop": None,
        "window": window,
        "threshold": REL_THRESHOLD,
        "abs_threshold": ABS_THRESHOLD,
    }
    if len(values) < 2 * window:
        return record
    before = sum(values[-2 * window : -window]) / window
    last = sum(values[-window:]) / window
    abs_drop = before - last
    rel_drop = abs_drop / before if before > 0 else 0.0
    record.update(
        converged=bool(rel_drop <= REL_THRESHOLD or abs_drop <= ABS_THRESHOLD or last <= ABS_THRESHOLD),
        rel_drop=round(rel_drop, 6),
        abs_drop=round(abs_drop, 6),
    )
    return record
