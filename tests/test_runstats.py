"""compare-runs statistics checked number by number against scipy and statsmodels on random data."""

import csv
import json

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.weightstats import ttost_paired
from typer.testing import CliRunner

from moe_sieve.cli import app
from moe_sieve.runstats import compare_runs_csv, parse_margins

COLUMNS = ["run_id", "model", "task", "condition", "k", "seed", "status", "error", "accuracy"]


def _write_csv(path, rows):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in COLUMNS})
    return path


def _rows(model, task, condition, values, seeds=None):
    seeds = range(len(values)) if seeds is None else seeds
    return [
        {
            "run_id": f"{model}-{task}-{condition}-s{s}",
            "model": model,
            "task": task,
            "condition": condition,
            "seed": s,
            "status": "ok",
            "accuracy": repr(float(v)),
        }
        for s, v in zip(seeds, values, strict=True)
    ]


def _exact(rng, n, mean, sd):
    """n values with exactly this sample mean and (ddof=1) std."""
    z = rng.standard_normal(n)
    z = (z - z.mean()) / z.std(ddof=1)
    return mean + sd * z


def _check_row(row, cond, ref, margins, alpha=0.05):
    """Every paired number of ``row`` against scipy / statsmodels on the same seeds."""
    diff = cond - ref
    n = len(diff)
    assert row.n_paired == n
    assert row.delta_pp == pytest.approx(100 * diff.mean(), rel=1e-12, abs=1e-12)
    half = stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / np.sqrt(n)
    assert row.ci_low_pp == pytest.approx(100 * (diff.mean() - half), rel=1e-10)
    assert row.ci_high_pp == pytest.approx(100 * (diff.mean() + half), rel=1e-10)
    assert row.ttest_p == pytest.approx(stats.ttest_rel(cond, ref).pvalue, rel=1e-10)
    for m in margins:
        p, (_, p_low, _), (_, p_upp, _) = ttost_paired(cond, ref, -m / 100, m / 100)
        got = row.tost[f"{m:g}"]
        assert got["p"] == pytest.approx(p, rel=1e-9)
        assert got["p_lower"] == pytest.approx(p_low, rel=1e-9)
        assert got["p_upper"] == pytest.approx(p_upp, rel=1e-9)
        assert got["equivalent"] == (p < alpha)


def test_random_data_matches_scipy_and_statsmodels(tmp_path):
    rng = np.random.default_rng(1234)
    rows, truth = [], {}
    for model in ("olmoe", "qwen"):
        for task in ("gsm8k", "spider"):
            base = rng.uniform(0.2, 0.8)
            for condition, shift, sd in (("full", 0, 0.02), ("hot-16", 0.003, 0.012), ("random-16", -0.02, 0.03)):
                values = np.clip(base + shift + sd * rng.standard_normal(8), 0, 1)
                truth[model, task, condition] = values
                rows += _rows(model, task, condition, values)
    result, skipped = compare_runs_csv(_write_csv(tmp_path / "r.csv", rows), "full", "1,2,3")
    assert skipped == 0
    assert len(result) == 12
    for row in result:
        values = truth[row.model, row.task, row.condition]
        assert row.n == 8 and row.seeds == list(range(8))
        assert row.mean == pytest.approx(values.mean(), rel=1e-12)
        assert row.std == pytest.approx(np.std(values, ddof=1), rel=1e-12)
        if row.condition == "full":
            assert row.delta_pp is None and row.tost == {} and row.std_ratio is None
            continue
        ref = truth[row.model, row.task, "full"]
        _check_row(row, values, ref, (1, 2, 3))
        assert row.std_ratio == pytest.approx(np.std(values, ddof=1) / np.std(ref, ddof=1), rel=1e-12)


def test_tost_passes_at_3pp_and_fails_at_1pp(tmp_path):
    rng = np.random.default_rng(7)
    ref = rng.uniform(0.40, 0.45, 8)
    cond = ref + _exact(rng, 8, 0.005, 0.012)  # +0.5 pp, per-seed sd 1.2 pp: 90% CI about [-0.3, 1.3] pp
    path = _write_csv(tmp_path / "r.csv", _rows("m", "t", "full", ref) + _rows("m", "t", "hot", cond))
    result, _ = compare_runs_csv(path, "full", [1, 3])
    hot = next(r for r in result if r.condition == "hot")
    _check_row(hot, cond, ref, (1, 3))
    assert hot.tost["3"]["equivalent"] is True
    assert hot.tost["1"]["equivalent"] is False
    assert ttost_paired(cond, ref, -0.03, 0.03)[0] < 0.05 < ttost_paired(cond, ref, -0.01, 0.01)[0]


