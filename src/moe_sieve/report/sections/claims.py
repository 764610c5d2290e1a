"""The paper's claims with a verdict each, and the forest plot of the differences."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

from ...seed_stats import ComparisonRow
from .. import figures
from ..blocks import Figure, Section, Table
from ..data import StudyData
from .context import ResultsContext


def _budget(data: StudyData, k: str) -> tuple[int | None, str]:
    """The report's budget ``--k`` in experts per layer, and how it was found (or why it could not be)."""
    from ...routing_stats import resolve_k

    experts = data.num_experts
    if experts is not None:
        count = resolve_k(k, experts)
        return count, f"k = {count} ({k} of {experts} routed experts per layer)"
    text = str(k).strip()
    if text.isdigit():
        return int(text), f"k = {text}"
    return None, (
        f"--k {k} cannot be turned into experts per layer: no run's selection.json, profile or numeric k of a full "
        "run gives the expert count"
    )


def claims_section(ctx: ResultsContext, k: str) -> Section | None:
    """The paper's claims with a verdict each (report/claims.py has the rules)."""
    from ..claims import HELD, NOT_HELD, Condition, judge_claims

    conditions: dict[tuple[str, str], dict[str, Condition]] = defaultdict(dict)
    counts = Counter((r.model, r.task, r.condition) for r in ctx.records)
    flagged = Counter((r.model, r.task, r.condition) for r in ctx.records if r.converged is False)
    first_run, selections = {}, defaultdict(set)
    for run in ctx.runs:
        key = (run.row["model"], run.row["task"], run.row["condition"])
        first_run.setdefault(key, run)
        layers = (run.selection or {}).get("layers")
        selections[key].add(None if layers is None else json.dumps(layers, sort_keys=True))
    for key, run in first_run.items():
        trained = frozenset() if None in selections[key] else frozenset(selections[key])  # unknown: not compared
        conditions[key[:2]][key[2]] = Condition(key[2], run.strategy, run.k, counts[key], flagged[key], trained)
    budget, budget_note = _budget(ctx.data, k)
    claims = judge_claims(
        ctx.records, dict(conditions), ctx.info, ctx.ref or "", ctx.margins, ctx.alpha, budget, budget_note
    )
    if not claims:
        return None
    section = Section(
        "claims",
        "The paper's claims, as measured here",
        f"Each claim judged on this study's {ctx.info.name} ({'higher' if ctx.info.higher_is_better else 'lower'} is "
        f"better; differences in {ctx.unit}, paired over seeds, 95% t intervals, α = {ctx.alpha:g}). Conditions are "
        "identified by their strategy and k (config.json / selection.json / results.csv), not their names: full = "
        f"strategy full, hot = top-k at the report's budget ({budget_note}), random and greedy at that budget, the "
        "k sweep = every top-k condition and full at k = all experts, routed = method routed. A missing condition "
        "or fewer than two paired seeds makes a claim not testable here.",
    )
    many = len(conditions) > 1
    rows, classes = [], []
    for c in claims:
        rows.append([*([f"{c.model} · {c.task}"] if many else []), c.claim, c.verdict, c.numbers, c.reason])
        kind = {HELD: "held", NOT_HELD: "not-held"}.get(c.verdict, "untestable")
        classes.append([*([""] if many else []), "", f"verdict {kind}", "", ""])
    headers = [*(["model · task"] if many else []), "claim", "verdict", "numbers", "why"]
    section.blocks.append(Table(headers, rows, cell_classes=classes, css_class="text"))
    return section


def forest_section(ctx: ResultsContext) -> Section | None:
    """Each condition's paired difference from the reference with its CI, over the TOST margins."""
    if ctx.ref is None:
        return None
    section = Section(
        "forest",
        f"Differences from {ctx.ref!r} at a glance",
        f"Paired per-seed difference of each condition's {ctx.info.name} from {ctx.ref!r} in {ctx.unit} with its 95% "
        f"t interval (an open marker: fewer than two paired seeds). Shaded bands with dashed edges: the TOST "
        f"equivalence margins ±{', ±'.join(f'{m:g}' for m in ctx.margins)} {ctx.unit}; a condition is shown "
        f"equivalent at a margin when its 90% interval lies inside it (the TOST columns of the table below). "
        f"{'Higher' if ctx.info.higher_is_better else 'Lower'} is better.",
    )
    groups: dict[tuple[str, str], list[ComparisonRow]] = defaultdict(list)
    for r in ctx.compared:
        if r.condition != r.reference and r.delta is not None:
            groups[(r.model, r.task)].append(r)
    for (model, task), rows in sorted(groups.items()):
        section.blocks.append(
            Figure(
                f"forest_{model}_{task}",
                figures.forest_plot(
                    [ctx.condition_cell(r) + f" (n={r.n_paired})" for r in rows],
                    [r.delta for r in rows],
                    [r.ci_low for r in rows],
                    [r.ci_high for r in rows],
                    ctx.margins,
                    ctx.unit,
                    ctx.ref,
                    f"{model} · {task} · {ctx.info.name}",
                ),
                f"Paired differences from {ctx.ref} — {model} · {task}",
            )
        )
    return section if section.blocks else None
