"""Multi-seed statistics of fine-tuning runs (paper §5.2, §7.1, App. B): per-condition mean and seed std,
paired per-seed deltas against a reference condition with a t confidence interval, the paired t-test, TOST
equivalence at several margins and the seed-std ratio.

Runs pair by seed value: a seed present on one side only is left out of the paired numbers and counted.

Units come from the metric registry (:data:`METRICS`, extend it with :func:`register_metric`): a proportion
(accuracy, gold_prob, ...) is a fraction in [0, 1] whose deltas, intervals and margins are in percentage points
(pp); a log-likelihood (gold_logprob, gold_nll_per_token, ...) is in nats, and so are its deltas and margins.
A column the registry does not know is read as a number in its own units ("raw": no scaling, no range check),
unless ``unit`` says otherwise, so a margin is never silently multiplied by 100.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._io import read_csv_rows

REQUIRED_COLUMNS = ("model", "task", "condition", "seed")
CONVERGED_COLUMN = "converged"


@dataclass(frozen=True)
class Unit:
    """How a metric's paired differences and equivalence margins are expressed."""

    name: str  # short label in tables and JSON: "pp", "nats", "raw"
    scale: float  # a difference in this unit = scale * the difference of the raw values
    bounds: tuple[float, float] | None  # values outside are refused (a proportion is in [0, 1])
    label: str  # long name, for help texts and captions


PP = Unit("pp", 100.0, (0.0, 1.0), "percentage points")
NATS = Unit("nats", 1.0, None, "nats")
RAW = Unit("raw", 1.0, None, "the column's own units")
UNITS = {u.name: u for u in (PP, NATS, RAW)}


@dataclass(frozen=True)
class MetricInfo:
    """A metric column: its unit and which direction is better (for verdicts such as "hot beats random")."""

    name: str
    unit: Unit
    higher_is_better: bool = True
    help: str = ""
    registered: bool = True


METRICS: dict[str, MetricInfo] = {}


def register_metric(name: str, unit: Unit, higher_is_better: bool = True, help: str = "") -> MetricInfo:
    """Make ``name`` a known metric column (``compare-runs --metric`` and ``report --metric`` use its unit)."""
    METRICS[name] = MetricInfo(name, unit, higher_is_better, help)
    return METRICS[name]


register_metric("accuracy", PP, help="share of rows answered correctly")
register_metric("accuracy_norm", PP, help="length-normalised multiple-choice accuracy")
register_metric("gold_prob", PP, help="mean over rows of P(gold completion | prompt), a soft accuracy")
register_metric("result_prob", PP, help="mean over rows of P(the '= N' result tokens of the worked chain)")
register_metric("gold_logprob", NATS, help="mean over rows of log P(gold completion | prompt)")
register_metric("gold_nll_per_token", NATS, higher_is_better=False, help="gold completion's NLL per token")
register_metric("result_logprob", NATS, help="mean over rows of log P(result tokens)")
register_metric("result_nll_per_token", NATS, higher_is_better=False, help="result tokens' NLL per token")


def _further_evaluation(metric: str) -> MetricInfo | None:
    """``NAME_METRIC`` (a sweep's ``eval.also`` column, e.g. ``paraphrase_gold_prob``) has METRIC's unit."""
    for name in sorted(METRICS, key=len, reverse=True):
        if metric.endswith("_" + name) and len(metric) > len(name) + 1:
            return dataclasses.replace(METRICS[name], name=metric)
    return None


def metric_info(metric: str, unit: str | None = None) -> MetricInfo:
    """The registered metric, or an unknown column in raw units; ``unit`` (pp, nats, raw) overrides the unit."""
    info = METRICS.get(metric) or _further_evaluation(metric) or MetricInfo(metric, RAW, True, "", registered=False)
    if unit is None:
        return info
    if unit not in UNITS:
        raise ValueError(f"--unit {unit!r}: expected one of {', '.join(UNITS)}")
    return dataclasses.replace(info, unit=UNITS[unit])


