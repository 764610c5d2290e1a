"""compare-runs statistics checked number by number against scipy and statsmodels on random data."""

import csv
import json

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.weightstats import ttost_paired
from typer.testing import CliRunner

from moe_sieve.cli import app
from moe_sieve.seed_stats import compare_runs_csv, parse_margins

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


# --- any numeric metric, in its unit (issue 17) ---------------------------------------------------------------

METRIC_COLUMNS = [*COLUMNS, "gold_logprob", "gold_prob", "gold_nll_per_token", "converged", "f1_score"]


def _write_metric_csv(path, rows):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in METRIC_COLUMNS})
    return path


def _metric_rows(condition, column, values, converged=None):
    rows = _rows("m", "t", condition, np.zeros(len(values)))
    for row, value, i in zip(rows, values, range(len(values)), strict=True):
        row[column] = repr(float(value))
        if converged is not None:
            row["converged"] = str(converged[i])
    return rows


def test_nats_metric_interval_and_tost_match_statsmodels(tmp_path):
    from statsmodels.stats.weightstats import DescrStatsW

    rng = np.random.default_rng(11)
    ref = rng.uniform(-4.0, -2.5, 8)  # gold_logprob: summed log-probabilities, nats, negative
    cond = ref + _exact(rng, 8, 0.03, 0.05)
    path = _write_metric_csv(
        tmp_path / "r.csv", _metric_rows("full", "gold_logprob", ref) + _metric_rows("hot", "gold_logprob", cond)
    )
    margins = (0.05, 0.1, 0.2)
    result, _ = compare_runs_csv(path, "full", "0.05,0.1,0.2", metric="gold_logprob")
    hot = next(r for r in result if r.condition == "hot")
    diff = cond - ref
    low, high = DescrStatsW(diff).tconfint_mean(alpha=0.05)
    assert hot.unit == "nats" and hot.metric == "gold_logprob"
    assert hot.delta == pytest.approx(diff.mean(), rel=1e-12)  # nats, not x100
    assert (hot.ci_low, hot.ci_high) == (pytest.approx(low, rel=1e-10), pytest.approx(high, rel=1e-10))
    assert hot.delta_pp is None and hot.ci_low_pp is None and hot.ci_high_pp is None
    assert hot.ttest_p == pytest.approx(stats.ttest_rel(cond, ref).pvalue, rel=1e-10)
    verdicts = []
    for m in margins:
        p, (_, p_low, _), (_, p_upp, _) = ttost_paired(cond, ref, -m, m)  # margins in nats, as given
        got = hot.tost[f"{m:g}"]
        assert (got["p"], got["p_lower"], got["p_upper"]) == (
            pytest.approx(p, rel=1e-9),
            pytest.approx(p_low, rel=1e-9),
            pytest.approx(p_upp, rel=1e-9),
        )
        assert got["equivalent"] == (p < 0.05)
        verdicts.append(got["equivalent"])
    assert verdicts == [False, True, True]  # Δ 0.03 nats, seed sd 0.05: 0.05 too tight, 0.1 and 0.2 shown
    # an NLL per token above 1 is a valid nats value (a proportion column would refuse it)
    nll = _write_metric_csv(
        tmp_path / "n.csv",
        _metric_rows("full", "gold_nll_per_token", [1.4, 1.3]) + _metric_rows("hot", "gold_nll_per_token", [1.2, 1.25]),
    )
    (_, hot_nll), _ = compare_runs_csv(nll, "full", "0.1", metric="gold_nll_per_token")
    assert hot_nll.delta == pytest.approx(-0.125) and hot_nll.unit == "nats"


