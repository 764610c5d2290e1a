"""Routing statistics of a profile (paper §3): per-layer skew, cold experts, coverage, stability.

Every function takes routing counts as ``counts_LE`` ([layers, experts]), a numpy array or a torch
tensor, and computes in float64. Layers that routed no tokens get 0 for every statistic instead of nan,
so a report over an odd profile still serialises.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

KLike = int | Sequence[int] | np.ndarray
"""Experts per layer: one int for every layer, or one per layer (non-uniform allocations)."""


def to_numpy(x: Any, name: str, ndim: int, nonnegative: bool = True) -> np.ndarray:
    """A float64 copy of an array or torch tensor, checked, so every statistic sees the same input."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().double().numpy()
    arr = np.array(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains nan or inf")
    if nonnegative and np.any(arr < 0):
        raise ValueError(f"{name} contains negative values")
    return arr


def resolve_per_layer_k(k: KLike, num_layers: int, num_experts: int) -> np.ndarray:
    """``k`` as one checked int per layer, so uniform and non-uniform budgets share one code path."""
    k_L = np.asarray(k)
    if k_L.ndim == 0:
        k_L = np.full(num_layers, k_L)
    if k_L.shape != (num_layers,):
        raise ValueError(f"k must be an int or one int per layer ({num_layers}), got shape {k_L.shape}")
    if not np.issubdtype(k_L.dtype, np.integer) and not np.all(k_L == np.round(k_L)):
        raise ValueError(f"k must be whole numbers, got {k_L.tolist()}")
    k_L = k_L.astype(np.int64)
    if np.any(k_L < 0) or np.any(k_L > num_experts):
        raise ValueError(f"k must lie in [0, {num_experts}] (the experts per layer), got {k_L.tolist()}")
    return k_L


def _cv(values_LE: np.ndarray) -> np.ndarray:
    mean_L = values_LE.mean(axis=-1)
    std_L = values_LE.std(axis=-1)
    return np.divide(std_L, mean_L, out=np.zeros_like(mean_L), where=mean_L > 0)


def layer_cv(counts_LE: Any) -> np.ndarray:
    """Population std / mean of each layer's expert counts: skew within a layer (paper's "layer CV")."""
    return _cv(to_numpy(counts_LE, "counts_LE", 2))


def global_cv(counts_LE: Any) -> float:
    """CV of per-expert totals summed over layers: the balance the load-balancing loss enforces."""
    return float(_cv(to_numpy(counts_LE, "counts_LE", 2).sum(axis=0)))


def cold_fraction(counts_LE: Any) -> np.ndarray:
    """Share of a layer's experts that get strictly less than half the uniform share of its tokens."""
    counts_LE = to_numpy(counts_LE, "counts_LE", 2)
    threshold_L = 0.5 * counts_LE.sum(axis=1) / counts_LE.shape[1]
    return (counts_LE < threshold_L[:, None]).mean(axis=1)


def _sorted_desc(scores_LE: np.ndarray) -> np.ndarray:
    return -np.sort(-scores_LE, axis=1)


def coverage_at_k(counts_LE: Any, k: KLike) -> np.ndarray:
    """Share of each layer's activations that its top-k experts receive."""
    counts_LE = to_numpy(counts_LE, "counts_LE", 2)
    num_layers, num_experts = counts_LE.shape
    k_L = resolve_per_layer_k(k, num_layers, num_experts)
    cum_LE = np.concatenate([np.zeros((num_layers, 1)), np.cumsum(_sorted_desc(counts_LE), axis=1)], axis=1)
    top_L = cum_LE[np.arange(num_layers), k_L]
    total_L = cum_LE[:, -1]
    return np.divide(top_L, total_L, out=np.zeros(num_layers), where=total_L > 0)


def normalized_entropy(counts_LE: Any) -> np.ndarray:
    """Shannon entropy of each layer's routing distribution over log(E): 1 is uniform, 0 one expert."""
    counts_LE = to_numpy(counts_LE, "counts_LE", 2)
    num_layers, num_experts = counts_LE.shape
    total_L = counts_LE.sum(axis=1, keepdims=True)
    p_LE = np.divide(counts_LE, total_L, out=np.zeros_like(counts_LE), where=total_L > 0)
    plogp_LE = np.where(p_LE > 0, p_LE * np.log(np.where(p_LE > 0, p_LE, 1.0)), 0.0)
    if num_experts < 2:
        return np.zeros(num_layers)
    return -plogp_LE.sum(axis=1) / math.log(num_experts)


def topk_order(scores_LE: np.ndarray) -> np.ndarray:
    """Experts of each layer from highest to lowest score; equal scores keep the lower id first."""
    return np.argsort(-scores_LE, axis=1, kind="stable")


def topk_sets(scores_LE: Any, k: KLike) -> list[frozenset[int]]:
    """The k highest-scoring experts of each layer, ties to the lower expert id."""
    scores_LE = to_numpy(scores_LE, "scores_LE", 2, nonnegative=False)
    k_L = resolve_per_layer_k(k, *scores_LE.shape)
    order_LE = topk_order(scores_LE)
    return [frozenset(int(e) for e in order_LE[i, : k_L[i]]) for i in range(scores_LE.shape[0])]


def jaccard(a: Any, b: Any) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets are identical (1.0)."""
    a, b = set(a), set(b)
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)


def count_mass_jaccard(counts_LE: Any, mass_LE: Any, k: KLike) -> np.ndarray:
    """Per-layer overlap of the top-k by routed-token count and by routing mass (paper §6.3)."""
    counts_LE = to_numpy(counts_LE, "counts_LE", 2)
    mass_LE = to_numpy(mass_LE, "mass_LE", 2)
    if counts_LE.shape != mass_LE.shape:
        raise ValueError(f"counts_LE {counts_LE.shape} and mass_LE {mass_LE.shape} differ in shape")
    by_count, by_mass = topk_sets(counts_LE, k), topk_sets(mass_LE, k)
    return np.array([jaccard(a, b) for a, b in zip(by_count, by_mass, strict=True)])


def selection_jaccard(experts_a: Mapping[int, Sequence[int]], experts_b: Mapping[int, Sequence[int]]) -> float:
    """Mean per-layer Jaccard of two selections over the same MoE layers (e.g. two tasks' hot sets)."""
    layers_a, layers_b = {int(i) for i in experts_a}, {int(i) for i in experts_b}
    if layers_a != layers_b:
        raise ValueError(
            "selections cover different MoE layers: only in the first "
            f"{sorted(layers_a - layers_b)}, only in the second {sorted(layers_b - layers_a)}"
        )
    if not layers_a:
        raise ValueError("selections cover no layers; nothing to compare")
    a = {int(i): v for i, v in experts_a.items()}
    b = {int(i): v for i, v in experts_b.items()}
    return float(np.mean([jaccard(a[i], b[i]) for i in sorted(layers_a)]))


def _mean_layer_jaccard(sets_a: list[frozenset[int]], sets_b: list[frozenset[int]]) -> float:
    return float(np.mean([jaccard(a, b) for a, b in zip(sets_a, sets_b, strict=True)]))


@dataclass
class SubsampleStability:
    """How well a random share of the calibration examples recovers the full profile's top-k (§3.3)."""

    fraction: float
    trials: int
    seed: int
    k: int | list[int]
    mean: float
    std: float
    per_trial: list[float] = field(default_factory=list)
    sample_size: int = 0

    def to_json(self) -> dict[str, Any]:
        """The summary ``stats --json`` and the profile-set rows print (the per-trial values left out)."""
        return {
            "fraction": self.fraction,
            "trials": self.trials,
            "seed": self.seed,
            "sample_size": self.sample_size,
            "mean_jaccard": self.mean,
            "std_jaccard": self.std,
        }


def subsample_stability(
    example_counts_NLE: Any,
    fraction: float,
    k: KLike,
    trials: int = 50,
    seed: int = 0,
    rank_by_LE: Any = None,
) -> SubsampleStability:
    """Mean per-layer Jaccard between subsample top-k sets and the reference top-k, over seeded trials.

    Each trial sums the counts of fraction * N examples (rounded half up, at least 1), drawn without
    replacement.
    The reference is the top-k of ``rank_by_LE`` when given, else of the full sum of the examples.
    """
    example_counts_NLE = to_numpy(example_counts_NLE, "example_counts_NLE", 3)
    num_examples, num_layers, num_experts = example_counts_NLE.shape
    if num_examples == 0:
        raise ValueError("example_counts_NLE holds no examples")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials!r}")
    k_L = resolve_per_layer_k(k, num_layers, num_experts)
    reference_LE = example_counts_NLE.sum(axis=0) if rank_by_LE is None else to_numpy(rank_by_LE, "rank_by_LE", 2)
    if reference_LE.shape != (num_layers, num_experts):
        raise ValueError(f"rank_by_LE has shape {reference_LE.shape}, expected {(num_layers, num_experts)}")
    reference = topk_sets(reference_LE, k_L)
    sample_size = max(1, math.floor(fraction * num_examples + 0.5))
    rng = np.random.default_rng(seed)
    per_trial = []
    for _ in range(trials):
        idx = rng.choice(num_examples, size=sample_size, replace=False)
        per_trial.append(_mean_layer_jaccard(topk_sets(example_counts_NLE[idx].sum(axis=0), k_L), reference))
    k_out: int | list[int] = int(k_L[0]) if np.ndim(k) == 0 else [int(v) for v in k_L]
    return SubsampleStability(
        fraction=float(fraction),
        trials=int(trials),
        seed=int(seed),
        k=k_out,
        mean=float(np.mean(per_trial)),
        std=float(np.std(per_trial)),
        per_trial=per_trial,
        sample_size=int(sample_size),
    )


_K_HELP = "an expert count (16), a percentage of the routed experts ('25%'), or a fraction in (0, 1) (0.25)"


MAX_STABILITY_TRIALS = 10_000  # the paper uses 50; each trial re-ranks every layer


def check_trials(trials: int, option: str = "--stability-trials") -> None:
    if not 0 <= trials <= MAX_STABILITY_TRIALS:
        raise ValueError(f"{option} must be between 0 (skip) and {MAX_STABILITY_TRIALS:,}, got {trials}")


def check_k(k: Any, option: str = "--k") -> None:
    """The form of ``k`` (a count, percentage or fraction), checked before the model, and so its number of
    experts, is known: a typo fails at once, not after profiling or in the middle of a sweep."""
    try:
        resolve_k(k, 1 << 30)
    except ValueError as err:
        raise ValueError(f"{option} {k!r}: {err}") from None


def resolve_k(k: int | float | str, num_experts: int) -> int:
    """Experts per layer from a count or a share of ``num_experts``; a share rounds half up, at least 1.

    25% of 64 experts is 16, of 60 is 15.
    """
    if isinstance(k, bool) or num_experts < 1:
        raise ValueError(f"invalid k={k!r} for {num_experts} experts; k must be {_K_HELP}")
    share: Fraction | float | None = None
    count: int | None = None
    if isinstance(k, (int, np.integer)):
        count = int(k)
    elif isinstance(k, (float, np.floating)):
        if not 0 < k < 1:
            raise ValueError(f"invalid k={k!r}: a float k must be a fraction in (0, 1); k must be {_K_HELP}")
        share = float(k)
    elif isinstance(k, str):
        text = k.strip()
        try:
            if text.endswith("%"):
                share = Fraction(text[:-1].strip()) / 100
                if not 0 < share <= 1:
                    raise ValueError
            elif text.isdigit():
                count = int(text)
            else:
                share = Fraction(text)
                if not 0 < share < 1:
                    raise ValueError
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"invalid k={k!r}; k must be {_K_HELP}") from None
    else:
        raise ValueError(f"invalid k={k!r} of type {type(k).__name__}; k must be {_K_HELP}")
    if share is not None:
        if isinstance(share, Fraction):
            count = max(1, math.floor(share * num_experts + Fraction(1, 2)))
        else:
            count = max(1, math.floor(share * num_experts + 0.5 + 1e-9))
    assert count is not None
    if not 1 <= count <= num_experts:
        raise ValueError(f"invalid k={k!r}: must select between 1 and {num_experts} experts; k must be {_K_HELP}")
    return count


