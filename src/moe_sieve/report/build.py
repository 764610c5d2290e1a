"""The report's sections, each built only from data that exists (a missing input drops its section)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..runstats import ComparisonRow, MetricInfo, RunRecord, compare_runs, metric_info, read_runs, unit_note
from . import figures
from .data import RunInfo, StudyData, _float


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    cell_classes: list[list[str]] | None = None  # an HTML class per cell (e.g. the claims' verdict colours)
    css_class: str = ""  # an HTML class of the table ("text": every column left-aligned)


@dataclass
class Figure:
    name: str
    png: bytes
    caption: str


@dataclass
class Section:
    key: str
    title: str
    intro: str
    blocks: list[Table | Figure | str] = field(default_factory=list)


def _f(value: Any, fmt: str = ".3f", none: str = "–") -> str:
    return none if value is None else format(value, fmt)


def _pct(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _seconds(s: float | None) -> str:
    if s is None:
        return "–"
    if s >= 3600:
        return f"{int(s // 3600)}h {int(s % 3600 // 60)}m"
    if s >= 60:
        return f"{int(s // 60)}m {int(s % 60)}s"
    return f"{s:.1f} s"


def _by_model(stats: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in stats["datasets"]:
        groups[row["model"]].append(row)
    return groups


# --- profiling study ----------------------------------------------------------------------------------------


def profiling_sections(data: StudyData) -> list[Section]:
    stats, profiles = data.profile_stats, data.profiles
    if not stats or not profiles:
        return []
    sections = []
    many_models = len(stats["models"]) > 1

    summary = Section(
        "table2",
        "Routing imbalance per model (Table 2)",
        "Means over the profiled datasets. Layer CV is the coefficient of variation of expert counts within a "
        "layer, global CV that of the per-expert totals over all layers; cold experts get less than half the "
        "uniform share of their layer; coverage is the share of a layer's activations that its top-k receive.",
    )
    summary.blocks.append(
        Table(
            [
                "model",
                "datasets",
                "layers × experts",
                "k",
                "global CV",
                "layer CV",
                "ratio",
                "ratio range",
                "cold %",
                f"cov@{stats['k_requested']}",
                "cov + shared",
                "count/mass J",
                "stability J",
            ],
            [
                [
                    m["model"],
                    str(len(m["datasets"])),
                    f"{m['num_layers']} × {m['num_experts']}",
                    str(m["k"]),
                    _f(m["global_cv"]),
                    _f(m["layer_cv"]),
                    _f(m["ratio"], ".1f") + ("×" if m["ratio"] is not None else ""),
                    "–" if not m["ratio_range"] else f"{m['ratio_range'][0]:.1f}–{m['ratio_range'][1]:.1f}×",
                    _pct(m["cold_fraction"]),
                    _pct(m["coverage"]),
                    _pct(m["coverage_with_shared"]),
                    _f(m["count_mass_jaccard"]),
                    _f(m["subsample_stability"]),
                ]
                for m in stats["models"]
            ],
        )
    )
    summary.blocks.append(
        Table(
            [
                "model",
                "dataset",
                "examples",
                "tokens",
                "global CV",
                "layer CV",
                "ratio",
                "cold %",
                "coverage",
                "norm. entropy",
                "count/mass J",
            ],
            [
                [
                    r["model"],
                    r["name"],
                    f"{r['examples']:,}",
                    f"{r['tokens']:,}",
                    _f(r["global_cv"]),
                    _f(r["mean_layer_cv"]),
                    _f(r["ratio"], ".2f"),
                    _pct(r["mean_cold_fraction"]),
                    _pct(r["mean_coverage"]),
                    _f(r["mean_entropy"]),
                    _f(r["mean_count_mass_jaccard"]),
                ]
                for r in stats["datasets"]
            ],
            "Per dataset.",
        )
    )
    sections.append(summary)

    heat = Section(
        "heatmaps",
        "Routing heatmaps per layer (App. A.2)",
        "Each cell is one expert's share of its layer's routed tokens relative to the uniform share "
        "(1 = uniform, dark = cold, bright = hot).",
    )
    depth = Section(
        "cv_depth",
        "Layer CV by depth (Fig. 1)",
        "Solid: CV of expert counts within each layer. Dashed: the dataset's global CV (per-expert totals over "
        "all layers), which the load-balancing loss keeps low while single layers stay skewed.",
    )
    cover = Section(
        "coverage",
        "Coverage curves (Fig. 2)",
        "Share of each layer's routed activations captured by its top experts (mean over layers) as the "
        "per-layer budget grows; dashed curves count always-on shared experts per token, where the model has "
        "them.",
    )
    jac = Section(
        "jaccard",
        "Top-k overlap across datasets (Fig. 3)",
        "Mean per-layer Jaccard index between the top-k expert sets selected on each pair of datasets: "
        "high within a domain, low across domains when routing is task-specific.",
    )
    stab = Section(
        "stability",
        "Subsample stability (§3.3, App. A.3)",
        "Mean Jaccard between the top-k of a random subsample of each calibration set and the top-k of the "
        "whole set, over seeded trials (error bar: std over trials).",
    )
    from ..stats import coverage_curve, coverage_with_shared

    for model, rows in _by_model(stats).items():
        suffix = f" — {model}" if many_models else ""
        names = [r["name"] for r in rows]
        layer_ids = [layer["layer"] for layer in rows[0]["layers"]]
        counts = [np.asarray(profiles[n].counts_LE, dtype=float) for n in names]
        heat.blocks.append(
            Figure(f"heatmaps_{model}", figures.routing_heatmaps(names, counts, layer_ids), f"Expert load{suffix}")
        )
        depth.blocks.append(
            Figure(
                f"cv_depth_{model}",
                figures.cv_by_depth(
                    names,
                    [[layer["cv"] for layer in r["layers"]] for r in rows],
                    [r["global_cv"] for r in rows],
                    layer_ids,
                ),
                f"Layer CV by depth{suffix}",
            )
        )
        curves = [coverage_curve(c) for c in counts]
        shared = [
            None
            if not r["shared_expert_equivalents"]
            else coverage_with_shared(curve, r["shared_expert_equivalents"], r["top_k"])
            for r, curve in zip(rows, curves, strict=True)
        ]
        cover.blocks.append(
            Figure(
                f"coverage_{model}",
                figures.coverage_curves(names, curves, shared, rows[0]["k"]),
                f"Coverage against budget{suffix}",
            )
        )
        block = next(b for b in stats["jaccard"] if b["model"] == model)
        if len(block["names"]) > 1:
            jac.blocks.append(
                Figure(
                    f"jaccard_{model}",
                    figures.jaccard_heatmap(block["names"], np.asarray(block["matrix"]), f"top-{block['k']}{suffix}"),
                    f"Cross-dataset Jaccard{suffix}",
                )
            )
        stab_rows = [r for r in rows if "subsample_stability" in r]
        if stab_rows:
            s0 = stab_rows[0]["subsample_stability"]
            stab.blocks.append(
                Figure(
                    f"stability_{model}",
                    figures.stability_bars(
                        [r["name"] for r in stab_rows],
                        [r["subsample_stability"]["mean_jaccard"] for r in stab_rows],
                        [r["subsample_stability"]["std_jaccard"] for r in stab_rows],
                        f"{s0['fraction']:.0%} subsamples, {s0['trials']} trials{suffix}",
                    ),
                    f"Subsample stability{suffix}",
                )
            )
            stab.blocks.append(
                Table(
                    ["model", "dataset", "examples", "subsample size", "mean J", "std J"],
                    [
                        [
                            r["model"],
                            r["name"],
                            str(r["examples"]),
                            str(r["subsample_stability"]["sample_size"]),
                            _f(r["subsample_stability"]["mean_jaccard"]),
                            _f(r["subsample_stability"]["std_jaccard"]),
                        ]
                        for r in stab_rows
                    ],
                )
            )
    sections += [s for s in (heat, depth, cover, jac, stab) if s.blocks]
    return sections


def allocation_section(data: StudyData) -> Section | None:
    """Table 9: per-layer budgets of uniform top-k and greedy allocation with the coverage each reaches."""
    from ..profiling import Profile
    from ..selection import make_selection, select_topk, selection_coverage

    source = None
    for run in data.runs:
        if run.strategy == "greedy" and run.selection and run.run_dir and (run.run_dir / "profile").is_dir():
            from ..selection import Selection

            greedy = Selection.load(run.run_dir / "selection.json")
            prof = Profile.load(run.run_dir / "profile")
            source = (f"the selection of greedy run {run.row.get('run_id')}", prof, greedy)
            break
    if source is None and data.profiles:
        name, prof = next(iter(data.profiles.items()))
        k = data.profile_stats["datasets"][0]["k"] if data.profile_stats else None
        greedy = make_selection(prof.counts_LE, strategy="greedy", k=k, layer_ids=prof.layer_ids, top_k=prof.top_k)
        source = (f"the {name} profile (computed here; no greedy run in the study)", prof, greedy)
    if source is None:
        return None
    label, prof, greedy = source
    k = int(greedy.params.get("k_resolved") or round(greedy.total_slots / len(greedy.experts)))
    uniform = select_topk(prof.counts_LE, k, layer_ids=prof.layer_ids)
    from ..selection import Selection

    uni_sel = Selection(uniform, prof.num_experts, "topk")
    cov_u = selection_coverage(uni_sel, prof.counts_LE, prof.layer_ids)
    cov_g = selection_coverage(greedy, prof.counts_LE, prof.layer_ids)
    rows = [
        [str(layer), str(len(uniform[layer])), _pct(cov_u[layer]), str(len(greedy.experts[layer])), _pct(cov_g[layer])]
        for layer in prof.layer_ids
    ]
    rows.append(
        [
            "mean",
            f"{np.mean([len(v) for v in uniform.values()]):.1f}",
            _pct(np.mean(list(cov_u.values()))),
            f"{np.mean([len(v) for v in greedy.experts.values()]):.1f}",
            _pct(np.mean(list(cov_g.values()))),
        ]
    )
    section = Section(
        "allocation",
        "Greedy vs uniform allocation per layer (Table 9)",
        f"Same total of {greedy.total_slots} expert-layer slots; greedy gives each slot to the layer whose next "
        f"expert adds the most coverage. From {label}.",
    )
    section.blocks.append(
        Figure(
            "allocation",
            figures.allocation_bars(
                prof.layer_ids,
                [len(uniform[i]) for i in prof.layer_ids],
                [len(greedy.experts[i]) for i in prof.layer_ids],
                f"k = {k} per layer on average",
            ),
            "Experts per layer",
        )
    )
    section.blocks.append(Table(["layer", "uniform k", "uniform cov", "greedy k", "greedy cov"], rows))
    return section


# --- fine-tuning results ------------------------------------------------------------------------------------

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
                _f(r.ttest_p),
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

    claims = _claims_section(ctx, k)
    if claims:
        sections.append(claims)
    forest = _forest_section(ctx)
    if forest:
        sections.append(forest)

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
                    _f(cond_info.get(r.condition, (None, None))[1], "d"),
                    ctx.n_cell(r),
                    _f(r.mean, ".4f"),
                    _f(r.std, ".4f"),
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
                        _f(by_key[(r.model, r.task, ref)].std, ".4f"),
                        _f(r.std, ".4f"),
                        _f(r.std_ratio, ".2f"),
                    ]
                    for r in ratio_rows
                ],
            )
        )
        sections.append(std_sec)

    curves = _curves_section(data)
    if curves:
        sections.append(curves)
    cost = _cost_section(data, ref)
    if cost:
        sections.append(cost)
    sweep = _sweep_section(ctx)
    if sweep:
        sections.append(sweep)
    controls = _controls_section(ctx)
    if controls:
        sections.append(controls)
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
                _f(_float(c.get("rel_drop")), ".4f"),
                _f(_float(c.get("threshold")), ".4f"),
                _f(c.get("window"), "d") if isinstance(c.get("window"), int) else "–",
            ]
        )
    return Table(
        ["run", "condition", "seed", "rel. drop at end", "threshold", "window"],
        rows,
        f"{NOT_CONVERGED} Runs recorded as not converged: the smoothed training loss still fell by more than the "
        "threshold over the last window of logged steps (metrics.json convergence). They are marked "
        f"{NOT_CONVERGED} wherever they enter a table.",
    )


def _budget(data: StudyData, k: str) -> tuple[int | None, str]:
    """The report's budget ``--k`` in experts per layer, and how it was found (or why it could not be)."""
    from ..stats import resolve_k

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


