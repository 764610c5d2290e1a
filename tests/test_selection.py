import itertools
import json

import numpy as np
import pytest
import torch
from rich.console import Console

from moe_sieve._io import ArtifactExistsError
from moe_sieve.routing_stats import selection_jaccard
from moe_sieve.selection import (
    Selection,
    make_selection,
    select_coverage,
    select_greedy,
    select_random,
    select_topk,
    selection_table,
)


def _coverage_sum(counts_LE, experts):
    """Sum over layers of the share of the layer's counts that the chosen experts receive."""
    total = 0.0
    for row, ids in zip(np.asarray(counts_LE, dtype=float), experts.values(), strict=True):
        if row.sum() > 0:
            total += row[list(ids)].sum() / row.sum()
    return total


def _best_allocation(counts_LE, total_slots, min_per_layer):
    """Brute force: the best sum of top-k coverage over every allocation with the given total."""
    num_layers, num_experts = counts_LE.shape
    best = -1.0
    for alloc in itertools.product(range(min_per_layer, num_experts + 1), repeat=num_layers):
        if sum(alloc) != total_slots:
            continue
        value = 0.0
        for row, k in zip(counts_LE.tolist(), alloc, strict=True):
            if sum(row) > 0:
                value += sum(sorted(row, reverse=True)[:k]) / sum(row)
        best = max(best, value)
    return best


def test_select_topk_ties_and_layer_ids():
    scores_LE = np.array([[1, 3, 3, 2], [0, 0, 5, 5]])
    assert select_topk(scores_LE, 2, layer_ids=[1, 3]) == {1: [1, 2], 3: [2, 3]}
    assert select_topk(torch.tensor(scores_LE), 1) == {0: [1], 1: [2]}
    with pytest.raises(ValueError, match="layer_ids"):
        select_topk(scores_LE, 1, layer_ids=[1])


def test_select_random_seeded():
    a = select_random(4, 16, 4, seed=0)
    assert a == select_random(4, 16, 4, seed=0)
    assert a != select_random(4, 16, 4, seed=1)
    assert list(a) == [0, 1, 2, 3]
    for ids in a.values():
        assert len(set(ids)) == 4 and ids == sorted(ids) and all(0 <= e < 16 for e in ids)
    assert list(select_random([2, 5], 16, 4, seed=0)) == [2, 5]
    # Uniform over experts: across seeds every expert is drawn, none in every draw.
    hits = np.zeros(8)
    for seed in range(200):
        hits[select_random(1, 8, 2, seed)[0]] += 1
    assert hits.min() > 0 and hits.max() < 200
    with pytest.raises(ValueError, match="k=9"):
        select_random(2, 8, 9, seed=0)


@pytest.mark.parametrize("seed", range(8))
def test_greedy_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    num_layers, num_experts = 3, 5
    counts_LE = rng.integers(0, 12, size=(num_layers, num_experts)) * rng.integers(0, 2, size=(num_layers, 1))
    counts_LE[0] = rng.integers(0, 3, size=num_experts)  # small counts: ties within a layer
    for min_per_layer in (0, 1, 2):
        for total_slots in range(num_layers * min_per_layer, num_layers * num_experts + 1):
            experts = select_greedy(counts_LE, total_slots, min_per_layer)
            assert sum(len(ids) for ids in experts.values()) == total_slots
            assert all(len(ids) >= min_per_layer for ids in experts.values())
            expected = _best_allocation(counts_LE, total_slots, min_per_layer)
            assert _coverage_sum(counts_LE, experts) == pytest.approx(expected, abs=1e-12)


def test_greedy_hand_computed():
    # Start: layer 0 {0} (0.8), layer 1 {0} (0.4). Gains 0.1 vs 0.4 -> layer 1; then 0.1 vs 0.1 -> layer 0.
    counts_LE = np.array([[8, 1, 1, 0], [4, 4, 1, 1]])
    assert select_greedy(counts_LE, 3, 1) == {0: [0], 1: [0, 1]}
    assert select_greedy(counts_LE, 4, 1, layer_ids=[2, 6]) == {2: [0, 1], 6: [0, 1]}
    # A layer without tokens gains nothing: everything beyond its minimum goes to the other layer.
    assert select_greedy([[0, 0, 0], [3, 2, 1]], 4, 1) == {0: [0], 1: [0, 1, 2]}


def test_greedy_equal_counts_fills_lower_layers_first():
    # Every gain is 1/4: slots go to layer 0 until it is full (4 experts), then to layer 1.
    counts_LE = np.full((3, 4), 5)
    assert select_greedy(counts_LE, 7, 1) == {0: [0, 1, 2, 3], 1: [0, 1], 2: [0]}
    assert select_greedy(counts_LE, 12, 1) == {i: [0, 1, 2, 3] for i in range(3)}


