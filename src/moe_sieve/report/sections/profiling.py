"""Routing profile sections: imbalance tables (Table 2), heatmaps, CV by depth, coverage, Jaccard, stability."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from .. import figures
from ..blocks import Figure, Section, Table, fmt, pct
from ..data import StudyData


def _by_model(stats: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in stats["datasets"]:
        groups[row["model"]].append(row)
    return groups


def _summary_section(stats: dict[str, Any]) -> Section:
    """Table 2: the imbalance statistics per model, then per dataset."""
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
                    fmt(m["global_cv"]),
                    fmt(m["layer_cv"]),
                    fmt(m["ratio"], ".1f") + ("×" if m["ratio"] is not None else ""),
                    "–" if not m["ratio_range"] else f"{m['ratio_range'][0]:.1f}–{m['ratio_range'][1]:.1f}×",
                    pct(m["cold_fraction"]),
                    pct(m["coverage"]),
                    pct(m["coverage_with_shared"]),
                    fmt(m["count_mass_jaccard"]),
                    fmt(m["subsample_stability"]),
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
                    fmt(r["global_cv"]),
                    fmt(r["mean_layer_cv"]),
                    fmt(r["ratio"], ".2f"),
                    pct(r["mean_cold_fraction"]),
                    pct(r["mean_coverage"]),
                    fmt(r["mean_entropy"]),
                    fmt(r["mean_count_mass_jaccard"]),
                ]
                for r in stats["datasets"]
            ],
            "Per dataset.",
        )
    )
    return summary


def profiling_sections(data: StudyData) -> list[Section]:
    """Table 2, then the figure sections (heatmaps, CV by depth, coverage, Jaccard, stability), one figure per model."""
    stats, profiles = data.profile_stats, data.profiles
    if not stats or not profiles:
        return []
    sections = [_summary_section(stats)]
    many_models = len(stats["models"]) > 1

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
    from ...routing_stats import coverage_curve, coverage_with_shared

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
                            fmt(r["subsample_stability"]["mean_jaccard"]),
                            fmt(r["subsample_stability"]["std_jaccard"]),
                        ]
                        for r in stab_rows
                    ],
                )
            )
    sections += [s for s in (heat, depth, cover, jac, stab) if s.blocks]
    return sections