def _py_number(value: float) -> int | float:
    value = float(value)
    return int(value) if value.is_integer() else value


@dataclass
class RoutingStats:
    """Every §3 statistic of one profile, per layer and aggregated."""

    layer_ids: list[int]
    num_experts: int
    k: int
    k_requested: str
    routed_L: np.ndarray  # routed (token, expert) assignments per layer: tokens x top-k, not tokens
    cv_L: np.ndarray
    cold_fraction_L: np.ndarray
    coverage_L: np.ndarray
    entropy_L: np.ndarray
    global_cv: float
    count_mass_jaccard_L: np.ndarray | None = None

    @property
    def mean_layer_cv(self) -> float:
        return float(self.cv_L.mean())

    @property
    def ratio(self) -> float | None:
        """Mean layer CV over global CV: how much skew the global balance hides (paper: 4-5x)."""
        return None if self.global_cv == 0 else self.mean_layer_cv / self.global_cv

    def to_json(self) -> dict[str, Any]:
        layers = []
        for i, layer in enumerate(self.layer_ids):
            row: dict[str, Any] = {
                "layer": int(layer),
                "routed": _py_number(self.routed_L[i]),
                "cv": float(self.cv_L[i]),
                "cold_fraction": float(self.cold_fraction_L[i]),
                "coverage": float(self.coverage_L[i]),
                "entropy": float(self.entropy_L[i]),
            }
            if self.count_mass_jaccard_L is not None:
                row["count_mass_jaccard"] = float(self.count_mass_jaccard_L[i])
            layers.append(row)
        cmj = self.count_mass_jaccard_L
        return {
            "layers": layers,
            "num_layers": len(self.layer_ids),
            "num_experts": int(self.num_experts),
            "k": int(self.k),
            "k_requested": self.k_requested,
            "global_cv": float(self.global_cv),
            "mean_layer_cv": self.mean_layer_cv,
            "ratio": self.ratio,
            "mean_coverage": float(self.coverage_L.mean()),
            "mean_cold_fraction": float(self.cold_fraction_L.mean()),
            "mean_entropy": float(self.entropy_L.mean()),
            "mean_count_mass_jaccard": None if cmj is None else float(cmj.mean()),
        }


