"""Sweeps: models x tasks x conditions x seeds, one directory and one process per run, resumable."""

from .config import Condition, EvalSettings, ModelEntry, RunSpec, SweepConfig, TaskEntry, expand, run_id
from .gather import COLUMNS, gather, read_results
from .pipeline import is_finished, run_one, train_and_evaluate
from .runner import SweepOptions, run_sweep

__all__ = [
    "COLUMNS",
    "Condition",
    "EvalSettings",
    "ModelEntry",
    "RunSpec",
    "SweepConfig",
    "SweepOptions",
    "TaskEntry",
    "expand",
    "gather",
    "is_finished",
    "read_results",
    "run_id",
    "run_one",
    "run_sweep",
    "train_and_evaluate",
]
