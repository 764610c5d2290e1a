"""The control conditions against their matched routed runs."""

from __future__ import annotations

from collections import defaultdict

from ...seed_stats import compare_runs
from ..blocks import Section, Table, fmt
from .context import ResultsContext


def controls_section(ctx: ResultsContext) -> Section | None:
    """§6.1 random vs hot and §7.3 hot+filler vs hot at the same budget k, paired over seeds."""
    records, cond_info, margins, alpha = ctx.records, ctx.cond_info, ctx.margins, ctx.alpha
    stats = {"metric": ctx.info.name, "unit": ctx.unit}
    hot_at: dict[int, list[str]] = defaultdict(list)
    controls: list[tuple[str, str, int]] = []
    for condition, (strategy, k) in cond_info.items():
        if k is None:
            continue
        if strategy == "topk":
            hot_at[k].append(condition)
        elif strategy in ("random", "hot+filler"):
            controls.append((condition, strategy, k))
    rows = []
    for control, strategy, k in sorted(controls, key=lambda c: (c[2], c[0])):
        for hot in hot_at.get(k, []):
            subset = [r for r in records if r.condition in (hot, control)]
            compared = compare_runs(subset, control, margins, alpha, **stats)
            for r in compared:
                if r.condition != hot or r.n_paired is None:
                    continue
                base = next(x for x in compared if (x.model, x.task, x.condition) == (r.model, r.task, control))
                rows.append(
                    [
                        r.model,
                        r.task,
                        str(k),
                        f"{hot} vs {control}",
                        strategy,
                        f"{r.mean:.4f} ± {fmt(r.std, '.4f')}",
                        f"{base.mean:.4f} ± {fmt(base.std, '.4f')}",
                        str(r.n_paired),
                        ctx.diff(r.delta),
                        ctx.ci(r),
                        fmt(r.ttest_p),
                    ]
                )
    if not rows:
        return None
    section = Section(
        "controls",
        "Routing signal at a matched budget: random vs hot (§6.1), cold fillers (§7.3)",
        "Top-k by routing against a control with the same number of experts per layer: random-k (no routing "
        f"signal) and hot+filler (top experts plus random cold ones). Δ = hot − control in {ctx.unit}, "
        "paired over seeds, with its 95% t interval and paired t-test p.",
    )
    section.blocks.append(
        Table(
            [
                "model",
                "task",
                "k",
                "comparison",
                "control",
                "hot mean ± std",
                "control mean ± std",
                "paired seeds",
                f"Δ ({ctx.unit})",
                f"95% CI ({ctx.unit})",
                "t-test p",
            ],
            rows,
        )
    )
    return section


# --- routing drift during training (issue 13) ---------------------------------------------------------------