def unit_note(info: MetricInfo) -> str | None:
    """One line for a metric whose unit is a guess (not registered and no --unit), else None."""
    if info.registered or info.unit is not RAW:
        return None
    return (
        f"{info.name} is not a registered metric: its values, deltas and margins are taken in the column's own "
        f"units, higher is better (pass --unit pp for a proportion, --unit nats for a log-likelihood)"
    )


@dataclass
class RunRecord:
    """One finished run's metric, and where it came from (for error messages)."""

    model: str
    task: str
    condition: str
    seed: int
    value: float
    source: str
    converged: bool | None = None


@dataclass
class ComparisonRow:
    """Statistics of one (model, task, condition); the paired fields are None for the reference itself,
    when the reference is absent, or when fewer than two seeds pair up.

    ``mean`` and ``std`` are in the metric's own scale (fractions for a proportion); ``delta``, ``ci_low``,
    ``ci_high`` and the TOST margins are in ``unit``. The ``*_pp`` fields repeat them for a proportion (unit pp)
    and are None otherwise."""

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
    metric: str = "accuracy"
    unit: str = "pp"
    delta: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    unconverged_seeds: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _margin_key(margin: float) -> str:
    return f"{margin:g}"


def parse_margins(text: str | Sequence[float], unit: Unit = PP) -> list[float]:
    """``"1,2,3"`` -> [1.0, 2.0, 3.0]: positive equivalence margins in the metric's unit (pp by default)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    margins = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"--margins: {item!r} is not a number (give margins in {unit.name}, e.g. 1,2,3)") from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"--margins: {item!r} must be a positive number of {unit.label}")
        margins.append(value)
    if not margins:
        raise ValueError(f"--margins: give at least one margin in {unit.label}, e.g. 1,2,3")
    return margins


def _converged(raw: str | None, where: str) -> bool | None:
    text = (raw or "").strip().lower()
    if text in ("", "nan", "none", "null"):
        return None
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"{where}: {CONVERGED_COLUMN} {raw!r} is not True or False")


def read_runs(path: str | Path, metric: str = "accuracy", unit: str | None = None) -> tuple[list[RunRecord], int]:
    """The runs of a results CSV that have ``metric``; returns them and how many rows lack it (failed or
    unfinished runs). Any CSV with ``model, task, condition, seed`` and the metric column works; an optional
    ``converged`` column (True/False/blank) is kept per run."""
    info = metric_info(metric, unit)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a results CSV with columns {', '.join(REQUIRED_COLUMNS)})")
    columns, table = read_csv_rows(path)
    missing = [c for c in (*REQUIRED_COLUMNS, metric) if c not in columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(columns) or 'none'})")
    runs: list[RunRecord] = []
    seen: dict[tuple[str, str, str, int], str] = {}
    skipped = 0
    for line, row in table:
        where = f"{path}:{line}"
        raw = (row.get(metric) or "").strip()
        if not raw or raw.lower() in ("nan", "none", "null"):
            skipped += 1
            continue
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{where}: {metric} {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{where}: {metric} {raw!r} is not finite")
        bounds = info.unit.bounds
        if bounds is not None and not bounds[0] <= value <= bounds[1]:
            raise ValueError(
                f"{where}: {metric} {raw} is outside [{bounds[0]:g}, {bounds[1]:g}] ({metric} is a proportion, "
                f"a fraction whose differences are reported in {info.unit.name})"
            )
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
        converged = _converged(row.get(CONVERGED_COLUMN), where)
        runs.append(RunRecord(row["model"], row["task"], row["condition"], seed, value, where, converged))
    return runs, skipped


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _paired(
    diff_N: np.ndarray, margins: Sequence[float], alpha: float, confidence: float, unit: Unit = PP
) -> dict[str, Any]:
    """t interval, paired t-test and TOST of per-seed differences (raw values), reported in ``unit``."""
    from scipy import stats

    n = len(diff_N)
    out: dict[str, Any] = {"delta": float(unit.scale * diff_N.mean())}
    if n < 2:
        return _with_pp(out, unit)
    test = stats.ttest_1samp(diff_N, 0.0)
    ci = test.confidence_interval(confidence_level=confidence)
    out.update(
        ci_low=_finite(unit.scale * ci.low),
        ci_high=_finite(unit.scale * ci.high),
        ttest_p=_finite(test.pvalue),
    )
    tost = {}
    for margin in margins:
        # Two one-sided tests (Schuirmann): H0 delta <= -m (reject: greater) and H0 delta >= +m (reject: less).
        m = margin / unit.scale
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
    return _with_pp(out, unit)


def _with_pp(out: dict[str, Any], unit: Unit) -> dict[str, Any]:
    """The unit-neutral numbers, repeated under the ``*_pp`` keys of earlier versions for a proportion."""
    if unit.name == PP.name:
        out.update({f"{key}_pp": out[key] for key in ("delta", "ci_low", "ci_high") if key in out})
    return out


def compare_runs(
    runs: Iterable[RunRecord],
    reference: str = "full",
    margins: Sequence[float] = (1.0, 2.0, 3.0),
    alpha: float = 0.05,
    confidence: float = 0.95,
    metric: str = "accuracy",
    unit: str | None = None,
) -> list[ComparisonRow]:
    """One row per (model, task, condition), sorted, with paired statistics against ``reference``; differences
    and ``margins`` in the unit of ``metric`` (see :func:`metric_info`)."""
    info = metric_info(metric, unit)
    if not 0 < alpha < 1:
        raise ValueError(f"--alpha must be in (0, 1), got {alpha}")
    if not 0 < confidence < 1:
        raise ValueError(f"--confidence must be in (0, 1), got {confidence}")
    groups: dict[tuple[str, str, str], dict[int, float]] = {}
    unconverged: dict[tuple[str, str, str], list[int]] = {}
    for run in runs:
        groups.setdefault((run.model, run.task, run.condition), {})[run.seed] = run.value
        if run.converged is False:
            unconverged.setdefault((run.model, run.task, run.condition), []).append(run.seed)
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
            metric=metric,
            unit=info.unit.name,
            unconverged_seeds=sorted(unconverged.get((model, task, condition), [])),
        )
        ref = groups.get((model, task, reference))
        if condition != reference and ref is not None:
            common = sorted(set(by_seed) & set(ref))
            row.n_paired = len(common)
            row.unpaired_seeds = sorted(set(by_seed) ^ set(ref))
            if common:
                diff_N = np.array([by_seed[s] - ref[s] for s in common], dtype=np.float64)
                for key, value in _paired(diff_N, margins, alpha, confidence, info.unit).items():
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
    unit: str | None = None,
) -> tuple[list[ComparisonRow], int]:
    """:func:`compare_runs` over a results CSV; also returns how many rows had no metric."""
    info = metric_info(metric, unit)
    runs, skipped = read_runs(path, metric, unit)
    rows = compare_runs(runs, reference, parse_margins(margins, info.unit), alpha, confidence, metric, unit)
    return rows, skipped


def convergence_warning(rows: Sequence[ComparisonRow]) -> str | None:
    """One line naming the compared conditions that hold runs recorded as not converged (None if there are
    none): their differences may measure how fast a condition learns rather than where it ends up."""
    flagged = [r for r in rows if r.unconverged_seeds]
    if not flagged:
        return None
    several = len({(r.model, r.task) for r in rows}) > 1

    def name(r: ComparisonRow) -> str:
        seeds = ", ".join(str(s) for s in r.unconverged_seeds)
        label = f"{r.model}/{r.task}/{r.condition}" if several else r.condition
        return (
            f"{label} ({len(r.unconverged_seeds)} of {r.n}: seed{'s' if len(r.unconverged_seeds) > 1 else ''} {seeds})"
        )

    total = sum(len(r.unconverged_seeds) for r in flagged)
    return (
        f"{total} run(s) in {len(flagged)} condition(s) did not converge (converged=False): "
        + "; ".join(name(r) for r in flagged)
        + ". Their differences may measure learning speed rather than what the adapters reach."
    )
