"""What every fine-tuning results section shares: the compared metric and each condition's role."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...seed_stats import ComparisonRow, MetricInfo, RunRecord
from ..data import RunInfo, StudyData

NOT_CONVERGED = "†"


@dataclass
class ResultsContext:
    """What every results section needs: the metric, its runs and statistics, and each condition's role."""

    data: StudyData
    info: MetricInfo
    records: list[RunRecord]
    compared: list[ComparisonRow]
    ref: str | None
    margins: Sequence[float]
    alpha: float
    cond_info: dict[str, tuple[str | None, int | None]]
    runs: list[RunInfo]  # the runs with a value of the metric

    @property
    def unit(self) -> str:
        return self.info.unit.name

    def diff(self, value: float | None, sign: bool = True) -> str:
        """A difference in the metric's unit: 2 decimals for pp, 3 for nats and raw."""
        digits = ".2f" if self.unit == "pp" else ".3f"
        return "–" if value is None else format(value, ("+" if sign else "") + digits)

    def ci(self, row: ComparisonRow) -> str:
        return "–" if row.ci_low is None else f"[{self.diff(row.ci_low)}, {self.diff(row.ci_high)}]"

    def condition_cell(self, row: ComparisonRow) -> str:
        return row.condition + (f" {NOT_CONVERGED}" if row.unconverged_seeds else "")

    def n_cell(self, row: ComparisonRow) -> str:
        flagged = len(row.unconverged_seeds)
        return f"{row.n} ({flagged} {NOT_CONVERGED})" if flagged else str(row.n)
