"""Routing drift during training: selection overlap and KL against the base model."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from .. import figures
from ..blocks import Figure, Section, Table, fmt
from ..data import StudyData, as_float

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
    from ...training.monitor import TRACE_FILE, load_trace

    traced: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    for run in data.finished:
        if run.run_dir is not None and (run.run_dir / TRACE_FILE).is_file():
            seed = int(as_float(run.row.get("seed")) or 0)
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
                fmt(jac) + (f" ({note})" if note and jac is not None else ""),
                fmt(kl),
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
