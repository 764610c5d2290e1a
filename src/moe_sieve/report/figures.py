"""The report's figures, one style for all (matplotlib, Agg), returned as PNG bytes."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "image.cmap": "viridis",
}
PALETTE = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _styled(fn):
    def wrapper(*args: Any, **kwargs: Any) -> bytes:
        plt = _plt()
        with plt.rc_context(STYLE):
            return fn(*args, **kwargs)

    wrapper.__doc__ = fn.__doc__
    wrapper.__name__ = fn.__name__
    return wrapper


@_styled
def routing_heatmaps(names: Sequence[str], counts: Sequence[np.ndarray], layer_ids: Sequence[int]) -> bytes:
    """App. A.2: per dataset, each layer's expert loads relative to the uniform share (1 = uniform)."""
    plt = _plt()
    n = len(names)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    num_layers, num_experts = counts[0].shape
    cell_w = max(2.6, min(5.0, 0.08 * num_experts + 1.2))
    cell_h = max(1.6, min(4.0, 0.16 * num_layers + 0.9))
    fig, axes = plt.subplots(
        rows, cols, figsize=(cell_w * cols + 0.8, (cell_h + 0.5) * rows + 0.3), squeeze=False, layout="constrained"
    )
    rel = []
    for c in counts:
        total = c.sum(axis=1, keepdims=True)
        rel.append(np.divide(c * c.shape[1], total, out=np.zeros_like(c, dtype=float), where=total > 0))
    vmax = max(2.0, float(np.percentile(np.concatenate([r.ravel() for r in rel]), 99)))
    image = None
    for i, ax in enumerate(axes.ravel()):
        if i >= n:
            ax.axis("off")
            continue
        image = ax.imshow(rel[i], aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(names[i])
        ax.grid(False)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        step = max(1, num_layers // 8)
        ax.set_yticks(range(0, num_layers, step), [str(layer_ids[j]) for j in range(0, num_layers, step)])
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="load / uniform share")
    return _png(fig)


@_styled
def cv_by_depth(
    names: Sequence[str], cv_by_layer: Sequence[Sequence[float]], global_cv: Sequence[float], layer_ids: Sequence[int]
) -> bytes:
    """Fig. 1: layer CV against depth per dataset, with each dataset's global CV as a dashed line; one legend
    entry per dataset shows both of its lines in its colour."""
    from matplotlib.legend_handler import HandlerTuple

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    handles, labels = [], []
    for i, (name, cv, g) in enumerate(zip(names, cv_by_layer, global_cv, strict=True)):
        color = PALETTE[i % len(PALETTE)]
        (solid,) = ax.plot(layer_ids, cv, marker="o", ms=3, color=color)
        dashed = ax.axhline(g, color=color, ls="--", lw=0.9, alpha=0.8)
        handles.append((solid, dashed))
        labels.append(f"{name} (global CV {g:.2f}, dashed)")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("CV of expert counts")
    ax.set_ylim(bottom=0)
    ax.legend(
        handles,
        labels,
        handler_map={tuple: HandlerTuple(ndivide=None, pad=0.6)},
        handlelength=3.2,
        ncol=2 if len(names) > 4 else 1,
        loc="best",
    )
    return _png(fig)


@_styled
def coverage_curves(
    names: Sequence[str],
    curves: Sequence[np.ndarray],
    shared_curves: Sequence[np.ndarray | None],
    k: int,
) -> bytes:
    """Fig. 2: share of activations covered by the top-k experts of each layer against k (routed, solid),
    and per-token coverage counting shared experts (dashed), against the uniform diagonal."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    num_experts = len(curves[0]) - 1
    share = np.arange(num_experts + 1) / num_experts
    for i, (name, curve, shared) in enumerate(zip(names, curves, shared_curves, strict=True)):
        color = PALETTE[i % len(PALETTE)]
        ax.plot(100 * share, 100 * curve, color=color, label=name)
        if shared is not None:
            ax.plot(100 * share, 100 * shared, color=color, ls="--", lw=1)
    if any(s is not None for s in shared_curves):
        ax.plot([], [], color="0.4", ls="--", lw=1, label="routed + shared")
    ax.plot([0, 100], [0, 100], color="0.6", lw=0.8, ls=":", label="uniform routing")
    ax.axvline(100 * k / num_experts, color="0.3", lw=0.8)
    ax.text(100 * k / num_experts + 1, 4, f"k = {k}", fontsize=8, color="0.3")
    ax.set_xlabel("routed experts selected per layer (%)")
    ax.set_ylabel("activations covered (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right", ncol=2 if len(names) > 5 else 1)
    return _png(fig)


@_styled
def jaccard_heatmap(names: Sequence[str], matrix: np.ndarray, title: str) -> bytes:
    """Fig. 3: mean per-layer Jaccard of the top-k sets between datasets."""
    plt = _plt()
    n = len(names)
    size = max(3.0, 0.55 * n + 1.6)
    fig, ax = plt.subplots(figsize=(size + 0.8, size))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.grid(False)
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{matrix[i][j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="black" if matrix[i][j] > 0.6 else "white",
            )
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8, label="Jaccard")
    return _png(fig)


@_styled
def stability_bars(names: Sequence[str], means: Sequence[float], stds: Sequence[float], label: str) -> bytes:
    """§3.3: mean Jaccard of subsample top-k sets with the full profile's, per dataset (error bar: std)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(3.5, 0.6 * len(names) + 1.5), 3.0))
    x = np.arange(len(names))
    ax.bar(x, means, yerr=stds, color=PALETTE[0], capsize=3, width=0.6)
    ax.set_xticks(x, names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylim(0, 1.05)
    ax.axhline(0.9, color="0.5", ls=":", lw=0.8)
    ax.set_ylabel("mean Jaccard vs full profile")
    ax.set_title(label)
    return _png(fig)


@_styled
def budget_sweep(
    ks: Sequence[int],
    means: Sequence[float],
    stds: Sequence[float],
    ns: Sequence[int],
    reference: tuple[str, float, float] | None,
    num_experts: int | None,
    title: str,
    metric: str = "accuracy",
) -> bytes:
    """Fig. 4: mean metric (± seed std) and seed std against the per-layer budget k; full LoRA dashed."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8.0, 3.0))
    ax1.errorbar(ks, means, yerr=stds, marker="o", ms=4, capsize=3, color=PALETTE[0], label="hot-k")
    ax2.plot(ks, stds, marker="o", ms=4, color=PALETTE[0], label="hot-k")
    if reference is not None:
        name, mean, std = reference
        ax1.axhline(mean, color=PALETTE[1], ls="--", lw=1, label=name)
        ax1.axhspan(mean - std, mean + std, color=PALETTE[1], alpha=0.08)
        ax2.axhline(std, color=PALETTE[1], ls="--", lw=1, label=name)
    for k, m, n in zip(ks, means, ns, strict=True):
        ax1.annotate(f"n={n}", (k, m), textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
    xlabel = "experts per layer k" + (f" (of {num_experts})" if num_experts else "")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xlabel(xlabel)
    ax2.set_xlabel(xlabel)
    ax1.set_ylabel(metric)
    ax2.set_ylabel("seed std")
    ax2.set_ylim(bottom=0)
    ax1.set_title(title)
    ax2.set_title("seed-to-seed spread")
    ax1.legend(loc="lower right")
    return _png(fig)


@_styled
def allocation_bars(layer_ids: Sequence[int], uniform: Sequence[int], greedy: Sequence[int], title: str) -> bytes:
    """Table 9 as a picture: experts per layer under uniform top-k and greedy allocation."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(layer_ids) + 2), 2.8))
    x = np.arange(len(layer_ids))
    ax.bar(x - 0.2, uniform, width=0.4, color=PALETTE[0], label="uniform")
    ax.bar(x + 0.2, greedy, width=0.4, color=PALETTE[3], label="greedy")
    ax.set_xticks(x, [str(i) for i in layer_ids])
    ax.set_xlabel("layer")
    ax.set_ylabel("experts")
    ax.set_title(title)
    ax.legend()
    return _png(fig)


LINESTYLES = ("-", "--", "-.", ":")


def _style(i: int) -> dict[str, Any]:
    """Colour and line style of series ``i``: ten colours, then the same colours dashed, and so on."""
    return {"color": PALETTE[i % len(PALETTE)], "ls": LINESTYLES[(i // len(PALETTE)) % len(LINESTYLES)]}


@_styled
def forest_plot(
    labels: Sequence[str],
    deltas: Sequence[float],
    ci_lows: Sequence[float | None],
    ci_highs: Sequence[float | None],
    margins: Sequence[float],
    unit: str,
    reference: str,
    title: str,
) -> bytes:
    """Each condition's paired difference from the reference with its 95% CI (open marker: fewer than two paired
    seeds, no interval), over the TOST margins as nested shaded bands with dashed edges, in the metric's unit."""
    plt = _plt()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(8.0, 0.42 * n + 1.5))
    y = np.arange(n)[::-1]
    ax.grid(False, axis="y")
    for i, m in enumerate(sorted(margins, reverse=True)):
        ax.axvspan(-m, m, color=PALETTE[2], alpha=0.10, lw=0, label="TOST margins" if i == 0 else None)
        for side in (-m, m):
            ax.axvline(side, color=PALETTE[2], ls="--", lw=0.9)
    ax.annotate(
        f"TOST margins ±{', ±'.join(f'{m:g}' for m in sorted(margins))} {unit}",
        (max(margins), 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(4, 2),
        textcoords="offset points",
        ha="left",
        va="bottom",
        fontsize=8,
        color="#1a6b1a",
    )
    ax.axvline(0, color="0.25", lw=1)
    span = [m for m in margins] + [abs(v) for v in (*deltas, *ci_lows, *ci_highs) if v is not None]
    for yi, d, lo, hi in zip(y, deltas, ci_lows, ci_highs, strict=True):
        if lo is None or hi is None:
            ax.plot([d], [yi], "o", ms=6, mfc="white", mec=PALETTE[0])
        else:
            ax.errorbar([d], [yi], xerr=[[d - lo], [hi - d]], fmt="o", ms=5, capsize=4, color=PALETTE[0], lw=1.6)
    limit = 1.12 * max(span) if span else 1.0
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_yticks(y, labels)
    ax.set_xlabel(f"difference from {reference} ({unit}); bars: 95% CI over paired seeds")
    ax.set_title(title, pad=16)
    return _png(fig)


def _aligned(curves: Sequence[tuple[Sequence[int], Sequence[float]]]) -> tuple[np.ndarray, np.ndarray]:
    """Steps that every seed logged and the losses there, [seeds, steps]."""
    common = sorted(set.intersection(*(set(steps) for steps, _ in curves)))
    losses = np.array([[dict(zip(steps, loss, strict=True))[s] for s in common] for steps, loss in curves])
    return np.asarray(common), losses


@_styled
def learning_curves(curves: dict[str, Sequence[tuple[Sequence[int], Sequence[float]]]], title: str) -> bytes:
    """Training loss per condition: mean over seeds at the steps all seeds logged, with the min-max band."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.0, 3.6))
    for i, (label, runs) in enumerate(curves.items()):
        steps, losses = _aligned(runs)
        if not len(steps):
            continue
        style = _style(i)
        ax.plot(steps, losses.mean(0), lw=1.5, label=f"{label} (n={len(runs)})", **style)
        if len(runs) > 1:
            ax.fill_between(steps, losses.min(0), losses.max(0), color=style["color"], alpha=0.12, lw=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _png(fig)


def _step_ticks(ax: Any, steps: Sequence[int], max_labels: int = 8) -> None:
    """One category per measurement, labelled with its step (at most ``max_labels`` labels)."""
    every = max(1, math.ceil(len(steps) / max_labels))
    positions = list(range(0, len(steps), every))
    ax.set_xticks(positions, [str(int(steps[i])) for i in positions])


@_styled
def drift_panels(runs: Sequence[dict[str, Any]]) -> bytes:
    """Routing drift of a few runs, at the report's width (fonts read at their size): selection coverage and
    Jaccard against step (layer mean, min-max band), then one KL(now || step 0) heat map per run with one column
    per measurement. Each run: ``label, steps, coverage_SL, jaccard_SL, jaccard_note, kl_SL, layer_ids``; a None
    coverage or Jaccard leaves the run out of that panel (e.g. no adapted experts)."""
    plt = _plt()
    cols = 2
    heat_rows = math.ceil(len(runs) / cols)
    fig = plt.figure(figsize=(9.4, 3.3 + 2.9 * heat_rows), layout="constrained")
    grid = fig.add_gridspec(1 + heat_rows, cols)
    lines = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])]
    for i, run in enumerate(runs):
        style = _style(i)
        for ax, key in zip(lines, ("coverage_SL", "jaccard_SL"), strict=True):
            values = run.get(key)
            if values is None:
                continue
            dashed = key == "jaccard_SL" and run.get("jaccard_note")
            label = run["label"] + (f" ({run['jaccard_note']})" if dashed else "")
            ax.plot(
                run["steps"],
                values.mean(1),
                marker="o",
                ms=3,
                label=label,
                color=style["color"],
                ls="--" if dashed else style["ls"],
            )
            ax.fill_between(run["steps"], values.min(1), values.max(1), alpha=0.12, color=style["color"], lw=0)
    measured = sorted({int(step) for run in runs for step in run["steps"]})
    for ax, title in zip(lines, ("selection coverage", "Jaccard: top-k vs selection"), strict=True):
        ax.set_title(f"{title} (layer mean, min-max)")
        ax.set_xlabel("optimizer step")
        if len(measured) <= 10:
            ax.set_xticks(measured)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.02, 1.02)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower left")
    vmax = max((float(r["kl_SL"].max()) for r in runs), default=0.0) or 1e-12
    for i, run in enumerate(runs):
        ax = fig.add_subplot(grid[1 + i // cols, i % cols])
        kl_LS = np.asarray(run["kl_SL"]).T
        image = ax.imshow(
            kl_LS, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest"
        )
        ax.grid(False)
        _step_ticks(ax, run["steps"])
        layers = list(run["layer_ids"])
        every = max(1, math.ceil(len(layers) / 8))
        ax.set_yticks(range(0, len(layers), every), [str(layers[j]) for j in range(0, len(layers), every)])
        ax.set_title(f"{run['label']}: KL(now || step 0)")
        ax.set_xlabel("optimizer step (one column per measurement)")
        ax.set_ylabel("MoE layer")
        fig.colorbar(image, ax=ax, shrink=0.9)
    return _png(fig)