def test_proportions_keep_pp_keys_and_add_unit_neutral_ones(tmp_path):
    rng = np.random.default_rng(2)
    ref = rng.uniform(0.5, 0.9, 5)
    cond = np.clip(ref + rng.normal(0, 0.02, 5), 0, 1)
    path = _write_metric_csv(
        tmp_path / "r.csv", _metric_rows("full", "gold_prob", ref) + _metric_rows("hot", "gold_prob", cond)
    )
    (full, hot), _ = compare_runs_csv(path, "full", "1,2", metric="gold_prob")
    _check_row(hot, cond, ref, (1, 2))  # the pp numbers of accuracy, for gold_prob
    assert hot.unit == "pp" and hot.delta == hot.delta_pp and hot.ci_low == hot.ci_low_pp
    assert hot.ci_high == hot.ci_high_pp and full.delta is None
    with pytest.raises(ValueError, match=r"r2.csv:2: gold_prob 1.2 is outside \[0, 1\] \(gold_prob is a proportion"):
        compare_runs_csv(
            _write_metric_csv(tmp_path / "r2.csv", _metric_rows("full", "gold_prob", [1.2])), metric="gold_prob"
        )
    with pytest.raises(ValueError, match=r"r3.csv:2: gold_logprob '-inf' is not finite"):
        rows = _metric_rows("full", "gold_logprob", [0.0])
        rows[0]["gold_logprob"] = "-inf"
        compare_runs_csv(_write_metric_csv(tmp_path / "r3.csv", rows), metric="gold_logprob")


def test_unknown_column_is_raw_units_unless_unit_is_given(tmp_path):
    ref, cond = np.array([40.0, 55.0, 61.0]), np.array([42.0, 56.0, 64.0])  # e.g. a score out of 100
    path = _write_metric_csv(
        tmp_path / "r.csv", _metric_rows("full", "f1_score", ref) + _metric_rows("hot", "f1_score", cond)
    )
    (_, hot), _ = compare_runs_csv(path, "full", "1,5", metric="f1_score")
    assert hot.unit == "raw" and hot.delta == pytest.approx(2.0) and hot.delta_pp is None
    assert hot.tost["5"]["p"] == pytest.approx(ttost_paired(cond, ref, -5, 5)[0], rel=1e-9)
    with pytest.raises(ValueError, match=r"f1_score 40.0 is outside \[0, 1\]"):
        compare_runs_csv(path, "full", "1", metric="f1_score", unit="pp")
    with pytest.raises(ValueError, match=r"--unit 'percent': expected one of pp, nats, raw"):
        compare_runs_csv(path, "full", "1", metric="f1_score", unit="percent")
    res = CliRunner().invoke(app, ["compare-runs", str(path), "--metric", "f1_score", "--margins", "1,5"])
    assert res.exit_code == 0, res.output
    assert "Note: f1_score is not a registered metric" in res.stderr and "Δ in raw" in res.stdout
    fractions = _write_metric_csv(
        tmp_path / "f.csv", _metric_rows("full", "f1_score", [0.4, 0.5]) + _metric_rows("hot", "f1_score", [0.5, 0.5])
    )
    (_, hot), _ = compare_runs_csv(fractions, "full", "1", metric="f1_score", unit="pp")
    assert hot.unit == "pp" and hot.delta_pp == pytest.approx(5.0)


def test_cli_metric_nats_labels_and_json_units(tmp_path):
    rng = np.random.default_rng(4)
    ref = rng.uniform(-3, -2, 4)
    cond = ref + rng.normal(0.02, 0.03, 4)
    path = _write_metric_csv(
        tmp_path / "results.csv",
        _metric_rows("full", "gold_logprob", ref) + _metric_rows("hot", "gold_logprob", cond),
    )
    runner = CliRunner()
    res = runner.invoke(
        app, ["compare-runs", str(path), "--metric", "gold_logprob", "--margins", "0.05,0.1"], env={"COLUMNS": "250"}
    )
    assert res.exit_code == 0, res.output
    assert "Δ nats [95% CI]" in res.stdout and "TOST 0.05 nats p" in res.stdout and "Δ pp" not in res.stdout
    res = runner.invoke(app, ["compare-runs", str(path), "--metric", "gold_logprob", "--margins", "0.1", "--json"])
    hot = next(r for r in json.loads(res.stdout) if r["condition"] == "hot")
    assert hot["unit"] == "nats" and hot["delta"] == pytest.approx((cond - ref).mean()) and hot["delta_pp"] is None
    assert set(hot) >= {"delta", "ci_low", "ci_high", "unit", "metric", "tost", "unconverged_seeds"}


