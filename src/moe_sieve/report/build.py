"""The report's sections in their order, each built by its module under ``sections/`` from the study data."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .blocks import Section
from .data import load_study
from .sections.allocation import allocation_section
from .sections.drift import drift_section
from .sections.profiling import profiling_sections
from .sections.results import results_sections


def build_sections(
    study_dir: str | os.PathLike,
    reference: str = "full",
    margins: Sequence[float] = (1.0, 2.0, 3.0),
    k: str = "25%",
    stability_trials: int = 50,
    metric: str = "accuracy",
    unit: str | None = None,
) -> tuple[list[Section], Any]:
    """The sections of the report of ``study_dir`` (and the study data they came from); the results sections
    compare ``metric`` (any numeric results.csv column, in its registered unit; see seed_stats.METRICS)."""
    data = load_study(study_dir, k=k, stability_trials=stability_trials)
    sections = results_sections(data, reference, margins, metric=metric, unit=unit, k=k)
    sections += profiling_sections(data)
    sections += [s for s in (allocation_section(data), drift_section(data)) if s is not None]
    return sections, data