def test_greedy_rejects_impossible_budgets():
    counts_LE = np.ones((3, 4))
    with pytest.raises(ValueError, match=r"total_slots=5 must lie in \[6, 12\]"):
        select_greedy(counts_LE, 5, 2)
    with pytest.raises(ValueError, match=r"total_slots=13 must lie in \[6, 12\]"):
        select_greedy(counts_LE, 13, 2)
    with pytest.raises(ValueError, match="min_per_layer=5"):
        select_greedy(counts_LE, 12, 5)


def test_coverage_threshold_edges():
    counts_LE = np.array([[6, 2, 1, 1]])  # shares 0.6, 0.8, 0.9, 1.0
    assert select_coverage(counts_LE, 0.6) == {0: [0]}  # hit exactly
    assert select_coverage(counts_LE, 0.8) == {0: [0, 1]}
    assert select_coverage(counts_LE, 0.81) == {0: [0, 1, 2]}
    assert select_coverage(counts_LE, 1.0) == {0: [0, 1, 2, 3]}
    assert select_coverage([[6, 2, 2, 0]], 1.0) == {0: [0, 1, 2]}  # the silent expert is never needed
    # 0.1 + 0.2 = 0.30000000000000004 > 3/10 in floating point; it still counts as reached.
    assert select_coverage([[3, 3, 2, 2]], 0.1 + 0.2) == {0: [0]}
    # Mass-like floats: 0.7 + 0.2 = 0.8999999999999999.
    assert select_coverage([[0.1, 0.2, 0.7]], 0.9) == {0: [1, 2]}
    assert select_coverage([[0, 0, 0], [0, 1, 0]], 0.5, layer_ids=[4, 8]) == {4: [], 8: [1]}
    with pytest.raises(ValueError, match="coverage target"):
        select_coverage(counts_LE, 0.0)


@pytest.mark.parametrize("seed", range(5))
def test_coverage_is_smallest_prefix_reaching_target(seed):
    rng = np.random.default_rng(seed)
    counts_LE = rng.integers(0, 20, size=(4, 8))
    for target in (0.25, 0.5, 0.6, 0.9, 1.0):
        experts = select_coverage(counts_LE, target)
        for row, ids in zip(counts_LE, experts.values(), strict=True):
            desc = sorted(row.tolist(), reverse=True)
            fewest = next(m for m in range(1, 9) if sum(desc[:m]) >= target * sum(desc) - 1e-9)
            assert len(ids) == fewest
            assert row[ids].sum() == sum(desc[:fewest])


COUNTS_LE = np.array([[9, 7, 5, 3, 1, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7], [4, 4, 4, 4, 4, 4, 4, 4]])
MASS_LE = np.array([[1.0, 9.0, 8.0, 0.5, 0.2, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7], [1, 1, 1, 1, 1, 1, 1, 2.0]])


def test_make_selection_topk_and_mass():
    sel = make_selection(COUNTS_LE, MASS_LE, layer_ids=[1, 2, 3], source={"profile": "p"})
    assert sel.experts == {1: [0, 1], 2: [6, 7], 3: [0, 1]}  # 25% of 8 = 2
    assert sel.params == {"strategy": "topk", "rank_by": "count", "k": "25%", "k_resolved": 2}
    assert sel.source == {"profile": "p"}
    by_mass = make_selection(COUNTS_LE, MASS_LE, k=2, rank_by="mass")
    assert by_mass.experts == {0: [1, 2], 1: [6, 7], 2: [0, 7]}
    with pytest.raises(ValueError, match="mass_LE is None"):
        make_selection(COUNTS_LE, None, rank_by="mass")
    with pytest.raises(ValueError, match="unknown strategy 'best'"):
        make_selection(COUNTS_LE, None, strategy="best")
    with pytest.raises(ValueError, match="unknown rank_by"):
        make_selection(COUNTS_LE, None, rank_by="weight")


def test_make_selection_greedy_budget_and_minimum():
    sel = make_selection(COUNTS_LE, None, strategy="greedy", k=4, top_k=2)
    assert sel.params["total_slots"] == 12 and sel.total_slots == 12
    assert sel.params["min_per_layer"] == 2
    assert min(sel.per_layer_k.values()) >= 2
    uniform = make_selection(COUNTS_LE, None, k=4)
    assert _coverage_sum(COUNTS_LE, sel.experts) >= _coverage_sum(COUNTS_LE, uniform.experts) - 1e-12
    assert sel.per_layer_k != uniform.per_layer_k  # the skewed layer 0 gives slots away
    # Without the model's routing width: k // 2; the routing width never exceeds k.
    assert make_selection(COUNTS_LE, None, strategy="greedy", k=4).params["min_per_layer"] == 2
    assert make_selection(COUNTS_LE, None, strategy="greedy", k=1).params["min_per_layer"] == 1
    assert make_selection(COUNTS_LE, None, strategy="greedy", k=3, top_k=6).params["min_per_layer"] == 3
    with pytest.raises(ValueError, match="total_slots"):
        make_selection(COUNTS_LE, None, strategy="greedy", k=2, min_per_layer=3)