def _claims_section(ctx: ResultsContext, k: str) -> Section | None:
    """The paper's claims with a verdict each (report/claims.py has the rules)."""
    from .claims import HELD, NOT_HELD, Condition, judge_claims

    conditions: dict[tuple[str, str], dict[str, Condition]] = defaultdict(dict)
    counts = Counter((r.model, r.task, r.condition) for r in ctx.records)
    flagged = Counter((r.model, r.task, r.condition) for r in ctx.records if r.converged is False)
    for run in ctx.runs:
        key = (run.row["model"], run.row["task"], run.row["condition"])
        if key[2] not in conditions[key[:2]]:
            conditions[key[:2]][key[2]] = Condition(key[2], run.strategy, run.k, counts[key], flagged[key])
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
        "k sweep = every top-k condition, routed = method routed. A missing condition or fewer than two paired "
        "seeds makes a claim not testable here.",
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


def _forest_section(ctx: ResultsContext) -> Section | None:
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


def _curves_section(data: StudyData) -> Section | None:
    """Per-condition training loss over steps: mean and min-max band over seeds."""
    groups: dict[tuple[str, str], dict[str, list[tuple[list[int], list[float]]]]] = defaultdict(dict)
    flagged: set[str] = set()
    missing = []
    for run in data.finished:
        curve = run.loss_curve()
        if curve is None:
            missing.append(run.row.get("run_id", "?"))
            continue
        if run.converged is False:
            flagged.add(run.row["condition"])
        groups[(run.row["model"], run.row["task"])].setdefault(run.row["condition"], []).append(curve)
    if not groups:
        return None
    section = Section(
        "curves",
        "Learning curves",
        "Training loss per condition against the optimizer step: mean over seeds at the steps every seed logged, "
        "with the min-max band over seeds (metrics.json loss_curve; runs without it fall back to their newest "
        f"checkpoint's trainer_state.json, which ends at that checkpoint). {NOT_CONVERGED}: the condition holds runs "
        "that had not converged.",
    )
    for (model, task), curves in sorted(groups.items()):
        labelled = {c + (f" {NOT_CONVERGED}" if c in flagged else ""): v for c, v in sorted(curves.items())}
        section.blocks.append(
            Figure(
                f"curves_{model}_{task}",
                figures.learning_curves(labelled, f"{model} · {task}"),
                f"Training loss, mean and min-max over seeds — {model} · {task}",
            )
        )
    if missing:
        section.blocks.append(
            f"{len(missing)} finished run(s) have no loss curve (no loss_curve in metrics.json and no checkpoint): "
            + ", ".join(missing[:10])
            + (" ..." if len(missing) > 10 else "")
        )
    return section


