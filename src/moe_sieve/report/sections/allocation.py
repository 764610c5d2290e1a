"""Per-layer budgets of uniform top-k against greedy allocation (Table 9)."""

from __future__ import annotations

import numpy as np

from .. import figures
from ..blocks import Figure, Section, Table, pct
from ..data import StudyData


def allocation_section(data: StudyData) -> Section | None:
    """Table 9: per-layer budgets of uniform top-k and greedy allocation with the coverage each reaches."""
    from ...profiling import Profile
    from ...selection import make_selection, select_topk, selection_coverage

    source = None
    for run in data.runs:
        if run.strategy == "greedy" and run.selection and run.run_dir and (run.run_dir / "profile").is_dir():
            from ...selection import Selection

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
    from ...selection import Selection

    uni_sel = Selection(uniform, prof.num_experts, "topk")
    cov_u = selection_coverage(uni_sel, prof.counts_LE, prof.layer_ids)
    cov_g = selection_coverage(greedy, prof.counts_LE, prof.layer_ids)
    rows = [
        [str(layer), str(len(uniform[layer])), pct(cov_u[layer]), str(len(greedy.experts[layer])), pct(cov_g[layer])]
        for layer in prof.layer_ids
    ]
    rows.append(
        [
            "mean",
            f"{np.mean([len(v) for v in uniform.values()]):.1f}",
            pct(np.mean(list(cov_u.values()))),
            f"{np.mean([len(v) for v in greedy.experts.values()]):.1f}",
            pct(np.mean(list(cov_g.values()))),
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