def test_make_selection_random_and_coverage():
    sel = make_selection(COUNTS_LE, None, strategy="random", k="50%", seed=3)
    assert sel.params == {"strategy": "random", "rank_by": "count", "k": "50%", "k_resolved": 4, "seed": 3}
    assert sel.experts == select_random(3, 8, 4, seed=3)
    cov = make_selection(COUNTS_LE, MASS_LE, strategy="coverage", coverage=0.6)
    assert cov.params["coverage"] == 0.6
    # Layer 0: 9 + 7 = 16 of 25 = 0.64 -> 2; layer 1: 7 + 6 + 5 = 18 of 28 -> 3; layer 2: 5 of 8 -> 5.
    assert cov.per_layer_k == {0: 2, 1: 3, 2: 5}
    json.dumps(sel.to_json())
    json.dumps(cov.to_json())


def test_selection_round_trip(tmp_path):
    sel = make_selection(COUNTS_LE, MASS_LE, strategy="greedy", k=np.int64(3), layer_ids=[1, 2, 5], top_k=2)
    path = sel.save(tmp_path / "sel.json")
    raw = json.loads(path.read_text())
    assert set(raw["layers"]) == {"1", "2", "5"}
    assert raw["total_slots"] == 9 and raw["per_layer_k"] == {str(i): len(v) for i, v in sel.experts.items()}
    loaded = Selection.load(path)
    assert loaded == sel
    assert selection_jaccard(loaded.experts, sel.experts) == 1.0


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "sel.json"
    Selection({0: [1]}, 4, "topk").save(path)
    with pytest.raises(ArtifactExistsError):
        Selection({0: [2]}, 4, "topk").save(path)
    assert Selection.load(path).experts == {0: [1]}
    Selection({0: [2]}, 4, "topk").save(path, overwrite=True)
    assert Selection.load(path).experts == {0: [2]}


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Selection.load(missing)
    cases = {
        "bad.json": ("{not json", "invalid JSON"),
        "keys.json": (json.dumps({"format_version": 1, "strategy": "topk"}), r"missing keys \['num_experts'"),
        "version.json": (
            json.dumps({"format_version": 9, "num_experts": 4, "strategy": "topk", "layers": {}}),
            "format_version 9",
        ),
        "range.json": (
            json.dumps({"format_version": 1, "num_experts": 4, "strategy": "topk", "layers": {"0": [4]}}),
            r"expert ids \[4\] outside",
        ),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match=message) as err:
            Selection.load(path)
        assert str(path) in str(err.value)


def test_selection_normalises_and_validates():
    sel = Selection({"3": [5, 1], 0: [2]}, 8, "manual")
    assert sel.experts == {0: [2], 3: [1, 5]}
    assert list(sel.experts) == [0, 3]
    assert sel.total_slots == 3 and sel.per_layer_k == {0: 1, 3: 2}
    with pytest.raises(ValueError, match="repeated"):
        Selection({0: [1, 1]}, 8, "manual")


def test_selection_table():
    sel = Selection({0: [0, 1, 2, 5, 7], 4: [3]}, 8, "topk")
    counts_LE = np.array([[1, 1, 1, 0, 0, 1, 0, 1], [1, 0, 0, 3, 0, 0, 0, 0]])
    console = Console(record=True, width=120)
    console.print(selection_table(sel, counts_LE))
    text = console.export_text()
    assert "0-2,5,7" in text
    assert "100.0" in text and "75.0" in text  # layer 4: 3 of 4
    assert "87.5" in text  # mean coverage
    with pytest.raises(ValueError, match="does not fit"):
        selection_table(sel, counts_LE[:1])
    plain = Console(record=True, width=120)
    plain.print(selection_table(sel))
    assert "coverage" not in plain.export_text()


