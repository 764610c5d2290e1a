"""Experiment tracking (``--report-to tensorboard|wandb|mlflow``): transformers' own reporting callbacks log loss,
learning rate and tokens/s; this module makes sure tokens/s and the run's routing figures reach them.

transformers calls its reporting callbacks before the ones a Trainer is given, so values that a later callback
adds to a log line would never be reported; ``install_tracking`` puts the callbacks that add values first.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

REPORT_TO = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_report_to(report_to: str) -> None:
    """A clear error before any work when the tracker is unknown or its package is missing."""
    if report_to not in REPORT_TO:
        raise ValueError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    package = REPORT_TO[report_to]
    if package is not None and importlib.util.find_spec(package) is None:
        raise ValueError(f"--report-to {report_to} needs the {package} package: pip install {package}")


def routing_figures(selection: Any, profile: Any = None) -> dict[str, float]:
    """Scalars that describe the run's selection: experts adapted, and with the profile, the share of each layer's
    routed tokens that the selected experts receive (``routing/coverage_layer_{L}`` and their mean)."""
    if selection is None:
        return {}
    figures: dict[str, float] = {
        "routing/selected_experts": float(selection.total_slots),
        "routing/selected_fraction": selection.total_slots / (len(selection.experts) * selection.num_experts),
    }
    if profile is not None:
        from ..selection import selection_coverage

        coverage = selection_coverage(selection, profile.counts_LE, list(profile.layer_ids))
        figures.update({f"routing/coverage_layer_{layer}": value for layer, value in coverage.items()})
        figures["routing/coverage_mean"] = sum(coverage.values()) / len(coverage)
    return figures


class RoutingFiguresCallback(TrainerCallback):
    """Adds the routing figures to the first log line, so every tracker records them at the first logged step."""

    def __init__(self, figures: dict[str, float]) -> None:
        self.figures = dict(figures)
        self._done = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and not self._done and "loss" in logs:
            logs.update(self.figures)
            self._done = True


def _run_profile(run_dir: Path, profile_path: str | None) -> Any:
    from ..profiling import Profile

    for path in (run_dir / "profile", Path(profile_path) if profile_path else None):
        if path is not None and path.exists():
            return Profile.load(path)
    return None


def install_tracking(trainer: Any, *, report_to: str, run_dir: Path, selection: Any, profile: str | None) -> None:
    """Order the value-adding callbacks before the trackers, add the routing figures, and point TensorBoard at
    ``RUN_DIR/tensorboard`` (unless ``TENSORBOARD_LOGGING_DIR`` says otherwise)."""
    from .trainer import ThroughputCallback

    handler = trainer.callback_handler
    figures = routing_figures(selection, _run_profile(Path(run_dir), profile) if selection is not None else None)
    adders = [cb for cb in handler.callbacks if isinstance(cb, ThroughputCallback)]
    if figures:
        adders.append(RoutingFiguresCallback(figures))
    handler.callbacks = adders + [cb for cb in handler.callbacks if cb not in adders]
    if report_to == "tensorboard":
        from transformers.integrations import TensorBoardCallback

        for cb in handler.callbacks:
            if isinstance(cb, TensorBoardCallback) and cb.logging_dir is None:
                cb.logging_dir = str(Path(run_dir) / "tensorboard")