def check_layer_ids(layer_ids: Sequence[int] | None, num_layers: int) -> list[int]:
    """Layer ids for the rows of an [L, E] array: given ones checked, else 0..L-1."""
    if layer_ids is None:
        return list(range(num_layers))
    ids = [int(i) for i in layer_ids]
    if len(ids) != num_layers:
        raise ValueError(f"{len(ids)} layer_ids for {num_layers} layers of counts")
    if len(set(ids)) != len(ids):
        raise ValueError(f"layer_ids repeat a layer: {ids}")
    return ids


def routing_stats(
    counts_LE: Any, mass_LE: Any = None, layer_ids: Sequence[int] | None = None, k: int | float | str = "25%"
) -> RoutingStats:
    """All §3 statistics of one profile at a top-k budget (default 25% of the routed experts)."""
    counts_LE = to_numpy(counts_LE, "counts_LE", 2)
    num_layers, num_experts = counts_LE.shape
    if num_layers == 0:
        raise ValueError("counts_LE has no layers")
    k_int = resolve_k(k, num_experts)
    cmj = None if mass_LE is None else count_mass_jaccard(counts_LE, mass_LE, k_int)
    return RoutingStats(
        layer_ids=check_layer_ids(layer_ids, num_layers),
        num_experts=num_experts,
        k=k_int,
        k_requested=str(k),
        routed_L=counts_LE.sum(axis=1),
        cv_L=layer_cv(counts_LE),
        cold_fraction_L=cold_fraction(counts_LE),
        coverage_L=coverage_at_k(counts_LE, k_int),
        entropy_L=normalized_entropy(counts_LE),
        global_cv=global_cv(counts_LE),
        count_mass_jaccard_L=cmj,
    )