def test_hot_filler_keeps_top_hot_and_fills_from_below_top_k():
    rng = np.random.default_rng(0)
    counts_LE = rng.permuted(np.tile(np.arange(64) * 10 + 1, (16, 1)), axis=1)  # distinct counts, 16 layers x 64
    layer_ids = list(range(1, 33, 2))
    sel = make_selection(counts_LE, strategy="hot+filler", k=16, hot=6, seed=3, layer_ids=layer_ids)
    assert sel.strategy == "hot+filler" and sel.total_slots == 16 * 16
    order_LE = np.argsort(-counts_LE, axis=1)
    for row, layer in enumerate(layer_ids):
        ids = set(sel.experts[layer])
        top6, below16 = set(order_LE[row, :6].tolist()), set(order_LE[row, 16:].tolist())
        fillers = set(sel.params["fillers"][str(layer)])
        assert len(ids) == 16 and top6 <= ids and fillers == ids - top6 and fillers <= below16 and len(fillers) == 10
    assert sel.params | {"fillers": None} == {
        "strategy": "hot+filler",
        "rank_by": "count",
        "k": 16,
        "k_resolved": 16,
        "hot": 6,
        "hot_resolved": 6,
        "fillers_per_layer": 10,
        "filler_pool": "experts ranked below the top-16 by count",
        "seed": 3,
        "fillers": None,
    }
    again = make_selection(counts_LE, strategy="hot+filler", k=16, hot=6, seed=3, layer_ids=layer_ids)
    other = make_selection(counts_LE, strategy="hot+filler", k=16, hot=6, seed=4, layer_ids=layer_ids)
    assert again.experts == sel.experts and other.experts != sel.experts
    half = make_selection(counts_LE, strategy="hot+filler", k="25%", seed=0)
    assert half.params["hot"] is None and half.params["hot_resolved"] == 8 and half.total_slots == 16 * 16
    assert make_selection(counts_LE, strategy="hot+filler", k=16, hot=16).experts == select_topk(counts_LE, 16)


def test_hot_filler_draws_fillers_uniformly_from_the_cold_pool():
    counts_LE = np.arange(1, 13, dtype=float)[None, ::-1].copy()  # expert 0 hottest ... 11 coldest
    picks = np.zeros(12)
    trials = 3000
    for seed in range(trials):
        sel = make_selection(counts_LE, strategy="hot+filler", k=4, hot=2, seed=seed)
        assert sel.experts[0][:2] == [0, 1]
        picks[sel.params["fillers"]["0"]] += 1
    assert picks[:4].sum() == 0  # never the hot pair nor the warm experts ranked 3-4 that top-4 would take
    expected = trials * 2 / 8
    assert np.all(np.abs(picks[4:] - expected) < 5 * np.sqrt(expected))  # 2 of 8 cold experts each time


def test_hot_filler_rejects_impossible_budgets():
    counts_LE = np.arange(8, dtype=float)[None, :]
    with pytest.raises(ValueError, match=r"6 fillers per layer but only 1 experts rank below the top-7"):
        make_selection(counts_LE, strategy="hot+filler", k=7, hot=1)
    with pytest.raises(ValueError, match=r"hot \(5\) <= k \(4\)"):
        make_selection(counts_LE, strategy="hot+filler", k=4, hot=5)


def test_strategies_are_a_registry_that_every_list_derives_from():
    """One registration makes a strategy reachable from make_selection and `train --strategy`; the train list is
    the registry between the two train-level choices (full: every expert, none: no routed expert)."""
    from moe_sieve import selection
    from moe_sieve.training.config import TrainConfig, train_strategies

    assert train_strategies() == ("full", "topk", "random", "greedy", "coverage", "hot+filler", "none")
    assert [s.name for s in selection.STRATEGIES.values() if not s.uses_scores] == ["random"]
    assert [s.name for s in selection.STRATEGIES.values() if not s.uses_k] == ["coverage"]
    fields = set(TrainConfig.__dataclass_fields__)
    assert set(selection.strategy_settings()) <= fields  # every option a strategy reads is a train option

    def coldest(req):  # the k least-routed experts: ties to the lower id, as top-k
        order = np.argsort(req.scores_LE, axis=1, kind="stable")[:, : req.k]
        return {layer: sorted(int(e) for e in order[i]) for i, layer in enumerate(req.layer_ids)}, {"note": "x"}

    selection.register_strategy("coldest", coldest, help="the k coldest experts")
    try:
        sel = make_selection(COUNTS_LE, None, strategy="coldest", k=2)
        assert sel.experts == {0: [5, 6], 1: [0, 1], 2: [0, 1]}
        assert sel.params == {"strategy": "coldest", "rank_by": "count", "k": 2, "k_resolved": 2, "note": "x"}
        assert "coldest" in train_strategies() and "coldest (the k coldest experts)" in selection.strategy_help()
        assert TrainConfig(model="m", data="d", out="o", strategy="coldest").experts_mode == "selected"
        with pytest.raises(ValueError, match="--k"):
            TrainConfig(model="m", data="d", out="o", strategy="coldest", k="0")
    finally:
        del selection.STRATEGIES["coldest"]
    with pytest.raises(ValueError, match="choose one of full, topk, random, greedy, coverage, hot\\+filler, none"):
        TrainConfig(model="m", data="d", out="o", strategy="coldest")