_COST_COLUMNS = (
    ("trainable_params", "trainable params", lambda v: f"{v / 1e6:.2f}M" if v >= 1e5 else f"{v:,.0f}"),
    ("adapter_bytes", "checkpoint", _bytes),
    ("wall_time_s", "wall time", _seconds),
    ("tokens_per_s", "tokens/s", lambda v: f"{v:,.0f}"),
    ("peak_memory_bytes", "peak memory", _bytes),
)


PARTIAL_TIME = "‡"
_TIMED = ("wall_time_s", "tokens_per_s")  # measured by the last training segment only, in a resumed run


def _cost_section(data: StudyData, ref: str | None) -> Section | None:
    """Table 4: parameters, checkpoint size and time per condition, with the reduction against the reference.

    A resumed run whose metrics.json has no ``segments`` timed only the steps after its resume: it is left out
    of the wall time and tokens/s means, and the cell is marked."""
    groups: dict[tuple[str, str, str], list[RunInfo]] = defaultdict(list)
    for run in data.finished:
        groups[(run.row["model"], run.row["task"], run.row["condition"])].append(run)
    present = [
        c for c in _COST_COLUMNS if any(_float(r.row.get(c[0])) is not None for rs in groups.values() for r in rs)
    ]
    if not present:
        return None

    def mean(runs: list[RunInfo], col: str) -> float | None:
        usable = [r for r in runs if not (col in _TIMED and r.wall_time_partial)]
        values = [v for v in (_float(r.row.get(col)) for r in usable) if v is not None]
        return float(np.mean(values)) if values else None

    headers = ["model", "task", "condition"]
    for col, label, _ in present:
        headers.append(label)
        if ref and col in ("trainable_params", "adapter_bytes", "wall_time_s"):
            headers.append("red.")
    rows, partial = [], []
    for (model, task, condition), rs in sorted(groups.items()):
        row = [model, task, condition]
        base = groups.get((model, task, ref)) if ref else None
        flagged = [r for r in rs if r.wall_time_partial]
        partial += flagged
        base_flagged = bool(base) and any(r.wall_time_partial for r in base)
        for col, _, fmt in present:
            value = mean(rs, col)
            mark = f" {PARTIAL_TIME}" if col in _TIMED and flagged else ""
            row.append(("–" if value is None else fmt(value)) + mark)
            if ref and col in ("trainable_params", "adapter_bytes", "wall_time_s"):
                b = mean(base, col) if base else None
                cell = "–" if value is None or not b or condition == ref else f"{100 * (1 - value / b):.1f}%"
                if col == "wall_time_s" and (flagged or base_flagged) and cell != "–":
                    cell += f" {PARTIAL_TIME}"
                row.append(cell)
        rows.append(row)
    section = Section(
        "cost",
        "Parameters, checkpoint and time (Table 4)",
        "Means over each condition's finished runs"
        + (f"; reductions are relative to {ref!r}." if ref else ".")
        + " Times were measured on whatever machine ran each run.",
    )
    section.blocks.append(Table(headers, rows))
    if partial:
        section.blocks.append(
            f"{PARTIAL_TIME} {len(partial)} resumed run(s) timed only the steps after their resume (metrics.json has "
            "resumed_from but no segments): "
            + ", ".join(
                f"{r.row.get('run_id', '?')} (from {Path(str(r.metrics['resumed_from'])).name})" for r in partial
            )
            + ". They are left out of the wall time and tokens/s means; a condition with no other run shows –."
        )
    return section