def coverage_curve(counts_LE: Any) -> np.ndarray:
    """Mean over layers of the top-k coverage for every k = 0..E (paper Fig. 2, routed experts only)."""
    counts_LE = to_numpy(counts_LE, "counts_LE", 2)
    num_experts = counts_LE.shape[1]
    return np.array([coverage_at_k(counts_LE, k).mean() for k in range(num_experts + 1)])


def coverage_with_shared(routed_coverage: Any, shared: float, top_k: int) -> np.ndarray:
    """Per-token expert coverage counting always-on shared experts (paper Fig. 2).

    A token activates ``top_k`` routed experts and ``shared`` shared ones (in routed-expert units); the shared
    are always covered, the routed ones in proportion to the routed coverage:
    (shared + coverage * top_k) / (shared + top_k). Qwen1.5-MoE (4 shared, top-4) at 37.4% routed: 68.7%.
    """
    if shared < 0 or top_k < 1:
        raise ValueError(f"shared must be >= 0 and top_k >= 1, got shared={shared}, top_k={top_k}")
    routed = np.asarray(routed_coverage, dtype=np.float64)
    return (shared + routed * top_k) / (shared + top_k)


def jaccard_matrix(scores: Sequence[Any], k: KLike) -> np.ndarray:
    """Mean per-layer Jaccard of the top-k expert sets between every pair of score arrays (paper Fig. 3)."""
    sets = [topk_sets(s, k) for s in scores]
    shapes = {to_numpy(s, "scores_LE", 2, nonnegative=False).shape for s in scores}
    if len(shapes) > 1:
        raise ValueError(f"profiles of different shapes cannot be compared: {sorted(shapes)}")
    n = len(sets)
    out = np.ones((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = _mean_layer_jaccard(sets[i], sets[j])
    return out