def test_compare_runs_warns_once_about_unconverged_runs(tmp_path):
    rows = (
        _metric_rows("full", "gold_prob", [0.9, 0.92, 0.91, 0.93], converged=[True, True, True, True])
        + _metric_rows("hot", "gold_prob", [0.85, 0.9, 0.88, 0.9], converged=[False, True, False, True])
        + _metric_rows("random", "gold_prob", [0.7, 0.8, 0.75, 0.8], converged=[True, True, True, False])
    )
    path = _write_metric_csv(tmp_path / "results.csv", rows)
    runner = CliRunner()
    res = runner.invoke(app, ["compare-runs", str(path), "--metric", "gold_prob"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1, res.stderr
    assert "3 run(s) in 2 condition(s) did not converge" in warnings[0]
    assert "hot (2 of 4: seeds 0, 2)" in warnings[0] and "random (1 of 4: seed 3)" in warnings[0]
    assert "full" not in warnings[0].split("(converged=False): ")[1] and "hot †" in res.stdout
    res = runner.invoke(app, ["compare-runs", str(path), "--metric", "gold_prob", "--json"])
    by_condition = {r["condition"]: r for r in json.loads(res.stdout)}
    assert by_condition["hot"]["unconverged_seeds"] == [0, 2] and by_condition["full"]["unconverged_seeds"] == []
    # all converged, or no converged column at all: no warning
    for row in rows:
        row["converged"] = "True"
    quiet = runner.invoke(
        app, ["compare-runs", str(_write_metric_csv(tmp_path / "ok.csv", rows)), "--metric", "gold_prob"]
    )
    assert quiet.exit_code == 0 and "Warning" not in quiet.stderr
    for row in rows:
        row["converged"] = "perhaps"
    with pytest.raises(ValueError, match=r"bad.csv:2: converged 'perhaps' is not True or False"):
        compare_runs_csv(_write_metric_csv(tmp_path / "bad.csv", rows), metric="gold_prob")


def test_gather_writes_likelihood_metrics_and_convergence(tmp_path):
    from moe_sieve.seed_stats import read_runs
    from moe_sieve.sweep.config import RunSpec
    from moe_sieve.sweep.gather import FIELDNAMES, gather

    specs = []
    for seed, converged in ((0, True), (1, False), (2, None)):
        spec = RunSpec(f"m__arith__hot__s{seed}", "m", "arith", "hot", seed, {"strategy": "topk", "k": 4}, {})
        run = tmp_path / "runs" / spec.run_id
        (run / "adapter").mkdir(parents=True)
        (run / "adapter" / "adapter.safetensors").write_bytes(b"x")
        metrics = {"wall_time_s": 10.0, "loss_curve": {"step": [1, 2], "loss": [1.0, 0.5]}}
        if converged is not None:
            metrics["convergence"] = {"converged": converged, "rel_drop": 0.1, "window": 20, "threshold": 0.02}
        (run / "metrics.json").write_text(json.dumps(metrics))
        scores = {"accuracy": 0.5, "gold_logprob": -1.5 - seed, "gold_prob": 0.4, "gold_nll_per_token": 0.3}
        if seed == 0:
            scores.update(result_logprob=-0.2, result_prob=0.8, result_nll_per_token=0.1)
        ev = {"accuracy": 0.5, "n": 10, "fingerprint": spec.fingerprint, "metrics": scores}
        (run / "eval.json").write_text(json.dumps(ev))
        specs.append(spec)
    rows = gather(specs, tmp_path)
    assert [r["converged"] for r in rows] == ["True", "False", None]
    assert rows[0]["result_prob"] == 0.8 and rows[1]["result_prob"] is None and rows[2]["gold_logprob"] == -3.5
    with (tmp_path / "results.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == FIELDNAMES
        table = list(reader)
    assert [r["converged"] for r in table] == ["True", "False", ""]
    runs, skipped = read_runs(tmp_path / "results.csv", "gold_logprob")
    assert [(r.value, r.converged) for r in runs] == [(-1.5, True), (-2.5, False), (-3.5, None)] and skipped == 0
    runs, skipped = read_runs(tmp_path / "results.csv", "result_logprob")
    assert len(runs) == 1 and skipped == 2


def test_further_evaluation_columns_take_their_metrics_unit():
    """A sweep's eval.also columns (NAME_METRIC) are read in METRIC's unit, not as unknown raw columns."""
    from moe_sieve.seed_stats import metric_info

    assert metric_info("paraphrase_gold_prob").unit.name == "pp"
    assert metric_info("paraphrase_gold_nll_per_token").unit.name == "nats"
    assert metric_info("paraphrase_gold_nll_per_token").higher_is_better is False
    assert metric_info("paraphrase_accuracy_norm").help == metric_info("accuracy_norm").help
    assert metric_info("gold_probability").registered is False
