"""Which routed experts get LoRA adapters (paper §4, §6, App. C), and the selection file that records it.

A *strategy* is how experts are chosen (``register_strategy``: topk, random, greedy, coverage, hot+filler); a
:class:`Selection` is the result, the experts per layer that get adapters, with the strategy recorded beside them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._io import atomic_write_json, ensure_writable
from ._version import __version__
from .routing_stats import KLike, check_layer_ids, resolve_k, resolve_per_layer_k, to_numpy, topk_order

if TYPE_CHECKING:
    from rich.table import Table

SELECTION_FORMAT_VERSION = 1
RANK_BY = ("count", "mass")
_REQUIRED_KEYS = ("format_version", "num_experts", "strategy", "layers")


def _integer(value: Any, what: str) -> int:
    """An id as an int; 1.7 or "1.7" is an error, never truncated to 1 (JSON object keys are strings)."""
    import operator

    if isinstance(value, bool):
        raise TypeError(f"{what} {value!r} is a boolean")
    if isinstance(value, str):
        if not value.strip().lstrip("-").isdigit():
            raise ValueError(f"{what} {value!r} is not an integer")
        return int(value)
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} {value!r} is not an integer") from None


@dataclass
class Selection:
    """Expert ids per MoE decoder layer, plus how they were chosen and from what profile.

    ``experts`` maps a decoder-layer id to its sorted, distinct expert ids; construction normalises and
    checks that, so a loaded or hand-made selection obeys the same invariants as a computed one.
    """

    experts: dict[int, list[int]]
    num_experts: int
    strategy: str
    params: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    format_version: int = SELECTION_FORMAT_VERSION
    tool_version: str = __version__

    def __post_init__(self) -> None:
        if int(self.num_experts) < 1:
            raise ValueError(f"num_experts must be at least 1, got {self.num_experts!r}")
        self.num_experts = int(self.num_experts)
        experts: dict[int, list[int]] = {}
        for layer, ids in self.experts.items():
            try:
                layer_id = _integer(layer, "layer id")
                ids = [_integer(e, "expert id") for e in ids]
            except (TypeError, ValueError) as err:
                raise ValueError(f"layer {layer!r}: layer and expert ids must be integers ({err})") from None
            if layer_id in experts:
                raise ValueError(f"layer {layer_id} appears twice")
            if len(set(ids)) != len(ids):
                raise ValueError(f"layer {layer_id}: repeated expert ids {ids}")
            bad = [e for e in ids if not 0 <= e < self.num_experts]
            if bad:
                raise ValueError(f"layer {layer_id}: expert ids {bad} outside [0, {self.num_experts})")
            experts[layer_id] = sorted(ids)
        self.experts = dict(sorted(experts.items()))

    @property
    def per_layer_k(self) -> dict[int, int]:
        return {layer: len(ids) for layer, ids in self.experts.items()}

    @property
    def total_slots(self) -> int:
        """Expert-layer pairs that get an adapter: the budget strategies are compared at."""
        return sum(self.per_layer_k.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "moe-sieve-selection",
            "format_version": self.format_version,
            "tool_version": self.tool_version,
            "strategy": self.strategy,
            "num_experts": self.num_experts,
            "num_layers": len(self.experts),
            "total_slots": self.total_slots,
            "params": self.params,
            "source": self.source,
            "per_layer_k": {str(layer): k for layer, k in self.per_layer_k.items()},
            "layers": {str(layer): ids for layer, ids in self.experts.items()},
        }

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write atomically; an existing file is only replaced with ``overwrite``."""
        path = ensure_writable(path, overwrite)
        atomic_write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Selection:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"selection file {path} not found; create one with `moe-sieve select`")
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a valid selection file, invalid JSON ({err})") from err
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: not a valid selection file, expected a JSON object")
        missing = [key for key in _REQUIRED_KEYS if key not in obj]
        if missing:
            raise ValueError(f"{path}: not a valid selection file, missing keys {missing}")
        if obj["format_version"] != SELECTION_FORMAT_VERSION:
            raise ValueError(
                f"{path}: unknown selection format_version {obj['format_version']!r} "
                f"(this moe-sieve {__version__} reads version {SELECTION_FORMAT_VERSION})"
            )
        if not isinstance(obj["layers"], dict):
            raise ValueError(f"{path}: 'layers' must map layer ids to lists of expert ids")
        try:
            return cls(
                experts=obj["layers"],
                num_experts=obj["num_experts"],
                strategy=str(obj["strategy"]),
                params=dict(obj.get("params") or {}),
                source=dict(obj.get("source") or {}),
                format_version=int(obj["format_version"]),
                tool_version=str(obj.get("tool_version", "unknown")),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: invalid selection ({err})") from err


def _scores(scores_LE: Any, name: str = "counts_LE") -> np.ndarray:
    scores_LE = to_numpy(scores_LE, name, 2)
    if scores_LE.shape[0] == 0 or scores_LE.shape[1] == 0:
        raise ValueError(f"{name} of shape {scores_LE.shape} has no layers or no experts")
    return scores_LE


def _take(order_LE: np.ndarray, k_L: np.ndarray, layer_ids: list[int]) -> dict[int, list[int]]:
    return {layer: sorted(int(e) for e in order_LE[i, : k_L[i]]) for i, layer in enumerate(layer_ids)}


def select_topk(scores_LE: Any, k: KLike, layer_ids: Sequence[int] | None = None) -> dict[int, list[int]]:
    """The k highest-scoring experts of every layer (the MoE-Sieve recipe); ties to the lower id."""
    scores_LE = _scores(scores_LE, "scores_LE")
    num_layers, num_experts = scores_LE.shape
    ids = check_layer_ids(layer_ids, num_layers)
    return _take(topk_order(scores_LE), resolve_per_layer_k(k, num_layers, num_experts), ids)


def select_random(
    num_layers_or_layer_ids: int | Sequence[int], num_experts: int, k: int, seed: int
) -> dict[int, list[int]]:
    """k experts per layer uniformly at random: the control that isolates the routing signal (§6.1)."""
    if isinstance(num_layers_or_layer_ids, (int, np.integer)):
        ids = list(range(int(num_layers_or_layer_ids)))
    else:
        ids = check_layer_ids(num_layers_or_layer_ids, len(num_layers_or_layer_ids))
    if not 1 <= k <= num_experts:
        raise ValueError(f"k={k} must lie in [1, {num_experts}]")
    rng = np.random.default_rng(seed)
    return {layer: sorted(int(e) for e in rng.choice(num_experts, size=k, replace=False)) for layer in ids}


def select_greedy(
    counts_LE: Any, total_slots: int, min_per_layer: int, layer_ids: Sequence[int] | None = None
) -> dict[int, list[int]]:
    """Greedy marginal-coverage allocation of ``total_slots`` expert-layer slots (App. C).

    Every layer starts with its top ``min_per_layer``; each further slot goes to the layer whose next
    expert adds the most coverage (ties to the lower layer index). Sorted coverage is concave in k, so
    this maximises the sum of per-layer coverage over all allocations with at least ``min_per_layer`` each.
    """
    counts_LE = _scores(counts_LE)
    num_layers, num_experts = counts_LE.shape
    ids = check_layer_ids(layer_ids, num_layers)
    if not 0 <= min_per_layer <= num_experts:
        raise ValueError(f"min_per_layer={min_per_layer} must lie in [0, {num_experts}] (experts per layer)")
    lowest, highest = num_layers * min_per_layer, num_layers * num_experts
    if not lowest <= total_slots <= highest:
        raise ValueError(
            f"total_slots={total_slots} must lie in [{lowest}, {highest}]: at least {num_layers} layers x "
            f"min_per_layer {min_per_layer}, at most {num_layers} layers x {num_experts} experts"
        )
    order_LE = topk_order(counts_LE)
    sorted_LE = np.take_along_axis(counts_LE, order_LE, axis=1)
    total_L = counts_LE.sum(axis=1)
    gain_LE = np.divide(sorted_LE, total_L[:, None], out=np.zeros_like(sorted_LE), where=total_L[:, None] > 0)
    gain_LE = np.concatenate([gain_LE, np.full((num_layers, 1), -np.inf)], axis=1)
    k_L = np.full(num_layers, min_per_layer, dtype=np.int64)
    rows = np.arange(num_layers)
    for _ in range(total_slots - lowest):
        k_L[int(np.argmax(gain_LE[rows, k_L]))] += 1
    return _take(order_LE, k_L, ids)


def select_hot_filler(
    scores_LE: Any, k: int, hot: int, seed: int, layer_ids: Sequence[int] | None = None
) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Top-``hot`` experts of each layer plus ``k - hot`` seeded random fillers from the experts ranked below
    the top-k (§7.3's cold-filler control): the same budget as top-k, with the warm experts swapped for cold.

    Returns the selection and the fillers per layer.
    """
    scores_LE = _scores(scores_LE, "scores_LE")
    num_layers, num_experts = scores_LE.shape
    ids = check_layer_ids(layer_ids, num_layers)
    if not 0 <= hot <= k <= num_experts:
        raise ValueError(f"hot+filler needs 0 <= hot ({hot}) <= k ({k}) <= experts per layer ({num_experts})")
    if k - hot > num_experts - k:
        raise ValueError(
            f"hot+filler: {k - hot} fillers per layer but only {num_experts - k} experts rank below the top-{k}; "
            f"raise --hot or lower --k"
        )
    order_LE = topk_order(scores_LE)
    rng = np.random.default_rng(seed)
    experts, fillers = {}, {}
    for i, layer in enumerate(ids):
        picked = rng.choice(order_LE[i, k:], size=k - hot, replace=False)
        fillers[layer] = sorted(int(e) for e in picked)
        experts[layer] = sorted([int(e) for e in order_LE[i, :hot]] + fillers[layer])
    return experts, fillers


def select_coverage(counts_LE: Any, target: float, layer_ids: Sequence[int] | None = None) -> dict[int, list[int]]:
    """Per layer, the fewest top experts whose share of the layer's activations reaches ``target`` (§6.2).

    A layer that routed no tokens gets no experts: nothing says which of them matter.
    """
    if not 0 < target <= 1:
        raise ValueError(f"coverage target must lie in (0, 1], got {target!r}")
    counts_LE = _scores(counts_LE)
    num_layers, _ = counts_LE.shape
    ids = check_layer_ids(layer_ids, num_layers)
    order_LE = topk_order(counts_LE)
    cum_LE = np.cumsum(np.take_along_axis(counts_LE, order_LE, axis=1), axis=1)
    total_L = cum_LE[:, -1]
    share_LE = np.divide(cum_LE, total_L[:, None], out=np.zeros_like(cum_LE), where=total_L[:, None] > 0)
    k_L = np.where(total_L > 0, np.argmax(share_LE >= target - 1e-12, axis=1) + 1, 0)
    return _take(order_LE, k_L, ids)


@dataclass(frozen=True)
class SelectionRequest:
    """What a strategy chooses from: per-layer scores (routed-token counts or routing mass, as ``rank_by``
    says) and the options ``make_selection`` was given; ``k`` is resolved to a count for strategies that use it."""

    scores_LE: np.ndarray
    layer_ids: list[int]
    num_experts: int
    k: int | None
    rank_by: str
    seed: int
    min_per_layer: int | None
    coverage: float
    hot: int | float | str | None
    top_k: int | None


# A strategy returns the experts per layer and the parameters it resolved (recorded in the selection file).
SelectFn = Callable[[SelectionRequest], tuple[dict[int, list[int]], dict[str, Any]]]


@dataclass(frozen=True)
class Strategy:
    """A registered selection strategy: how experts are chosen, not which ones (that is the :class:`Selection`).

    ``uses_k``: takes the per-layer budget ``k``; ``uses_scores``: ranks experts by the profile (counts or mass),
    so it needs one (random does not); ``settings``: the further options it reads, by their ``make_selection`` /
    ``TrainConfig`` names (a run's selection fingerprint covers them).
    """

    name: str
    select: SelectFn
    help: str
    uses_k: bool = True
    uses_scores: bool = True
    settings: tuple[str, ...] = ()


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(
    name: str,
    select: SelectFn,
    *,
    help: str,
    uses_k: bool = True,
    uses_scores: bool = True,
    settings: Sequence[str] = (),
) -> Strategy:
    """Add (or replace) a strategy so ``make_selection``, ``select --strategy`` and ``train --strategy`` reach it."""
    strategy = Strategy(name, select, help, uses_k, uses_scores, tuple(settings))
    STRATEGIES[name] = strategy
    return strategy


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None


def strategy_help() -> str:
    """Each registered strategy with its one-line help, for option help texts."""
    return ", ".join(f"{s.name} ({s.help})" for s in STRATEGIES.values())


def strategy_settings() -> tuple[str, ...]:
    """Every option some registered strategy reads, once each, in registration order."""
    return tuple(dict.fromkeys(name for s in STRATEGIES.values() for name in s.settings))


def _topk(req: SelectionRequest) -> tuple[dict[int, list[int]], dict[str, Any]]:
    return select_topk(req.scores_LE, req.k, req.layer_ids), {}


def _random(req: SelectionRequest) -> tuple[dict[int, list[int]], dict[str, Any]]:
    return select_random(req.layer_ids, req.num_experts, req.k, req.seed), {"seed": int(req.seed)}


def _greedy(req: SelectionRequest) -> tuple[dict[int, list[int]], dict[str, Any]]:
    """Greedy gets the same slot budget as uniform top-k (layers x k) and starts every layer with the model's
    routing width ``top_k`` when known, else half of k, never more than k."""
    k = req.k
    min_per_layer = req.min_per_layer
    if min_per_layer is None:
        min_per_layer = min(req.top_k if req.top_k is not None else max(1, k // 2), k)
    total_slots = len(req.layer_ids) * k
    params = {"min_per_layer": int(min_per_layer), "total_slots": total_slots, "top_k": req.top_k}
    return select_greedy(req.scores_LE, total_slots, int(min_per_layer), req.layer_ids), params


def _coverage(req: SelectionRequest) -> tuple[dict[int, list[int]], dict[str, Any]]:
    params = {"coverage": float(req.coverage)}
    return select_coverage(req.scores_LE, req.coverage, req.layer_ids), params


def _hot_filler(req: SelectionRequest) -> tuple[dict[int, list[int]], dict[str, Any]]:
    """Keeps the top ``hot`` (a count or share; default half of k) and fills up to k with seeded random experts
    ranked below the top-k."""
    k, hot = req.k, req.hot
    hot_int = max(1, k // 2) if hot is None else resolve_k(hot, req.num_experts)
    experts, fillers = select_hot_filler(req.scores_LE, k, hot_int, req.seed, req.layer_ids)
    params = {
        "hot": None if hot is None else (int(hot) if isinstance(hot, np.integer) else hot),
        "hot_resolved": hot_int,
        "fillers_per_layer": k - hot_int,
        "filler_pool": f"experts ranked below the top-{k} by {req.rank_by}",
        "seed": int(req.seed),
        "fillers": {str(layer): ids_ for layer, ids_ in fillers.items()},
    }
    return experts, params


register_strategy("topk", _topk, help="the k hottest experts per layer, the MoE-Sieve recipe")
register_strategy(
    "random", _random, help="k random experts per layer, the control", uses_scores=False, settings=("seed",)
)
register_strategy(
    "greedy", _greedy, help="coverage-greedy slots at top-k's budget, App. C", settings=("min_per_layer",)
)
register_strategy(
    "coverage", _coverage, help="fewest experts reaching --coverage", uses_k=False, settings=("coverage",)
)
register_strategy(
    "hot+filler",
    _hot_filler,
    help="top --hot plus random cold experts up to k, §7.3",
    settings=("hot", "seed"),
)


def make_selection(
    counts_LE: Any,
    mass_LE: Any = None,
    *,
    strategy: str = "topk",
    k: int | float | str = "25%",
    rank_by: str = "count",
    seed: int = 0,
    min_per_layer: int | None = None,
    coverage: float = 0.6,
    layer_ids: Sequence[int] | None = None,
    top_k: int | None = None,
    source: dict[str, Any] | None = None,
    hot: int | float | str | None = None,
) -> Selection:
    """Choose experts with one registered strategy and record every resolved parameter, so the file explains
    itself (see each strategy's function for its defaults: greedy's ``min_per_layer``, hot+filler's ``hot``)."""
    spec = get_strategy(strategy)
    if rank_by not in RANK_BY:
        raise ValueError(f"unknown rank_by {rank_by!r}; choose one of {', '.join(RANK_BY)}")
    counts_LE = _scores(counts_LE)
    num_layers, num_experts = counts_LE.shape
    ids = check_layer_ids(layer_ids, num_layers)
    scores_LE = counts_LE
    if mass_LE is not None:
        mass_LE = to_numpy(mass_LE, "mass_LE", 2)
        if mass_LE.shape != counts_LE.shape:
            raise ValueError(f"mass_LE {mass_LE.shape} and counts_LE {counts_LE.shape} differ in shape")
    if rank_by == "mass" and spec.uses_scores:
        if mass_LE is None:
            raise ValueError("rank_by='mass' needs routing mass, but mass_LE is None")
        scores_LE = mass_LE
    params: dict[str, Any] = {"strategy": strategy, "rank_by": rank_by}
    k_int = None
    if spec.uses_k:
        k_int = resolve_k(k, num_experts)
        k_given = int(k) if isinstance(k, np.integer) else k if isinstance(k, (int, float, str)) else str(k)
        params.update(k=k_given, k_resolved=k_int)
    request = SelectionRequest(
        scores_LE=scores_LE,
        layer_ids=ids,
        num_experts=num_experts,
        k=k_int,
        rank_by=rank_by,
        seed=seed,
        min_per_layer=min_per_layer,
        coverage=coverage,
        hot=hot,
        top_k=top_k,
    )
    experts, resolved = spec.select(request)
    params.update(resolved)
    return Selection(
        experts=experts, num_experts=num_experts, strategy=strategy, params=params, source=dict(source or {})
    )


def compact_ids(ids: Sequence[int]) -> str:
    """Expert ids as ranges: [0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    parts: list[str] = []
    ids = sorted(ids)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


def selection_coverage(selection: Selection, counts_LE: Any, layer_ids: Sequence[int] | None = None) -> dict:
    """Share of each layer's activations that the selected experts receive.

    Rows of ``counts_LE`` belong to ``layer_ids`` when given, else to the selection's layers in order.
    """
    counts_LE = to_numpy(counts_LE, "counts_LE", 2)
    ids = list(selection.experts) if layer_ids is None else check_layer_ids(layer_ids, counts_LE.shape[0])
    if counts_LE.shape != (len(ids), selection.num_experts) or set(ids) != set(selection.experts):
        raise ValueError(
            f"counts_LE of shape {counts_LE.shape} does not fit a selection over layers "
            f"{list(selection.experts)} x {selection.num_experts} experts"
        )
    out = {}
    for row, layer in enumerate(ids):
        total = counts_LE[row].sum()
        chosen = counts_LE[row, selection.experts[layer]].sum()
        out[layer] = float(chosen / total) if total > 0 else 0.0
    return out


def selection_table(selection: Selection, counts_LE: Any = None, layer_ids: Sequence[int] | None = None) -> Table:
    """A per-layer summary for the terminal: experts chosen and, with counts, the coverage they reach."""
    from rich.table import Table

    cov = None if counts_LE is None else selection_coverage(selection, counts_LE, layer_ids)
    table = Table(
        title=f"Selection ({selection.strategy}): {selection.total_slots} slots over "
        f"{len(selection.experts)} layers x {selection.num_experts} experts"
    )
    table.add_column("layer", justify="right")
    table.add_column("#experts", justify="right")
    table.add_column("expert ids")
    if cov is not None:
        table.add_column("coverage %", justify="right")
    for layer, ids in selection.experts.items():
        row = [str(layer), str(len(ids)), compact_ids(ids)]
        if cov is not None:
            row.append(f"{100 * cov[layer]:.1f}")
        table.add_row(*row)
    if cov is not None and cov:
        table.caption = f"mean coverage {100 * float(np.mean(list(cov.values()))):.1f}%"
    return table
