"""The report's sections, each built only from data that exists (a missing input drops its section)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..runstats import ComparisonRow, compare_runs, read_runs
from . import figures
from .data import StudyData, _float


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


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


def _comparison_rows(rows: Sequence[ComparisonRow], margins: Sequence[float]) -> list[list[str]]:
    out = []
    for r in rows:
        if r.condition == r.reference:
            continue
        ci = "–" if r.ci_low_pp is None else f"[{r.ci_low_pp:+.2f}, {r.ci_high_pp:+.2f}]"
        tost = []
        for m in margins:
            t = r.tost.get(f"{m:g}")
            tost.append("–" if not t or t["p"] is None else f"{t['p']:.3f}{' ✓' if t['equivalent'] else ''}")
        out.append(
            [
                r.model,
                r.task,
                r.condition,
                f"{r.n_paired}" + (f" (+{len(r.unpaired_seeds)} unpaired)" if r.unpaired_seeds else "")
                if r.n_paired is not None
                else "–",
                _f(r.delta_pp, "+.2f"),
                ci,
                _f(r.ttest_p),
                *tost,
            ]
        )
    return out


def results_sections(data: StudyData, reference: str, margins: Sequence[float], alpha: float = 0.05) -> list[Section]:
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
    sections.append(runs)
    if not data.finished:
        return sections

    records, _ = read_runs(data.results_path, "accuracy")
    conditions = sorted({r.condition for r in records})
    ref = reference if reference in conditions else None
    compared = compare_runs(records, ref or conditions[0], margins, alpha)
    cond_info: dict[str, tuple[str | None, int | None]] = {}
    for run in data.finished:
        cond_info.setdefault(run.row["condition"], (run.strategy, run.k))

    acc = Section(
        "accuracy",
        "Accuracy per condition (Tables 3, 8)",
        "Mean ± sample std (ddof = 1) over seeds. "
        + (
            f"Δ is the paired per-seed difference to {ref!r} in percentage points with its 95% t interval; "
            f"TOST tests equivalence within ± each margin (paired over seeds, α = {alpha}; ✓ = equivalent); "
            "the t-test p is the paired test of Δ = 0."
            if ref
            else f"No {reference!r} condition in the study, so no paired comparison is shown."
        ),
    )
    acc.blocks.append(
        Table(
            ["model", "task", "condition", "strategy", "k", "n", "mean", "std"],
            [
                [
                    r.model,
                    r.task,
                    r.condition,
                    str(cond_info.get(r.condition, (None,))[0] or "–"),
                    _f(cond_info.get(r.condition, (None, None))[1], "d"),
                    str(r.n),
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
                    "Δ (pp)",
                    "95% CI (pp)",
                    "t-test p",
                    *[f"TOST {m:g} pp" for m in margins],
                ],
                _comparison_rows(compared, margins),
                f"Paired against {ref!r}.",
            )
        )
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
                        r.condition,
                        _f(by_key[(r.model, r.task, ref)].std, ".4f"),
                        _f(r.std, ".4f"),
                        _f(r.std_ratio, ".2f"),
                    ]
                    for r in ratio_rows
                ],
            )
        )
        sections.append(std_sec)

    cost = _cost_section(data, ref)
    if cost:
        sections.append(cost)
    sweep = _sweep_section(data, compared, cond_info, ref)
    if sweep:
        sections.append(sweep)
    controls = _controls_section(records, cond_info, margins, alpha)
    if controls:
        sections.append(controls)
    return sections


_COST_COLUMNS = (
    ("trainable_params", "trainable params", lambda v: f"{v / 1e6:.2f}M" if v >= 1e5 else f"{v:,.0f}"),
    ("adapter_bytes", "checkpoint", _bytes),
    ("wall_time_s", "wall time", _seconds),
    ("tokens_per_s", "tokens/s", lambda v: f"{v:,.0f}"),
    ("peak_memory_bytes", "peak memory", _bytes),
)


def _cost_section(data: StudyData, ref: str | None) -> Section | None:
    """Table 4: parameters, checkpoint size and time per condition, with the reduction against the reference."""
    from .data import _float

    groups: dict[tuple[str, str, str], list[dict[str, str]]] = defaultdict(list)
    for run in data.finished:
        groups[(run.row["model"], run.row["task"], run.row["condition"])].append(run.row)
    present = [c for c in _COST_COLUMNS if any(_float(r.get(c[0])) is not None for rs in groups.values() for r in rs)]
    if not present:
        return None

    def mean(rows: list[dict[str, str]], col: str) -> float | None:
        values = [v for v in (_float(r.get(col)) for r in rows) if v is not None]
        return float(np.mean(values)) if values else None

    headers = ["model", "task", "condition"]
    for col, label, _ in present:
        headers.append(label)
        if ref and col in ("trainable_params", "adapter_bytes", "wall_time_s"):
            headers.append("red.")
    rows = []
    for (model, task, condition), rs in sorted(groups.items()):
        row = [model, task, condition]
        base = groups.get((model, task, ref)) if ref else None
        for col, _, fmt in present:
            value = mean(rs, col)
            row.append("–" if value is None else fmt(value))
            if ref and col in ("trainable_params", "adapter_bytes", "wall_time_s"):
                b = mean(base, col) if base else None
                row.append("–" if value is None or not b or condition == ref else f"{100 * (1 - value / b):.1f}%")
        rows.append(row)
    section = Section(
        "cost",
        "Parameters, checkpoint and time (Table 4)",
        "Means over each condition's finished runs"
        + (f"; reductions are relative to {ref!r}." if ref else ".")
        + " Times were measured on whatever machine ran each run.",
    )
    section.blocks.append(Table(headers, rows))
    return section


def _sweep_section(data, compared, cond_info, ref) -> Section | None:
    """Fig. 4: hot-k accuracy and seed std against k, per model and task with at least two budgets."""
    section = Section(
        "budget",
        "Budget sweep (Fig. 4)",
        "Uniform top-k conditions at several per-layer budgets k: mean accuracy ± seed std (left) and the seed "
        "std itself (right)" + (f"; dashed: {ref!r}." if ref else "."),
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
                ),
                f"Budget sweep — {model} · {task}",
            )
        )
        section.blocks.append(
            Table(
                ["k", "condition", "n", "mean", "std", "Δ vs ref (pp)", "95% CI (pp)"],
                [
                    [
                        str(cond_info[r.condition][1]),
                        r.condition,
                        str(r.n),
                        _f(r.mean, ".4f"),
                        _f(r.std, ".4f"),
                        _f(r.delta_pp, "+.2f"),
                        "–" if r.ci_low_pp is None else f"[{r.ci_low_pp:+.2f}, {r.ci_high_pp:+.2f}]",
                    ]
                    for r in rows
                ],
            )
        )
    return section if section.blocks else None


def _controls_section(records, cond_info, margins, alpha) -> Section | None:
    """§6.1 random vs hot and §7.3 hot+filler vs hot at the same budget k, paired over seeds."""
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
            for r in compare_runs(subset, control, margins, alpha):
                if r.condition != hot or r.n_paired is None:
                    continue
                ci = "–" if r.ci_low_pp is None else f"[{r.ci_low_pp:+.2f}, {r.ci_high_pp:+.2f}]"
                base = next(
                    x
                    for x in compare_runs(subset, control, margins, alpha)
                    if (x.model, x.task, x.condition) == (r.model, r.task, control)
                )
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
                        _f(r.delta_pp, "+.2f"),
                        ci,
                        _f(r.ttest_p),
                    ]
                )
    if not rows:
        return None
    section = Section(
        "controls",
        "Routing signal at a matched budget: random vs hot (§6.1), cold fillers (§7.3)",
        "Top-k by routing against a control with the same number of experts per layer: random-k (no routing "
        "signal) and hot+filler (top experts plus random cold ones). Δ = hot − control in percentage points, "
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
                "Δ (pp)",
                "95% CI (pp)",
                "t-test p",
            ],
            rows,
        )
    )
    return section


# --- routing drift during training (issue 13) ---------------------------------------------------------------

DRIFT_PLOT_MAX_RUNS = 6


def drift_section(data: StudyData) -> Section | None:
    """Final routing drift per condition (mean over seeds) and the drift plot of each condition's first seed,
    from the runs' ``routing_trace.safetensors`` (runs trained with ``--monitor-every 0`` have none)."""
    import tempfile
    from pathlib import Path

    from ..training.monitor import TRACE_FILE, load_trace, plot_drift

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
        last = {name: np.mean([t[name][-1].mean() for t in finals]) for name in ("coverage_SL", "jaccard_SL", "kl_SL")}
        first_cov = np.mean([t["coverage_SL"][0].mean() for t in finals])
        hot = np.mean([t["became_hot_SL"][-1].sum() for t in finals])
        steps = int(max(t["steps_S"][-1] for t in finals))
        rows.append(
            [
                label,
                str(len(runs)),
                str(steps),
                f"{first_cov:.3f} → {last['coverage_SL']:.3f}",
                _f(last["jaccard_SL"]),
                _f(last["kl_SL"]),
                f"{hot:.1f}",
            ]
        )
    section = Section(
        "drift",
        "Routing drift during training",
        "The drift monitor's figures at the last measurement (layer mean, then mean over the seeds): the share of "
        "routed activations on the selected experts (coverage, from step 0), Jaccard between the current top-k and "
        "the selection, KL(now || step 0) of the routing distribution, and experts that entered a layer's top-k "
        "(summed over layers). Without adapted experts coverage and Jaccard are 0; with all experts adapted coverage "
        "is 1 and Jaccard k/E, by definition.",
    )
    section.blocks.append(Table(["run group", "runs", "last step", "coverage", "Jaccard", "KL", "became hot"], rows))
    first = {label: min(runs)[1] for label, runs in sorted(traced.items())[:DRIFT_PLOT_MAX_RUNS]}
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(plot_drift(first, Path(tmp) / "drift.png")).read_bytes()
    shown = "" if len(traced) <= DRIFT_PLOT_MAX_RUNS else f" (the first {DRIFT_PLOT_MAX_RUNS} of {len(traced)})"
    section.blocks.append(
        Figure(
            "routing_drift", png, f"Coverage, Jaccard and per-layer KL against step, first seed of each group{shown}"
        )
    )
    return section