def _sweep_section(ctx: ResultsContext) -> Section | None:
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
                        _f(r.mean, ".4f"),
                        _f(r.std, ".4f"),
                        ctx.diff(r.delta),
                        ctx.ci(r),
                    ]
                    for r in rows
                ],
            )
        )
    return section if section.blocks else None


def _controls_section(ctx: ResultsContext) -> Section | None:
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
                        f"{r.mean:.4f} ± {_f(r.std, '.4f')}",
                        f"{base.mean:.4f} ± {_f(base.std, '.4f')}",
                        str(r.n_paired),
                        ctx.diff(r.delta),
                        ctx.ci(r),
                        _f(r.ttest_p),
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

DRIFT_PLOT_MAX_RUNS = 6


def _drift_series(trace: dict[str, np.ndarray]) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """Coverage and Jaccard of a trace, compared like with like: a run that adapts every expert of every layer
    compares its top-k with the step-0 top-k (its recorded Jaccard, top-k vs all experts, is k/E by definition);
    a run that adapts no expert has neither. Returns (coverage_SL, jaccard_SL, note on the Jaccard)."""
    selected_LE = trace["selected_SLE"][0].astype(bool)
    if not selected_LE.any():
        return None, None, ""
    if selected_LE.all():
        top_SLE = trace["top_SLE"].astype(bool)
        inter_SL = (top_SLE & top_SLE[:1]).sum(-1)
        union_SL = (top_SLE | top_SLE[:1]).sum(-1)
        jaccard_SL = np.where(union_SL > 0, inter_SL / np.maximum(union_SL, 1), 1.0)
        return trace["coverage_SL"], jaccard_SL, "top-k vs step-0 top-k"
    return trace["coverage_SL"], trace["jaccard_SL"], ""


