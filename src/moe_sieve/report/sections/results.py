"""The fine-tuning results: runs, the comparison table, variance, then the sections below it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ...seed_stats import compare_runs, metric_info, read_runs, unit_note
from ..blocks import Section, Table, fmt
from ..data import RunInfo, StudyData, as_float
from .claims import claims_section, forest_section
from .context import NOT_CONVERGED, ResultsContext
from .controls import controls_section
from .cost import cost_section
from .curves import curves_section
from .sweep import sweep_section


def _comparison_rows(ctx: ResultsContext) -> list[list[str]]:
    out = []
    for r in ctx.compared:
        if r.condition == r.reference:
            continue
        tost = []
        for m in ctx.margins:
            t = r.tost.get(f"{m:g}")
            tost.append("–" if not t or t["p"] is None else f"{t['p']:.3f}{' ✓' if t['equivalent'] else ''}")
        out.append(
            [
                r.model,
                r.task,
                ctx.condition_cell(r),
                f"{r.n_paired}" + (f" (+{len(r.unpaired_seeds)} unpaired)" if r.unpaired_seeds else "")
                if r.n_paired is not None
                else "–",
                ctx.diff(r.delta),
                ctx.ci(r),
                fmt(r.ttest_p),
                *tost,
            ]
        )
    return out


def _convergence_note(ctx: ResultsContext) -> str | None:
    """The note under a table that marks runs whose training had not converged."""
    flagged = [r for r in ctx.compared if r.unconverged_seeds]
    if not flagged:
        return None
    names = "; ".join(f"{r.condition}: seed(s) {', '.join(map(str, r.unconverged_seeds))}" for r in flagged)
    return (
        f"{NOT_CONVERGED} not converged: {sum(len(r.unconverged_seeds) for r in flagged)} run(s) whose smoothed "
        f"training loss was still falling at the end by more than the convergence threshold (metrics.json "
        f"convergence; results.csv converged=False) — {names}. Differences involving them may measure how fast a "
        "condition learns rather than what it reaches."
    )


def results_sections(
    data: StudyData,
    reference: str,
    margins: Sequence[float],
    alpha: float = 0.05,
    metric: str = "accuracy",
    unit: str | None = None,
    k: str = "25%",
) -> list[Section]:
    if data.results_path is None or not data.runs:
        return []
    sections = []
    status = Counter(r.row.get("status") or "?" for r in data.runs)
    runs = Section(
        "runs",
        "Runs",
        f"{len(data.runs)} runs in {data.results_path.name}: "
        + ", ".join(f"{n} {s}" for s, n in sorted(status.items()))
        + ".",
    )
    failed = [r for r in data.runs if (r.row.get("error") or "").strip()]
    if failed:
        runs.blocks.append(
            Table(
                ["run", "status", "error"],
                [[r.row.get("run_id", "?"), r.row.get("status", "?"), r.row["error"][:200]] for r in failed],
                "Runs that recorded an error.",
            )
        )
    unconverged = [r for r in data.runs if r.converged is False]
    if unconverged:
        runs.blocks.append(_unconverged_table(unconverged))
    sections.append(runs)
    info = metric_info(metric, unit)
    with_metric = data.with_metric(metric)
    if not with_metric and not data.finished:
        return sections
    records, _ = read_runs(data.results_path, metric, unit)  # a missing metric column is an error here
    if not records:
        return sections
    conditions = sorted({r.condition for r in records})
    ref = reference if reference in conditions else None
    compared = compare_runs(records, ref or conditions[0], margins, alpha, metric=metric, unit=unit)
    cond_info: dict[str, tuple[str | None, int | None]] = {}
    for run in with_metric:
        cond_info.setdefault(run.row["condition"], (run.strategy, run.k))
    ctx = ResultsContext(data, info, records, compared, ref, margins, alpha, cond_info, with_metric)
    note = unit_note(info)
    unit_text = {"pp": "percentage points", "nats": "nats"}.get(ctx.unit, "the column's own units")

    sections += [s for s in (claims_section(ctx, k), forest_section(ctx)) if s]

    acc = Section(
        "accuracy",
        f"{metric} per condition (Tables 3, 8)",
        "Mean ± sample std (ddof = 1) over seeds. "
        + (
            f"Δ is the paired per-seed difference to {ref!r} in {unit_text} ({ctx.unit}) with its 95% t interval; "
            f"TOST tests equivalence within ± each margin in {ctx.unit} (paired over seeds, α = {alpha}; "
            "✓ = equivalent); the t-test p is the paired test of Δ = 0."
            if ref
            else f"No {reference!r} condition in the study, so no paired comparison is shown."
        )
        + (f" {note}." if note else ""),
    )
    acc.blocks.append(
        Table(
            ["model", "task", "condition", "strategy", "k", "n", "mean", "std"],
            [
                [
                    r.model,
                    r.task,
                    ctx.condition_cell(r),
                    str(cond_info.get(r.condition, (None,))[0] or "–"),
                    fmt(cond_info.get(r.condition, (None, None))[1], "d"),
                    ctx.n_cell(r),
                    fmt(r.mean, ".4f"),
                    fmt(r.std, ".4f"),
                ]
                for r in compared
            ],
        )
    )
    if ref:
        acc.blocks.append(
            Table(
                [
                    "model",
                    "task",
                    "condition",
                    "paired seeds",
                    f"Δ ({ctx.unit})",
                    f"95% CI ({ctx.unit})",
                    "t-test p",
                    *[f"TOST {m:g} {ctx.unit}" for m in margins],
                ],
                _comparison_rows(ctx),
                f"Paired against {ref!r}.",
            )
        )
    convergence = _convergence_note(ctx)
    if convergence:
        acc.blocks.append(convergence)
    sections.append(acc)

    ratio_rows = [r for r in compared if r.std_ratio is not None]
    if ref and ratio_rows:
        by_key = {(r.model, r.task, r.condition): r for r in compared}
        std_sec = Section(
            "std_ratio",
            "Seed-to-seed spread (Table 6)",
            f"Sample std of each condition over its seeds and its ratio to the std of {ref!r} (below 1: more stable).",
        )
        std_sec.blocks.append(
            Table(
                ["model", "task", "condition", f"std {ref}", "std", "ratio"],
                [
                    [
                        r.model,
                        r.task,
                        ctx.condition_cell(r),
                        fmt(by_key[(r.model, r.task, ref)].std, ".4f"),
                        fmt(r.std, ".4f"),
                        fmt(r.std_ratio, ".2f"),
                    ]
                    for r in ratio_rows
                ],
            )
        )
        sections.append(std_sec)

    # each below is None when the study has nothing for it
    sections += [
        s for s in (curves_section(data), cost_section(data, ref), sweep_section(ctx), controls_section(ctx)) if s
    ]
    return sections


def _unconverged_table(runs: list[RunInfo]) -> Table:
    rows = []
    for r in runs:
        c = (r.metrics or {}).get("convergence") or {}
        rows.append(
            [
                r.row.get("run_id", "?"),
                r.row.get("condition", "?"),
                str(r.row.get("seed", "?")),
                fmt(as_float(c.get("rel_drop")), ".4f"),
                fmt(as_float(c.get("threshold")), ".4f"),
                fmt(c.get("window"), "d") if isinstance(c.get("window"), int) else "–",
            ]
        )
    return Table(
        ["run", "condition", "seed", "rel. drop at end", "threshold", "window"],
        rows,
        f"{NOT_CONVERGED} Runs recorded as not converged: the smoothed training loss still fell by more than the "
        "threshold over the last window of logged steps (metrics.json convergence). They are marked "
        f"{NOT_CONVERGED} wherever they enter a table.",
    )