def test_seeds_pair_by_value_and_missing_ones_are_counted(tmp_path):
    rng = np.random.default_rng(3)
    ref = rng.uniform(0.3, 0.6, 6)  # seeds 0..5
    cond = rng.uniform(0.3, 0.6, 5)  # seeds 2..6 (listed in another order)
    cond_seeds = [6, 2, 5, 3, 4]
    rows = _rows("m", "t", "full", ref) + _rows("m", "t", "hot", cond, cond_seeds)
    rows.append({"model": "m", "task": "t", "condition": "hot", "seed": 9, "status": "failed", "accuracy": ""})
    result, skipped = compare_runs_csv(_write_csv(tmp_path / "r.csv", rows), "full", "2")
    assert skipped == 1
    hot = next(r for r in result if r.condition == "hot")
    assert hot.n == 5 and hot.seeds == [2, 3, 4, 5, 6]
    assert hot.unpaired_seeds == [0, 1, 6]
    by_seed = dict(zip(cond_seeds, cond, strict=True))
    common = [2, 3, 4, 5]
    _check_row(hot, np.array([by_seed[s] for s in common]), ref[common], (2,))


def test_single_pair_and_absent_reference(tmp_path):
    rows = _rows("m", "t", "full", [0.5]) + _rows("m", "t", "hot", [0.52]) + _rows("m", "u", "hot", [0.4, 0.45])
    result, _ = compare_runs_csv(_write_csv(tmp_path / "r.csv", rows), "full", "2")
    hot_t = next(r for r in result if (r.task, r.condition) == ("t", "hot"))
    assert hot_t.delta_pp == pytest.approx(2.0) and hot_t.ci_low_pp is None and hot_t.tost == {}
    hot_u = next(r for r in result if (r.task, r.condition) == ("u", "hot"))
    assert hot_u.n_paired is None and hot_u.delta_pp is None and hot_u.std == pytest.approx(np.std([0.4, 0.45], ddof=1))


def test_input_errors_name_file_row_and_argument(tmp_path):
    good = _rows("m", "t", "full", [0.5, 0.6])
    with pytest.raises(ValueError, match=r"--reference 'base' is not a condition"):
        compare_runs_csv(_write_csv(tmp_path / "a.csv", good), "base")
    with pytest.raises(ValueError, match=r"b.csv:3: model 'm', task 't', condition 'full', seed 0 already appears"):
        compare_runs_csv(_write_csv(tmp_path / "b.csv", good[:1] * 2))
    with pytest.raises(ValueError, match=r"c.csv:2: accuracy 57.0 is outside \[0, 1\]"):
        compare_runs_csv(_write_csv(tmp_path / "c.csv", [dict(good[0], accuracy="57.0")]))
    with pytest.raises(ValueError, match=r"d.csv: missing column\(s\) f1"):
        compare_runs_csv(_write_csv(tmp_path / "d.csv", good), metric="f1")
    with pytest.raises(ValueError, match=r"--margins: 'x'"):
        parse_margins("1,x")
    with pytest.raises(FileNotFoundError, match="nope.csv not found"):
        compare_runs_csv(tmp_path / "nope.csv")


def test_cli_json_and_table(tmp_path):
    rng = np.random.default_rng(5)
    ref = rng.uniform(0.4, 0.5, 4)
    cond = ref + rng.normal(0, 0.01, 4)
    path = _write_csv(tmp_path / "results.csv", _rows("m", "t", "full", ref) + _rows("m", "t", "hot", cond))
    runner = CliRunner()
    res = runner.invoke(app, ["compare-runs", str(path), "--reference", "full", "--margins", "1,2,3", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    hot = next(r for r in rows if r["condition"] == "hot")
    assert set(hot) >= {"model", "task", "condition", "n", "mean", "std", "delta_pp", "ci_low_pp", "ci_high_pp"}
    assert set(hot["tost"]) == {"1", "2", "3"} and set(hot["tost"]["2"]) >= {"p", "equivalent"}
    assert hot["ttest_p"] == pytest.approx(stats.ttest_rel(cond, ref).pvalue, rel=1e-10)
    assert hot["std_ratio"] == pytest.approx(np.std(cond, ddof=1) / np.std(ref, ddof=1))
    res = runner.invoke(app, ["compare-runs", str(path)])
    assert res.exit_code == 0, res.output
    assert "hot" in res.stdout and "TOST" in res.stdout
