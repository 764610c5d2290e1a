"""The budget sweep: the metric against k per strategy."""

from __future__ import annotations

from collections import defaultdict

from ...seed_stats import ComparisonRow
from .. import figures
from ..blocks import Figure, Section, Table, fmt
from .context import ResultsContext


def sweep_section(ctx: ResultsContext) -> Section | None:
    """Fig. 4: hot-k metric and seed std against k, per model and task with at least two budgets."""
    data, compared, cond_info, ref = ctx.data, ctx.compared, ctx.cond_info, ctx.ref
    section = Section(
        "budget",
        "Budget sweep (Fig. 4)",
        f"Uniform top-k conditions at several per-layer budgets k: mean {ctx.info.name} ± seed std (left) and the "
        "seed std itself (right)" + (f"; dashed: {ref!r}." if ref else "."),
    )
    by_task: dict[tuple[str, str], list[ComparisonRow]] = defaultdict(list)
    for r in compared:
        strategy, k = cond_info.get(r.condition, (None, None))
        if strategy == "topk" and k is not None:
            by_task[(r.model, r.task)].append(r)
    num_experts = None
    for run in data.finished:
        if run.selection:
            num_experts = run.selection.get("num_experts")
            break
    for (model, task), rows in sorted(by_task.items()):
        ks = sorted({cond_info[r.condition][1] for r in rows})
        if len(ks) < 2:
            continue
        rows = sorted(rows, key=lambda r: cond_info[r.condition][1])
        if len({cond_info[r.condition][1] for r in rows}) != len(rows):
            continue  # two top-k conditions at one k (e.g. count vs mass ranking): not one sweep
        reference = None
        base = next((r for r in compared if (r.model, r.task, r.condition) == (model, task, ref)), None)
        if base is not None:
            reference = (ref, base.mean, base.std or 0.0)
        section.blocks.append(
            Figure(
                f"sweep_{model}_{task}",
                figures.budget_sweep(
                    [cond_info[r.condition][1] for r in rows],
                    [r.mean for r in rows],
                    [r.std or 0.0 for r in rows],
                    [r.n for r in rows],
                    reference,
                    num_experts,
                    f"{model} · {task}",
                    ctx.info.name,
                ),
                f"Budget sweep — {model} · {task}",
            )
        )
        section.blocks.append(
            Table(
                ["k", "condition", "n", "mean", "std", f"Δ vs ref ({ctx.unit})", f"95% CI ({ctx.unit})"],
                [
                    [
                        str(cond_info[r.condition][1]),
                        ctx.condition_cell(r),
                        ctx.n_cell(r),
                        fmt(r.mean, ".4f"),
                        fmt(r.std, ".4f"),
                        ctx.diff(r.delta),
                        ctx.ci(r),
                    ]
                    for r in rows
                ],
            )
        )
    return section if section.blocks else None
