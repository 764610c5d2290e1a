import itertools
import json
import math

import numpy as np
import pytest
import torch

from moe_sieve.routing_stats import (
    cold_fraction,
    count_mass_jaccard,
    coverage_at_k,
    global_cv,
    jaccard,
    layer_cv,
    normalized_entropy,
    resolve_k,
    routing_stats,
    selection_jaccard,
    subsample_stability,
    topk_sets,
)

# Layer 0: mean 2, deviations (4, 0, -2, -2) -> var (16 + 0 + 4 + 4) / 4 = 6 -> CV sqrt(6) / 2.
# Layer 1: uniform -> CV 0. Layer 2: no tokens -> 0 by definition.
COUNTS_LE = np.array([[6, 2, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])


def test_layer_cv_hand_computed():
    np.testing.assert_allclose(layer_cv(COUNTS_LE), [math.sqrt(6) / 2, 0.0, 0.0], rtol=1e-12)


def test_global_cv_is_cv_of_expert_totals():
    # Totals over layers (7, 3, 1, 1): mean 3, deviations (4, 0, -2, -2) -> var 6 -> CV sqrt(6) / 3.
    assert global_cv(COUNTS_LE) == pytest.approx(math.sqrt(6) / 3, rel=1e-12)
    # A layer-balanced model can hide per-layer skew: two mirrored layers give a flat global profile.
    mirrored_LE = np.array([[9, 1], [1, 9]])
    assert global_cv(mirrored_LE) == 0.0
    np.testing.assert_allclose(layer_cv(mirrored_LE), [0.8, 0.8])  # mean 5, std 4


def test_cold_fraction_strictly_below_half_uniform_share():
    # Layer 0: threshold 0.5 * 8 / 4 = 1 -> the two zeros are cold -> 0.5. Layer 1: threshold 0.5 -> none.
    np.testing.assert_allclose(cold_fraction(COUNTS_LE), [0.5, 0.0, 0.0])
    # Threshold 0.5 * 8 / 4 = 1: counts equal to it are not cold; [6, 1, 1, 0] has one cold expert.
    np.testing.assert_allclose(cold_fraction([[5, 1, 1, 1], [6, 1, 1, 0]]), [0.0, 0.25])


def test_coverage_at_k_uniform_and_per_layer():
    # [0, 2, 6, 0]: the top expert (id 2) holds 6 of 8; top-2 hold everything.
    assert coverage_at_k([[0, 2, 6, 0]], 1)[0] == 0.75
    assert coverage_at_k([[0, 2, 6, 0]], 2)[0] == 1.0
    # Per-layer k: layer 0 top-1 = 6/8, layer 1 top-3 = (4 + 3 + 2) / 10.
    np.testing.assert_allclose(coverage_at_k([[6, 2, 0, 0], [1, 2, 3, 4]], np.array([1, 3])), [0.75, 0.9])
    assert coverage_at_k([[0, 0, 0]], 2)[0] == 0.0
    with pytest.raises(ValueError, match="k must lie"):
        coverage_at_k([[1, 2]], 3)


def test_normalized_entropy_hand_computed():
    # p = (3/4, 1/4): H = 0.811278... bits; log2(4) = 2 bits -> 0.405639...
    bits = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    np.testing.assert_allclose(normalized_entropy([[6, 2, 0, 0]]), [bits / 2], rtol=1e-12)
    assert bits / 2 == pytest.approx(0.4056390622, abs=1e-9)
    np.testing.assert_allclose(normalized_entropy([[1, 1, 1, 1], [0, 5, 0, 0], [0, 0, 0, 0]]), [1.0, 0.0, 0.0])


def test_topk_sets_break_ties_by_lower_id():
    assert topk_sets([[1, 3, 3, 2]], 1) == [frozenset({1})]
    assert topk_sets([[1, 3, 3, 2]], 3) == [frozenset({1, 2, 3})]
    assert topk_sets([[5, 5, 5, 5], [0, 1, 1, 1]], 2) == [frozenset({0, 1}), frozenset({1, 2})]
    assert topk_sets([[4, 3, 2, 1], [1, 2, 3, 4]], [1, 3]) == [frozenset({0}), frozenset({1, 2, 3})]


def test_jaccard():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5  # 2 shared of 4
    assert jaccard(set(), set()) == 1.0
    assert jaccard({1}, set()) == 0.0


def test_count_mass_jaccard_differs_when_low_weight_routes_dominate_counts():
    # Layer 0: expert 0 is picked most often but with low weight.
    # By count the top-2 is {0, 1}; by mass {1, 2}; Jaccard 1/3. Layer 1 agrees -> 1.
    counts_LE = np.array([[10, 9, 8, 1], [5, 4, 1, 0]])
    mass_LE = np.array([[2.0, 6.0, 5.5, 0.5], [3.0, 2.0, 0.5, 0.0]])
    np.testing.assert_allclose(count_mass_jaccard(counts_LE, mass_LE, 2), [1 / 3, 1.0])
    with pytest.raises(ValueError, match="differ in shape"):
        count_mass_jaccard(counts_LE, mass_LE[:1], 2)


def test_selection_jaccard_mean_over_layers_and_layer_mismatch():
    a = {0: [1, 2], 5: [3]}
    b = {0: [2, 3], 5: [3]}
    assert selection_jaccard(a, b) == pytest.approx((1 / 3 + 1) / 2)
    with pytest.raises(ValueError, match=r"only in the first \[5\], only in the second \[7\]"):
        selection_jaccard(a, {0: [1], 7: [2]})


def test_subsample_stability_identical_examples_is_one():
    rng = np.random.default_rng(1)
    one_LE = rng.integers(0, 50, size=(3, 8))
    stab = subsample_stability(np.stack([one_LE] * 20), 0.1, 2, trials=10, seed=3)
    assert stab.mean == 1.0 and stab.std == 0.0
    assert stab.per_trial == [1.0] * 10
    assert (stab.fraction, stab.trials, stab.seed, stab.k, stab.sample_size) == (0.1, 10, 3, 2, 2)


def test_subsample_stability_reproducible_and_seed_dependent():
    rng = np.random.default_rng(0)
    example_counts_NLE = rng.poisson(rng.gamma(0.7, 3.0, size=(1, 4, 16)), size=(40, 4, 16))
    first = subsample_stability(example_counts_NLE, 0.1, 4, trials=20, seed=7)
    again = subsample_stability(torch.tensor(example_counts_NLE), 0.1, 4, trials=20, seed=7)
    other = subsample_stability(example_counts_NLE, 0.1, 4, trials=20, seed=8)
    assert first.per_trial == again.per_trial
    assert first.per_trial != other.per_trial
    assert 0 < first.mean < 1
    assert first.mean == pytest.approx(np.mean(first.per_trial))
    assert first.std == pytest.approx(np.std(first.per_trial))
    # The whole set, in any order, sums to the full profile.
    assert subsample_stability(example_counts_NLE, 1.0, 4, trials=3).per_trial == [1.0] * 3


def test_subsample_stability_matches_exact_expectation_over_subsets():
    # N = 4 examples, fraction 0.5 -> 2 examples per trial: 6 equally likely subsets, enumerated here.
    rng = np.random.default_rng(5)
    example_counts_NLE = rng.integers(0, 10, size=(4, 2, 5))
    k = 2
    full = [set(np.argsort(-row, kind="stable")[:k]) for row in example_counts_NLE.sum(0)]
    per_subset = []
    for subset in itertools.combinations(range(4), 2):
        summed = example_counts_NLE[list(subset)].sum(0)
        sets = [set(np.argsort(-row, kind="stable")[:k]) for row in summed]
        per_subset.append(np.mean([len(s & f) / len(s | f) for s, f in zip(sets, full, strict=True)]))
    stab = subsample_stability(example_counts_NLE, 0.5, k, trials=3000, seed=0)
    assert stab.sample_size == 2
    assert set(np.round(stab.per_trial, 12)) <= set(np.round(per_subset, 12))
    sigma = np.std(per_subset) / math.sqrt(3000)
    assert abs(stab.mean - np.mean(per_subset)) < 5 * sigma + 1e-12


def test_subsample_stability_reference_and_sample_size():
    # One layer, two experts; example 0 favours expert 0, example 1 expert 1; full sum (3, 1) -> top-1 {0}.
    example_counts_NLE = np.array([[[3, 0]], [[0, 1]]])
    stab = subsample_stability(example_counts_NLE, 0.5, 1, trials=200, seed=0)
    assert set(stab.per_trial) == {0.0, 1.0}
    assert 0.35 < stab.mean < 0.65
    # Against a reference ranked by another signal (mass favouring expert 1) every trial flips.
    flipped = subsample_stability(example_counts_NLE, 0.5, 1, trials=200, seed=0, rank_by_LE=[[0.1, 0.9]])
    assert flipped.per_trial == [1.0 - j for j in stab.per_trial]
    # round-half-up of fraction * N, at least 1.
    ten_NLE = np.ones((10, 1, 2))
    assert subsample_stability(ten_NLE, 0.25, 1, trials=1).sample_size == 3
    assert subsample_stability(ten_NLE, 0.01, 1, trials=1).sample_size == 1
    with pytest.raises(ValueError, match="fraction"):
        subsample_stability(ten_NLE, 0.0, 1)


@pytest.mark.parametrize(
    ("k", "num_experts", "expected"),
    [
        ("25%", 64, 16),
        ("25%", 60, 15),
        (0.25, 64, 16),
        (0.25, 60, 15),
        ("0.25", 64, 16),
        ("16", 64, 16),
        (" 16 ", 64, 16),
        (16, 64, 16),
        (np.int64(8), 64, 8),
        ("100%", 64, 64),
        ("12.5%", 4, 1),  # 0.5 rounds up to 1
        ("37.5%", 4, 2),  # 1.5 rounds up to 2
        (0.3, 5, 2),  # 1.5 despite 0.3 being inexact in binary
        ("1%", 64, 1),  # 0.64 -> 1
        ("0.5%", 64, 1),  # 0.32 -> 0 -> at least 1
    ],
)
def test_resolve_k(k, num_experts, expected):
    assert resolve_k(k, num_experts) == expected


@pytest.mark.parametrize("k", [0, 65, -1, "0", "65", "abc", "", "0%", "150%", "-5%", 1.0, 1.5, -0.2, True, None])
def test_resolve_k_rejects(k):
    with pytest.raises(ValueError) as err:
        resolve_k(k, 64)
    assert repr(k) in str(err.value)
    assert "percentage" in str(err.value)


def _walk_types(obj):
    if isinstance(obj, dict):
        assert all(type(key) is str for key in obj)
        for value in obj.values():
            _walk_types(value)
    elif isinstance(obj, list):
        for value in obj:
            _walk_types(value)
    else:
        assert obj is None or type(obj) in (int, float, str, bool), type(obj)


def test_routing_stats_report():
    counts_LE = np.array([[6, 2, 0, 0], [1, 1, 1, 1]])
    mass_LE = np.array([[1.0, 3.0, 0.0, 0.0], [0.4, 0.3, 0.2, 0.1]])
    stats = routing_stats(torch.tensor(counts_LE), torch.tensor(mass_LE), layer_ids=[3, 7], k=1)
    report = stats.to_json()
    _walk_types(report)
    json.dumps(report)
    expected_keys = {
        "layers", "global_cv", "mean_layer_cv", "ratio", "k", "mean_coverage",
        "mean_cold_fraction", "mean_entropy", "mean_count_mass_jaccard",
    }  # fmt: skip
    assert expected_keys <= set(report)
    assert [row["layer"] for row in report["layers"]] == [3, 7]
    assert report["layers"][0]["routed"] == 8  # routed assignments (tokens x top-k)
    assert report["layers"][0]["cv"] == pytest.approx(math.sqrt(6) / 2)
    assert report["layers"][0]["cold_fraction"] == 0.5
    assert [row["coverage"] for row in report["layers"]] == [0.75, 0.25]
    assert report["layers"][1]["entropy"] == pytest.approx(1.0)
    # Layer 3: count top-1 {0}, mass top-1 {1} -> 0; layer 7: both {0} -> 1.
    assert [row["count_mass_jaccard"] for row in report["layers"]] == [0.0, 1.0]
    assert report["mean_count_mass_jaccard"] == 0.5
    # Totals (7, 3, 1, 1) -> global CV sqrt(6)/3; mean layer CV sqrt(6)/4 -> ratio 3/4.
    assert report["global_cv"] == pytest.approx(math.sqrt(6) / 3)
    assert report["mean_layer_cv"] == pytest.approx(math.sqrt(6) / 4)
    assert report["ratio"] == pytest.approx(0.75)
    assert report["k"] == 1
    assert report["mean_coverage"] == 0.5
    assert report["mean_cold_fraction"] == 0.25


def test_routing_stats_without_mass_and_flat_global_profile():
    report = routing_stats([[9, 1], [1, 9]], k="50%").to_json()
    assert report["k"] == 1
    assert report["global_cv"] == 0.0
    assert report["ratio"] is None
    assert report["mean_count_mass_jaccard"] is None
    assert [row["layer"] for row in report["layers"]] == [0, 1]
    assert all("count_mass_jaccard" not in row for row in report["layers"])
    json.dumps(report)


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="2 dimensions"):
        layer_cv([1, 2, 3])
    with pytest.raises(ValueError, match="negative"):
        layer_cv([[1, -2]])
    with pytest.raises(ValueError, match="layer_ids"):
        routing_stats([[1, 2]], layer_ids=[0, 1], k=1)


