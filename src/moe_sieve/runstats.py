"""Multi-seed statistics of fine-tuning runs (paper §5.2, §7.1, App. B): per-condition mean and seed std,
paired per-seed deltas against a reference condition with a t confidence interval, the paired t-test, TOST
equivalence at several margins and the seed-std ratio.

Runs pair by seed value: a seed present on one side only is left out of the paired numbers and counted.
Metrics are fractions in [0, 1]; deltas, intervals and margins are in percentage points.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REQUIRED_COLUMNS = ("model", "task", "condition", "seed")


@dataclass
class RunRecord:
    """One finished run's metric, and where it came from (for error messages)."""

    model: str
    task: str
    condition: str
    seed: int
    value: float
    source: str


@dataclass
class ComparisonRow:
    """Statistics of one (model, task, condition); the paired fields are None for the reference itself,
    when the reference is absent, or when fewer than two seeds pair up."""

    model: str
    task: str
    condition: str
    n: int
    mean: float
    std: float | None
    seeds: list[int]
    reference: str
    n_paired: int | None = None
    unpaired_seeds: list[int] = field(default_factory=list)
    delta_pp: float | None = None
    ci_low_pp: float | None = None
    ci_high_pp: float | None = None
    ttest_p: float | None = None
    tost: dict[str, dict[str, Any]] = field(default_factory=dict)
    std_ratio: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _margin_key(margin: float) -> str:
    return f"{margin:g}"


def parse_margins(text: str | Sequence[float]) -> list[float]:
    """``"1,2,3"`` -> [1.0, 2.0, 3.0]: positive equivalence margins in percentage points."""
    items = text.split(",") if isinstance(text, str) else list(text)
    margins = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"--margins: {item!r} is not a number (give margins in pp, e.g. 1,2,3)") from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"--margins: {item!r} must be a positive number of percentage points")
        margins.append(value)
    if not margins:
        raise ValueError("--margins: give at least one margin in percentage points, e.g. 1,2,3")
    return margins


def read_runs(path: str | Path, metric: str = "accuracy") -> tuple[list[RunRecord], int]:
    """The runs of a results CSV that have ``metric``; returns them and how many rows lack it (failed or
    unfinished runs). Any CSV with ``model, task, condition, seed`` and the metric column works."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a results CSV with columns {', '.join(REQUIRED_COLUMNS)})")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in (*REQUIRED_COLUMNS, metric) if c not in columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(columns) or 'none'})")
        runs: list[RunRecord] = []
        seen: dict[tuple[str, str, str, int], str] = {}
        skipped = 0
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            raw = (row.get(metric) or "").strip()
            if not raw or raw.lower() in ("nan", "none", "null"):
                skipped += 1
                continue
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{where}: {metric} {raw!r} is not a number") from None
            if not 0 <= value <= 1:
                raise ValueError(f"{where}: {metric} {raw} is outside [0, 1] (metrics are fractions)")
            try:
                seed_f = float((row.get("seed") or "").strip())
                if not seed_f.is_integer():
                    raise ValueError
                seed = int(seed_f)
            except ValueError:
                raise ValueError(f"{where}: seed {row.get('seed')!r} is not an integer") from None
            key = (row["model"], row["task"], row["condition"], seed)
            if key in seen:
                raise ValueError(
                    f"{where}: model {key[0]!r}, task {key[1]!r}, condition {key[2]!r}, seed {seed} already "
                    f"appears at {seen[key]}"
                )
            seen[key] = where
            runs.append(RunRecord(row["model"], row["task"], row["condition"], seed, value, where))
    return runs, skipped


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _paired(diff_N: np.ndarray, margins: Sequence[float], alpha: float, confidence: float) -> dict[str, Any]:
    """t interval, paired t-test and TOST of per-seed differences (fractions) in percentage points."""
    from scipy import stats

    n = len(diff_N)
    out: dict[str, Any] = {"delta_pp": float(100 * diff_N.mean())}
    if n < 2:
        return out
    test = stats.ttest_1samp(diff_N, 0.0)
    ci = test.confidence_interval(confidence_level=confidence)
    out.update(
        ci_low_pp=_finite(100 * ci.low),
        ci_high_pp=_finite(100 * ci.high),
        ttest_p=_finite(test.pvalue),
    )
    tost = {}
    for margin in margins:
        # Two one-sided tests (Schuirmann): H0 delta <= -m (reject: greater) and H0 delta >= +m (reject: less).
        m = margin / 100
        p_lower = _finite(stats.ttest_1samp(diff_N, -m, alternative="greater").pvalue)
        p_upper = _finite(stats.ttest_1samp(diff_N, m, alternative="less").pvalue)
        p = None if p_lower is None or p_upper is None else max(p_lower, p_upper)
        tost[_margin_key(margin)] = {
            "p": p,
            "p_lower": p_lower,
            "p_upper": p_upper,
            "equivalent": p is not None and p < alpha,
        }
    out["tost"] = tost
    return out


def compare_runs(
    runs: Iterable[RunRecord],
    reference: str = "full",
    margins: Sequence[float] = (1.0, 2.0, 3.0),
    alpha: float = 0.05,
    confidence: float = 0.95,
) -> list[ComparisonRow]:
    """One row per (model, task, condition), sorted, with paired statistics against ``reference``."""
    if not 0 < alpha < 1:
        raise ValueError(f"--alpha must be in (0, 1), got {alpha}")
    if not 0 < confidence < 1:
        raise ValueError(f"--confidence must be in (0, 1), got {confidence}")
    groups: dict[tuple[str, str, str], dict[int, float]] = {}
    for run in runs:
        groups.setdefault((run.model, run.task, run.condition), {})[run.seed] = run.value
    if not groups:
        raise ValueError("no finished runs to compare (every row lacks the metric)")
    conditions = {condition for _, _, condition in groups}
    if reference not in conditions:
        raise ValueError(
            f"--reference {reference!r} is not a condition of these runs ({', '.join(sorted(conditions))})"
        )
    rows = []
    for (model, task, condition), by_seed in sorted(groups.items()):
        values = np.array([by_seed[s] for s in sorted(by_seed)], dtype=np.float64)
        row = ComparisonRow(
            model=model,
            task=task,
            condition=condition,
            n=len(values),
            mean=float(values.mean()),
            std=float(values.std(ddof=1)) if len(values) > 1 else None,
            seeds=sorted(by_seed),
            reference=reference,
        )
        ref = groups.get((model, task, reference))
        if condition != reference and ref is not None:
            common = sorted(set(by_seed) & set(ref))
            row.n_paired = len(common)
            row.unpaired_seeds = sorted(set(by_seed) ^ set(ref))
            if common:
                diff_N = np.array([by_seed[s] - ref[s] for s in common], dtype=np.float64)
                for key, value in _paired(diff_N, margins, alpha, confidence).items():
                    setattr(row, key, value)
            ref_values = np.array(list(ref.values()), dtype=np.float64)
            if row.std is not None and len(ref_values) > 1 and ref_values.std(ddof=1) > 0:
                row.std_ratio = row.std / float(ref_values.std(ddof=1))
        rows.append(row)
    return rows


def compare_runs_csv(
    path: str | Path,
    reference: str = "full",
    margins: Sequence[float] | str = (1.0, 2.0, 3.0),
    metric: str = "accuracy",
    alpha: float = 0.05,
    confidence: float = 0.95,
) -> tuple[list[ComparisonRow], int]:
    """:func:`compare_runs` over a results CSV; also returns how many rows had no metric."""
    runs, skipped = read_runs(path, metric)
    return compare_runs(runs, reference, parse_margins(margins), alpha, confidence), skipped