def drift_section(data: StudyData) -> Section | None:
    """Final routing drift per condition (mean over seeds) and the drift plot of each condition's first seed,
    from the runs' ``routing_trace.safetensors`` (runs trained with ``--monitor-every 0`` have none)."""
    from ..training.monitor import TRACE_FILE, load_trace

    traced: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    for run in data.finished:
        if run.run_dir is not None and (run.run_dir / TRACE_FILE).is_file():
            seed = int(_float(run.row.get("seed")) or 0)
            label = " / ".join(v for v in (run.row.get("model"), run.row.get("task"), run.row.get("condition")) if v)
            traced[label].append((seed, run.run_dir))
    if not traced:
        return None
    rows = []
    for label, runs in sorted(traced.items()):
        finals = [load_trace(run_dir) for _, run_dir in runs]
        series = [_drift_series(t) for t in finals]
        first_cov = last_cov = jac = None
        if series[0][0] is not None:
            first_cov = np.mean([cov[0].mean() for cov, _, _ in series])
            last_cov = np.mean([cov[-1].mean() for cov, _, _ in series])
            jac = np.mean([j[-1].mean() for _, j, _ in series])
        kl = np.mean([t["kl_SL"][-1].mean() for t in finals])
        hot = np.mean([t["became_hot_SL"][-1].sum() for t in finals])
        steps = int(max(t["steps_S"][-1] for t in finals))
        note = series[0][2]
        rows.append(
            [
                label,
                str(len(runs)),
                str(steps),
                "–" if first_cov is None else f"{first_cov:.3f} → {last_cov:.3f}",
                _f(jac) + (f" ({note})" if note and jac is not None else ""),
                _f(kl),
                f"{hot:.1f}",
            ]
        )
    section = Section(
        "drift",
        "Routing drift during training",
        "The drift monitor's figures at the last measurement (layer mean, then mean over the seeds): the share of "
        "routed activations on the selected experts (coverage, from step 0), Jaccard between the current top-k and "
        "the selection, KL(now || step 0) of the routing distribution, and experts that entered a layer's top-k "
        "(summed over layers). Compared like with like: a run that adapts every expert (full) shows the Jaccard "
        "of its current top-k with its step-0 top-k (dashed in the figure), since top-k against all experts is "
        "k/E by definition; a run that adapts no expert (attention LoRA only) has no coverage or Jaccard (–).",
    )
    section.blocks.append(Table(["run group", "runs", "last step", "coverage", "Jaccard", "KL", "became hot"], rows))
    shown_groups = sorted(traced.items())[:DRIFT_PLOT_MAX_RUNS]
    one_setting = len({label.rpartition(" / ")[0] for label in traced}) == 1  # one model and task: condition only
    panels = []
    for label, runs in shown_groups:
        trace = load_trace(min(runs)[1])
        coverage, jaccard, note = _drift_series(trace)
        panels.append(
            {
                "label": label.rpartition(" / ")[2] if one_setting else label,
                "steps": trace["steps_S"],
                "coverage_SL": coverage,
                "jaccard_SL": jaccard,
                "jaccard_note": note,
                "kl_SL": trace["kl_SL"],
                "layer_ids": trace["layer_ids_L"],
            }
        )
    shown = "" if len(traced) <= DRIFT_PLOT_MAX_RUNS else f" (the first {DRIFT_PLOT_MAX_RUNS} of {len(traced)})"
    section.blocks.append(
        Figure(
            "routing_drift",
            figures.drift_panels(panels),
            f"Coverage, Jaccard and per-layer KL against step, first seed of each group{shown}",
        )
    )
    return section
