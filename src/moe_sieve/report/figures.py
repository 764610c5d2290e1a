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
    """Fig. 1: layer CV against depth per dataset, with each dataset's global CV as a dashed line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for i, (name, cv, g) in enumerate(zip(names, cv_by_layer, global_cv, strict=True)):
        color = PALETTE[i % len(PALETTE)]
        ax.plot(layer_ids, cv, marker="o", ms=3, color=color, label=name)
        ax.axhline(g, color=color, ls="--", lw=0.9, alpha=0.8)
    ax.plot([], [], color="0.4", ls="--", lw=0.9, label="global CV")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("CV of expert counts")
    ax.set_ylim(bottom=0)
    ax.legend(ncol=2 if len(names) > 4 else 1, loc="best")
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
) -> bytes:
    """Fig. 4: mean accuracy (± seed std) and seed std against the per-layer budget k; full LoRA dashed."""
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
    ax1.set_ylabel("accuracy")
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