def test_coverage_with_shared_reproduces_the_papers_fig2_numbers():
    from moe_sieve.routing_stats import coverage_with_shared

    # §3.2: routed coverage 53.0 / 37.4 / 42.6% -> per-token coverage with shared experts 53 / 69 / 57%
    assert coverage_with_shared(0.530, 0, 8) == pytest.approx(0.530)
    assert round(100 * float(coverage_with_shared(0.374, 4, 4))) == 69
    assert round(100 * float(coverage_with_shared(0.426, 2, 6))) == 57
    with pytest.raises(ValueError):
        coverage_with_shared(0.5, -1, 4)


def test_coverage_curve_and_jaccard_matrix_at_depth():
    from moe_sieve.routing_stats import coverage_curve, jaccard_matrix

    rng = np.random.default_rng(11)
    scores = [rng.gamma(0.5, size=(16, 64)) * 1000 for _ in range(4)]
    curve = coverage_curve(scores[0])
    assert curve.shape == (65,) and curve[0] == 0 and curve[-1] == pytest.approx(1.0)
    assert np.all(np.diff(curve) >= -1e-12)
    for k in (1, 16, 40):
        by_hand = np.mean([np.sort(row)[::-1][:k].sum() / row.sum() for row in scores[0]])
        assert curve[k] == pytest.approx(by_hand, rel=1e-12)
    matrix = jaccard_matrix(scores, 16)
    assert matrix.shape == (4, 4) and np.allclose(matrix, matrix.T) and np.allclose(np.diag(matrix), 1)
    for i in range(4):
        for j in range(4):
            tops = [[set(np.argsort(-s[layer])[:16].tolist()) for layer in range(16)] for s in (scores[i], scores[j])]
            by_hand = np.mean([len(a & b) / len(a | b) for a, b in zip(*tops, strict=True)])
            assert matrix[i, j] == pytest.approx(by_hand)
    with pytest.raises(ValueError, match="different shapes"):
        jaccard_matrix([scores[0], scores[1][:8]], 4)
