"""The profiling study and the report, built from real profiles of the embedded model on the mini tasks."""

import base64
import csv
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import moe_sieve.modeling
from moe_sieve.cli import app
from moe_sieve.minitasks import SMALL_SIZES, generate_minitasks
from moe_sieve.profiling import Profile, ProfileConfig, run_profile
from moe_sieve.profiling.profile_set import load_profile_set, set_stats
from moe_sieve.report import figures as report_figures
from moe_sieve.report import write_report
from moe_sieve.routing_stats import routing_stats, selection_jaccard
from moe_sieve.selection import Selection, select_topk
from moe_sieve.sweep.gather import COLUMNS as RESULT_COLUMNS
from moe_sieve.sweep.gather import FIELDNAMES

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = list(RESULT_COLUMNS)  # the layout `moe-sieve sweep` writes
PROFILING = {"table2", "heatmaps", "cv_depth", "coverage", "jaccard", "stability", "allocation"}
RESULTS = {"runs", "claims", "forest", "accuracy", "std_ratio", "cost", "budget", "controls"}


def _data_arg(mini):
    return ",".join(
        [
            f"gsm8k:{mini}/arith/train.jsonl",
            f"spider:{mini}/spider/train.jsonl",
            f"hellaswag:{mini}/hellaswag/train.jsonl",
            f"wikitext:{mini}/corpus/train.jsonl",
        ]
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """profiles/ from `moe-sieve profile --data a,b,c,d` on the embedded model, counting model loads."""
    root = tmp_path_factory.mktemp("study")
    mini = root / "mini"
    generate_minitasks(mini, sizes=SMALL_SIZES)
    loads = []
    real = moe_sieve.modeling.load_model

    def counting(spec):
        loads.append(spec.model)
        return real(spec)

    mp = pytest.MonkeyPatch()
    mp.setattr(moe_sieve.modeling, "load_model", counting)
    try:
        res = CliRunner().invoke(
            app,
            ["profile", "--data", _data_arg(mini), "--max-examples", "24", "--out", str(root / "profiles")],
        )
    finally:
        mp.undo()
    assert res.exit_code == 0, res.output
    return {"root": root, "mini": mini, "loads": loads}


def _write_results(path, conditions, seeds=range(5), model="moe-sieve-default", task="arith"):
    rng = np.random.default_rng(0)
    rows = []
    for condition, k, mean, params in conditions:
        for seed in seeds:
            rows.append(
                {
                    "run_id": f"{condition}-s{seed}",
                    "model": model,
                    "task": task,
                    "condition": condition,
                    "k": k,
                    "seed": seed,
                    "status": "done",
                    "accuracy": float(np.clip(mean + 0.02 * rng.standard_normal(), 0, 1)),
                    "trainable_params": params,
                    "adapter_bytes": 4 * params,
                    "wall_time_s": 60 + params / 1e4,
                    "tokens_per_s": 1500,
                    "peak_memory_bytes": 4e8,
                    "final_loss": 0.7,
                }
            )
    rows.append(
        {
            "run_id": "broken",
            "model": model,
            "task": task,
            "condition": conditions[0][0],
            "seed": 99,
            "status": "failed",
            "error": "RuntimeError: out of memory",
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in COLUMNS})


def _sections(html):
    return set(re.findall(r"<section id='([a-z0-9_]+)'>", html))


def test_profile_set_one_model_load_and_same_counts_as_single_profiles(study):
    assert study["loads"] == ["moe-sieve-default"]
    profiles = load_profile_set(study["root"] / "profiles")
    assert list(profiles) == ["gsm8k", "spider", "hellaswag", "wikitext"]
    manifest = json.loads((study["root"] / "profiles" / "profile_set.json").read_text())
    assert [d["name"] for d in manifest["datasets"]] == list(profiles)
    single = run_profile(
        ProfileConfig(
            model="moe-sieve-default", data=f"hellaswag:{study['mini']}/hellaswag/train.jsonl", max_examples=24
        ),
        progress=False,
    )
    np.testing.assert_array_equal(profiles["hellaswag"].counts_LE, single.counts_LE)
    assert profiles["hellaswag"].metadata["model"]["shared_expert_equivalents"] == 0.0


def test_set_stats_match_independent_recomputation(study):
    profiles = load_profile_set(study["root"] / "profiles")
    report = set_stats(profiles, "25%", stability_trials=5)
    (model,) = report["models"]
    per = {name: routing_stats(p.counts_LE, p.mass_LE, k="25%") for name, p in profiles.items()}
    assert model["global_cv"] == pytest.approx(np.mean([s.global_cv for s in per.values()]))
    assert model["layer_cv"] == pytest.approx(np.mean([s.mean_layer_cv for s in per.values()]))
    assert model["ratio"] == pytest.approx(model["layer_cv"] / model["global_cv"])
    assert model["coverage"] == pytest.approx(np.mean([s.coverage_L.mean() for s in per.values()]))
    assert model["cold_fraction"] == pytest.approx(np.mean([s.cold_fraction_L.mean() for s in per.values()]))
    (block,) = report["jaccard"]
    k = per["gsm8k"].k
    tops = {n: select_topk(p.counts_LE, k, p.layer_ids) for n, p in profiles.items()}
    for i, a in enumerate(block["names"]):
        for j, b in enumerate(block["names"]):
            assert block["matrix"][i][j] == pytest.approx(selection_jaccard(tops[a], tops[b]))
    res = CliRunner().invoke(app, ["stats", str(study["root"] / "profiles"), "--json", "--stability-trials", "5"])
    assert res.exit_code == 0, res.output
    cli = json.loads(res.stdout)
    assert cli["jaccard"][0]["matrix"] == block["matrix"] and len(cli["datasets"]) == 4
    res = CliRunner().invoke(app, ["stats", str(study["root"] / "profiles"), "--stability-trials", "0"])
    assert res.exit_code == 0 and "Jaccard across datasets" in res.stdout


def test_hot_filler_select_cli_on_a_real_profile(study, tmp_path):
    prof_dir = study["root"] / "profiles" / "spider"
    out = tmp_path / "sel.json"
    args = ["select", str(prof_dir), "--out", str(out), "--strategy", "hot+filler", "--k", "4", "--hot", "2"]
    res = CliRunner().invoke(app, [*args, "--seed", "5"])
    assert res.exit_code == 0, res.output
    sel = Selection.load(out)
    prof = Profile.load(prof_dir)
    top2 = select_topk(prof.counts_LE, 2, prof.layer_ids)
    top4 = select_topk(prof.counts_LE, 4, prof.layer_ids)
    assert sel.params["hot_resolved"] == 2 and sel.params["seed"] == 5 and sel.total_slots == 4 * len(prof.layer_ids)
    for layer in prof.layer_ids:
        fillers = set(sel.experts[layer]) - set(top2[layer])
        assert set(top2[layer]) <= set(sel.experts[layer]) and not fillers & set(top4[layer])


def test_full_report_has_every_section(study, tmp_path):
    root = tmp_path / "full"
    shutil.copytree(study["root"] / "profiles", root / "profiles")
    _write_results(
        root / "results.csv",
        [
            ("full", 16, 0.50, 400_000),
            ("hot-25%", 4, 0.51, 150_000),
            ("hot-2", 2, 0.45, 120_000),
            ("hot-8", 8, 0.52, 230_000),
            ("random-25%", 4, 0.47, 150_000),
            ("hot+filler-4", 4, 0.49, 150_000),
            ("attention-only", "", 0.44, 90_000),
        ],
    )
    paths = write_report(root, root / "report.html", stability_trials=5)
    html = paths["html"].read_text()
    assert _sections(html) == PROFILING | RESULTS == set(paths["sections"])
    assert "RuntimeError: out of memory" in html and "TOST 2 pp" in html and "hot-25% vs random-25%" in html
    assert "hot-25% vs hot+filler-4" in html
    # self-contained: every image is embedded, nothing is fetched
    assert not re.search(r"<(img|script|link)[^>]+(src|href)=['\"](?!data:)", html)
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(images) == len(paths["figures"]) >= 7
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    md = paths["md"].read_text()
    assert md.count("\n## ") == len(paths["sections"]) and all(p.is_file() for p in paths["figures"])
    for figure in paths["figures"]:
        assert f"]({figure.parent.name}/{figure.name})" in md


def test_sections_without_data_are_left_out(study, tmp_path):
    only_profiles = write_report(study["root"] / "profiles", tmp_path / "p.html", stability_trials=0)
    assert set(only_profiles["sections"]) == PROFILING - {"stability"}

    root = tmp_path / "results-only"
    _write_results(root / "results.csv", [("hot-25%", 4, 0.5, 1000), ("attention-only", "", 0.4, 500)], seeds=[0, 1])
    paths = write_report(root, root / "r.html")
    assert set(paths["sections"]) == {"runs", "claims", "accuracy", "cost"}
    html = paths["html"].read_text()
    assert "No &#x27;full&#x27; condition" in html and "TOST 2 pp" not in html
    # no full, no expert count for the 25% budget, no random/greedy/routed/k sweep: every claim is not testable
    assert html.count("<td class='verdict untestable'>not testable here</td>") == 8
    assert "verdict held" not in html and "verdict not-held" not in html

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing to report"):
        write_report(tmp_path / "empty", tmp_path / "x.html")


def test_report_cli_refuses_to_overwrite(study, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(study["root"] / "profiles", root / "profiles")
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(root), "--stability-trials", "0"])
    assert res.exit_code == 0, res.output
    assert (root / "report.html").is_file() and (root / "report.md").is_file()
    before = (root / "report.html").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        runner.invoke(app, ["report", str(root)], catch_exceptions=False)
    assert (root / "report.html").read_bytes() == before


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs the Debian package chromium (.ci/run installs it)")
def test_report_renders_in_headless_chromium(study, tmp_path):
    from PIL import Image

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from screenshot_report import screenshot
    finally:
        sys.path.pop(0)
    root = tmp_path / "s"
    shutil.copytree(study["root"] / "profiles", root / "profiles")
    _write_results(root / "results.csv", [("full", 16, 0.5, 4000), ("hot-25%", 4, 0.5, 1500), ("hot-8", 8, 0.5, 2000)])
    paths = write_report(root, root / "report.html", stability_trials=5)
    png = screenshot(paths["html"], tmp_path / "shot.png", width=1000, height=2400)
    image = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert image.shape == (2400, 1000)
    # the page drew text, tables and figures: many grey levels, dark ink near the top and further down
    assert len(np.unique(image)) > 50
    assert (image[:600] < 100).mean() > 0.002 and (image[1200:] < 100).mean() > 0.002


def test_run_directories_supply_strategy_k_and_the_greedy_allocation(study, tmp_path):
    from moe_sieve.report.data import load_study
    from moe_sieve.selection import make_selection

    root = tmp_path / "sweep"
    _write_results(root / "results.csv", [("full", "all", 0.5, 4000), ("budget-a", "25%", 0.5, 1500)], seeds=[0, 1])
    prof = Profile.load(study["root"] / "profiles" / "gsm8k")
    greedy = make_selection(prof.counts_LE, strategy="greedy", k="25%", layer_ids=prof.layer_ids, top_k=prof.top_k)
    for seed in (0, 1):
        run = root / "runs" / f"budget-a-s{seed}"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"tool_version": "x", "train": {"strategy": "greedy"}}))
        greedy.save(run / "selection.json")
        shutil.copytree(study["root"] / "profiles" / "gsm8k", run / "profile")
    data = load_study(root)
    infos = {r.row["run_id"]: r for r in data.runs}
    assert (infos["budget-a-s0"].strategy, infos["budget-a-s0"].k) == ("greedy", 4)
    assert (infos["full-s0"].strategy, infos["full-s0"].k) == ("full", None)
    paths = write_report(root, root / "report.html")
    assert "allocation" in paths["sections"]
    html = paths["html"].read_text()
    assert "From the selection of greedy run budget-a-s0." in html
    for layer in prof.layer_ids:
        assert f"<td>{layer}</td><td>4</td>" in html and f"<td>{len(greedy.experts[layer])}</td>" in html


def _write_trace(run_dir, counts_SLE, selected_LE, k_L):
    """A routing trace as the drift monitor writes it, from hand-made counts."""
    from safetensors.numpy import save_file

    from moe_sieve.training.monitor import TRACE_FILE, drift_figures

    figs = [drift_figures(counts_SLE[0], c, selected_LE, k_L) for c in counts_SLE]
    stack = {name: np.stack([f[name] for f in figs]) for name in figs[0]}
    run_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "steps_S": np.arange(len(counts_SLE), dtype=np.int64) * 10,
            "counts_SLE": np.asarray(counts_SLE, dtype=np.int64),
            "selected_SLE": np.repeat(selected_LE[None], len(counts_SLE), 0).astype(np.uint8),
            "top_SLE": stack["top_LE"].astype(np.uint8),
            "coverage_SL": stack["coverage_L"],
            "jaccard_SL": stack["jaccard_L"],
            "kl_SL": stack["kl_L"],
            "became_hot_SL": stack["became_hot_L"],
            "went_cold_SL": stack["went_cold_L"],
            "k_L": np.asarray(k_L, dtype=np.int64),
            "layer_ids_L": np.arange(len(k_L), dtype=np.int64),
        },
        str(run_dir / TRACE_FILE),
    )


def test_drift_section_summarises_the_runs_routing_traces(tmp_path):
    root = tmp_path / "drift"
    _write_results(root / "results.csv", [("hot-25%", 2, 0.5, 1000), ("attention-only", "", 0.4, 500)], seeds=[0, 1])
    rng = np.random.default_rng(0)
    selected_LE = np.zeros((3, 8), dtype=bool)
    selected_LE[:, :2] = True
    expected = {"coverage": [], "jaccard": [], "kl": [], "hot": []}
    for seed in (0, 1):
        counts_SLE = rng.integers(0, 50, size=(4, 3, 8))
        counts_SLE[0, :, :2] += 200  # the selection is hot at step 0, then routing moves away
        _write_trace(root / "runs" / f"hot-25%-s{seed}", counts_SLE, selected_LE, [2, 2, 2])
        last = counts_SLE[-1]
        top_now = np.argsort(-last, axis=1, kind="stable")[:, :2]
        top0 = np.argsort(-counts_SLE[0], axis=1, kind="stable")[:, :2]
        expected["coverage"].append(np.mean(last[:, :2].sum(1) / last.sum(1)))
        expected["jaccard"].append(np.mean([len({0, 1} & set(t)) / len({0, 1} | set(t)) for t in top_now]))
        p = (last + 0.5) / (last + 0.5).sum(1, keepdims=True)
        q = (counts_SLE[0] + 0.5) / (counts_SLE[0] + 0.5).sum(1, keepdims=True)
        expected["kl"].append(np.mean((p * np.log(p / q)).sum(1)))
        expected["hot"].append(sum(len(set(a) - set(b)) for a, b in zip(top_now, top0, strict=True)))
    paths = write_report(root, root / "report.html", root / "report.md")
    assert "drift" in paths["sections"]
    md = paths["md"].read_text()
    row = next(line for line in md.splitlines() if "/ hot-25% |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["2", "30"]
    assert cells[3].endswith(f"{np.mean(expected['coverage']):.3f}")
    assert cells[4:7] == [
        f"{np.mean(expected['jaccard']):.3f}",
        f"{np.mean(expected['kl']):.3f}",
        f"{np.mean(expected['hot']):.1f}",
    ]
    assert "attention-only" not in md.split("## Routing drift")[1].split("![")[0]  # no trace, no row
    assert any(f.name == "routing_drift.png" for f in paths["figures"])


# --- claims, forest plot, learning curves, convergence and the new-user fixes (issue 17) ------------------------


def _exact(rng, n, mean, sd):
    """n values with exactly this sample mean and (ddof=1) std."""
    z = rng.standard_normal(n)
    return mean + sd * (z - z.mean()) / z.std(ddof=1)


def _curve(seed, rate=30.0, steps=range(10, 110, 10)):
    steps = list(steps)
    return {"step": steps, "loss": [float(0.3 + 2 * np.exp(-s / (rate + 3 * seed))) for s in steps]}


def _synthetic_study(root, conditions, seeds, metric="accuracy", model="moe-sieve-default", task="facts"):
    """results.csv + runs/<id>/{config,metrics}.json as a sweep writes them, from hand-made numbers.

    A condition: name, strategy (config.json; None: none written), k, values (one per seed) and optionally
    layers (selection.json's per-layer experts), method/variant, converged (one bool per seed), curve (seed ->
    loss_curve or None), metrics (seed -> extra metrics.json keys), wall (seed -> wall_time_s)."""
    rows = []
    for c in conditions:
        for i, seed in enumerate(seeds):
            if c["values"][i] is None:
                continue
            run_id = f"{model}__{task}__{c['name']}__s{seed}"
            run = root / "runs" / run_id
            run.mkdir(parents=True)
            if c.get("strategy"):
                train = {"strategy": c["strategy"]}
                if c.get("variant"):
                    train.update(method="routed", variant=c["variant"])
                (run / "config.json").write_text(json.dumps({"train": train}))
            wall = c.get("wall", {}).get(seed, 60.0)
            metrics = {"wall_time_s": wall, "tokens_per_s": 1000.0, "trainable_params": 1000, "resumed_from": None}
            curve = c.get("curve", _curve)(seed)
            if curve is not None:
                metrics["loss_curve"] = curve
            converged = c.get("converged", [True] * len(seeds))[i]
            metrics["convergence"] = {
                "converged": converged,
                "rel_drop": 0.0 if converged else 0.08,
                "window": 20,
                "threshold": 0.02,
            }
            metrics.update(c.get("metrics", {}).get(seed, {}))
            (run / "metrics.json").write_text(json.dumps(metrics))
            if c.get("layers") is not None:  # the selection.json keys the report reads
                selection = {"params": {"k_resolved": c["k"]}, "layers": c["layers"]}
                (run / "selection.json").write_text(json.dumps(selection))
            rows.append(
                {
                    "run_id": run_id,
                    "model": model,
                    "task": task,
                    "condition": c["name"],
                    "k": c["k"],
                    "seed": seed,
                    "status": "finished",
                    "accuracy": 0.5,
                    metric: repr(float(c["values"][i])),
                    "trainable_params": 1000,
                    "wall_time_s": wall,
                    "tokens_per_s": 1000.0,
                    "converged": str(converged),
                    "run_dir": f"runs/{run_id}",
                    "method": "routed" if c.get("variant") else "sieve",
                    "variant": c.get("variant", ""),
                }
            )
    root.mkdir(parents=True, exist_ok=True)
    with (root / "results.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(FIELDNAMES))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in FIELDNAMES})
    return root


@pytest.fixture
def captured(monkeypatch):
    """Every matplotlib figure the report draws (still rendered to PNG), to inspect what it shows."""
    figs = []
    real = report_figures._png

    def keep(fig):
        figs.append(fig)
        return real(fig)

    monkeypatch.setattr(report_figures, "_png", keep)
    return figs


def _md_table_rows(md, header_start):
    """The cells of the Markdown table whose header line starts with ``header_start``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


SEEDS6 = list(range(6))


def _roles_study(root):
    """Conditions named so that only their strategy/k tells their role; the truth for the claims test."""
    rng = np.random.default_rng(17)
    full = 0.6 + _exact(rng, 6, 0.0, 0.03)
    hot = full + _exact(rng, 6, 0.003, 0.015)  # +0.3 pp, paired sd 1.5 pp: equivalent at 2 and 3 pp, not at 1
    truth = {
        "baseline": full,
        "sieve": hot,
        "control": hot - _exact(rng, 6, 0.06, 0.01),  # random: 6 pp worse
        "alloc": hot + _exact(rng, 6, 0.002, 0.02),  # greedy: no shown difference
        "small": 0.5 + _exact(rng, 6, 0.0, 0.06),  # top-k at k = 2, 4 (sieve), 8: std falls with k
        "big": 0.6 + _exact(rng, 6, 0.0, 0.01),
        "adapters-d": full - _exact(rng, 6, 0.05, 0.01),  # routed D: 5 pp worse than full
        "sieve-copy": [0.6, 0.61, 0.59, None, None, None],  # a second top-k at k = 4 with fewer seeds
    }
    conditions = [
        {"name": "baseline", "strategy": "full", "k": 16},
        {"name": "sieve", "strategy": "topk", "k": 4, "converged": [True, False, True, True, True, True]},
        {"name": "control", "strategy": "random", "k": 4},
        {"name": "alloc", "strategy": "greedy", "k": 4},
        {"name": "small", "strategy": "topk", "k": 2},
        {"name": "big", "strategy": "topk", "k": 8},
        {"name": "adapters-d", "strategy": "full", "k": 0, "variant": "D"},
        {"name": "sieve-copy", "strategy": "topk", "k": 4},
    ]
    for c in conditions:
        c["values"] = list(truth[c["name"]])
    _synthetic_study(root, conditions, SEEDS6)
    return truth


def test_claims_table_judges_each_claim_by_role_with_independent_numbers(tmp_path):
    from scipy.stats import spearmanr
    from statsmodels.stats.weightstats import ttost_paired

    root = tmp_path / "roles"
    truth = _roles_study(root)
    paths = write_report(root, root / "report.html", reference="baseline")
    assert paths["sections"][:4] == ["runs", "claims", "forest", "accuracy"]
    md = paths["md"].read_text()
    claims = {row[0]: row[1:] for row in _md_table_rows(md, "| claim | verdict |")}
    assert all(verdict in ("held here", "not held here", "not testable here") for verdict, _, _ in claims.values())
    full, hot = truth["baseline"], np.asarray(truth["sieve"])
    for m, expected in ((1, "not held here"), (2, "held here"), (3, "held here")):
        verdict, numbers, why = claims[f"sieve ≈ baseline: equivalent within ±{m} pp (TOST)"]
        p = ttost_paired(hot, full, -m / 100, m / 100)[0]
        assert verdict == expected and (p < 0.05) == (expected == "held here")
        assert f"TOST p = {p:.3f}" in numbers and f"Δ = {100 * (hot - full).mean():+.2f} pp" in numbers
        assert "also fits: sieve-copy; used sieve" in why and "1 run(s) of sieve did not converge (†)" in why
    verdict, numbers, _ = claims["sieve beats control at the same budget (k = 4)"]
    diff = hot - np.asarray(truth["control"])
    half = stats_t_half(diff)
    assert verdict == "held here"
    assert f"[95% CI {100 * (diff.mean() - half):+.2f} pp, {100 * (diff.mean() + half):+.2f} pp]" in numbers
    verdict, _, why = claims["alloc does not beat uniform top-k (sieve) at the same budget (k = 4)"]
    assert verdict == "held here" and "includes 0" in why
    verdict, numbers, _ = claims["sieve's seed std ≤ baseline's"]
    s_hot, s_full = np.std(hot, ddof=1), np.std(full, ddof=1)
    assert verdict == ("held here" if s_hot <= s_full else "not held here")
    assert f"ratio {s_hot / s_full:.2f}" in numbers
    verdict, numbers, _ = claims["k vs variance: the seed std falls as k grows (uniform top-k)"]
    assert verdict == "held here"
    stds = [100 * np.std(truth[name], ddof=1) for name in ("small", "sieve", "big", "baseline")]  # full: k = 16
    rho = spearmanr([2, 4, 8, 16], stds).statistic
    expected = "seed std k = 2: {:.2f} pp, k = 4: {:.2f} pp, k = 8: {:.2f} pp, k = 16: {:.2f} pp".format(*stds)
    assert numbers == f"{expected}; Spearman ρ = {rho:+.2f}" and rho < 0
    verdict, _, why = claims["adapters-d (routed-D) beats MoE-agnostic LoRA (baseline)"]
    assert verdict == "not held here" and why.startswith("baseline is better")
    # the verdicts are coloured in the HTML page
    html = paths["html"].read_text()
    assert html.count("<td class='verdict held'>held here</td>") == sum(v[0] == "held here" for v in claims.values())


def test_greedy_claim_is_not_testable_when_greedy_selects_exactly_the_top_k_experts(tmp_path):
    """The evidence study's case: greedy allocation at the 25% budget picked the uniform top-4 of every layer, so
    its runs were bit-identical to hot-25's; "held" (a CI of exactly 0) would claim a comparison that never ran."""
    rng = np.random.default_rng(5)
    hot = 0.6 + _exact(rng, 4, 0.0, 0.03)
    same, other = {"0": [1, 4, 6, 9], "1": [0, 2, 3, 7]}, {"0": [1, 4, 6, 9], "1": [0, 2, 3, 8]}
    for name, greedy_layers, expected in (("same", same, "not testable here"), ("other", other, "held here")):
        conditions = [
            {"name": "full", "strategy": "full", "k": 16, "values": list(hot + 0.01)},
            {"name": "hot-25", "strategy": "topk", "k": 4, "values": list(hot), "layers": same},
            {"name": "greedy-25", "strategy": "greedy", "k": 4, "values": list(hot), "layers": greedy_layers},
        ]
        root = _synthetic_study(tmp_path / name, conditions, range(4))
        paths = write_report(root, root / "report.html", stability_trials=0)
        claims = {row[0]: row[1:] for row in _md_table_rows(paths["md"].read_text(), "| claim | verdict |")}
        verdict, numbers, why = claims["greedy-25 does not beat uniform top-k (hot-25) at the same budget (k = 4)"]
        assert verdict == expected, (name, why)
        if name == "same":
            assert numbers == "identical selections" and "selects exactly the experts of uniform top-k" in why


def stats_t_half(diff):
    from scipy import stats

    return stats.t.ppf(0.975, len(diff) - 1) * np.std(diff, ddof=1) / np.sqrt(len(diff))


def test_claims_and_tables_in_nats_for_a_lower_is_better_metric(tmp_path):
    rng = np.random.default_rng(3)
    full = 0.9 + _exact(rng, 4, 0.0, 0.05)  # gold NLL per token, nats: lower is better
    conditions = [
        {"name": "full", "strategy": None, "k": 16, "values": list(full)},
        {"name": "hot-25", "strategy": None, "k": 4, "values": list(full + _exact(rng, 4, 0.01, 0.02))},
        {"name": "random-25", "strategy": None, "k": 4, "values": list(full + _exact(rng, 4, 0.3, 0.02))},
    ]
    root = _synthetic_study(tmp_path / "nats", conditions, range(4), metric="gold_nll_per_token")
    res = CliRunner().invoke(
        app, ["report", str(root), "--metric", "gold_nll_per_token", "--margins", "0.05,0.1", "--stability-trials", "0"]
    )
    assert res.exit_code == 0, res.output
    md = (root / "report.md").read_text()
    claims = {row[0]: row[1:] for row in _md_table_rows(md, "| claim | verdict |")}
    verdict, numbers, why = claims["hot-25 beats random-25 at the same budget (k = 4)"]
    assert verdict == "held here" and " nats" in numbers and "better (lower)" in why  # Δ < 0 is better here
    assert claims["hot-25 ≈ full: equivalent within ±0.1 nats (TOST)"][0] == "held here"
    assert claims["greedy allocation does not beat uniform top-k at the same budget"] == [
        "not testable here",
        "–",
        "no condition with strategy greedy",
    ]
    assert claims["routed adapters beat MoE-agnostic LoRA (full)"][0] == "not testable here"
    assert claims["k vs variance: the seed std falls as k grows (uniform top-k)"][0] == "not testable here"
    assert "| Δ (nats) | 95% CI (nats) | t-test p | TOST 0.05 nats | TOST 0.1 nats |" in md and "(pp)" not in md
    with pytest.raises(ValueError, match=r"results.csv: missing column\(s\) bleu"):
        write_report(root, root / "x.html", metric="bleu")


def _ax_with_xlabel(figs, text):
    return next(ax for fig in figs for ax in fig.axes if text in ax.get_xlabel())


def test_forest_plot_draws_each_paired_interval_and_the_tost_margins(tmp_path, captured):
    from scipy import stats

    root = tmp_path / "forest"
    truth = _roles_study(root)
    write_report(root, root / "report.html", reference="baseline", margins=(1, 2, 3))
    ax = _ax_with_xlabel(captured, "difference from baseline (pp)")
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0].startswith("adapters-d") and any(label.startswith("sieve † (n=6)") for label in labels)
    bars = {}
    for container in ax.containers:
        (segment,) = container.lines[2][0].get_segments()
        bars[round(float(segment[0][1]))] = (segment[0][0], segment[1][0])
    by_y = {round(t.get_position()[1]): t.get_text().split(" ")[0] for t in ax.get_yticklabels()}
    for y, (low, high) in bars.items():
        name = by_y[y]
        values = np.array([v for v in truth[name] if v is not None])
        diff = values - truth["baseline"][: len(values)]
        ci = stats.ttest_1samp(diff, 0).confidence_interval(0.95)
        assert (low, high) == (pytest.approx(100 * ci.low), pytest.approx(100 * ci.high)), name
    assert len(bars) == 7
    spans = sorted({round(abs(p.get_x()), 9) for p in ax.patches})
    assert spans == [1, 2, 3]  # one shaded band per margin, dashed lines at ±m
    dashed = sorted({round(abs(line.get_xdata()[0]), 9) for line in ax.lines if line.get_linestyle() == "--"})
    assert dashed == [1, 2, 3]


def test_learning_curves_mean_and_band_over_seeds_with_checkpoint_fallback(tmp_path, captured):
    def from_checkpoints(seed):
        return None  # no loss_curve in metrics.json: the report reads the checkpoints

    conditions = [
        {"name": "full", "strategy": "full", "k": 16, "values": [0.5, 0.6, 0.55]},
        {
            "name": "hot-25",
            "strategy": "topk",
            "k": 4,
            "values": [0.5, 0.55, 0.6],
            "curve": from_checkpoints,
            "converged": [True, False, True],
        },
    ]
    root = _synthetic_study(tmp_path / "curves", conditions, [0, 1, 2])
    expected_hot = []
    for seed in (0, 1, 2):
        run = root / "runs" / f"moe-sieve-default__facts__hot-25__s{seed}"
        if seed == 2:
            continue  # no curve anywhere: named in a note
        curve = _curve(seed, rate=50)
        for step, keep in ((60, 6), (100, 10)):  # an older checkpoint and the newest
            ckpt = run / "checkpoints" / f"checkpoint-{step}"
            ckpt.mkdir(parents=True)
            history = [
                {"step": s, "loss": v, "learning_rate": 1e-3}
                for s, v in zip(curve["step"][:keep], curve["loss"][:keep], strict=True)
            ]
            (ckpt / "trainer_state.json").write_text(
                json.dumps({"log_history": [*history, {"step": step, "train_runtime": 1.0}]})
            )
        expected_hot.append(curve["loss"])
    paths = write_report(root, root / "report.html")
    assert "curves" in paths["sections"]
    assert "1 finished run(s) have no loss curve" in paths["md"].read_text()
    ax = _ax_with_xlabel(captured, "optimizer step")
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"full (n=3)", "hot-25 † (n=2)"}
    full_losses = np.array([_curve(s)["loss"] for s in (0, 1, 2)])
    np.testing.assert_allclose(lines["full (n=3)"].get_ydata(), full_losses.mean(0))
    np.testing.assert_allclose(lines["hot-25 † (n=2)"].get_ydata(), np.mean(expected_hot, 0))
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(full_losses.min()) and band.max() == pytest.approx(full_losses.max())


def test_unconverged_runs_are_marked_in_tables_with_a_note(tmp_path):
    root = tmp_path / "conv"
    _roles_study(root)
    paths = write_report(root, root / "report.html", reference="baseline")
    md = paths["md"].read_text()
    per_condition = {row[2]: row for row in _md_table_rows(md, "| model | task | condition | strategy |")}
    assert per_condition["sieve †"][5] == "6 (1 †)" and per_condition["control"][5] == "6"
    assert "† not converged: 1 run(s)" in md and "sieve: seed(s) 1" in md
    runs = _md_table_rows(md, "| run | condition | seed | rel. drop at end |")
    assert runs == [["moe-sieve-default__facts__sieve__s1", "sieve", "1", "0.0800", "0.0200", "20"]]


def test_resumed_run_without_segments_is_left_out_of_the_time_and_flagged(tmp_path):
    """A resumed run's wall time covers only the steps after the resume unless metrics.json has segments."""
    resumed = {"resumed_from": "runs/x/checkpoints/checkpoint-150"}
    conditions = [
        {
            "name": "full",
            "strategy": "full",
            "k": 16,
            "values": [0.5, 0.5, 0.5],
            "wall": {0: 200.0, 1: 200.0, 2: 200.0},
        },
        {
            "name": "hot-25",
            "strategy": "topk",
            "k": 4,
            "values": [0.5, 0.5, 0.5],
            "wall": {0: 100.0, 1: 140.0, 2: 20.0},
            "metrics": {1: {**resumed, "segments": [{"wall_time_s": 70.0}, {"wall_time_s": 70.0}]}, 2: resumed},
        },
    ]
    root = _synthetic_study(tmp_path / "cost", conditions, [0, 1, 2])
    md = write_report(root, root / "report.html")["md"].read_text()
    cost = {row[2]: row for row in _md_table_rows(md, "| model | task | condition | trainable params |")}
    # mean of 100 and 140 s (the resumed run with segments counts; the one without is left out): 2m 0s, 40% less
    assert cost["hot-25"][5:8] == ["2m 0s ‡", "40.0% ‡", "1,000 ‡"]
    assert cost["full"][5] == "3m 20s"
    assert "‡ 1 resumed run(s) timed only the steps after their resume" in md
    assert "moe-sieve-default__facts__hot-25__s2 (from checkpoint-150)" in md


def test_drift_compares_like_with_like_and_draws_readable_panels(tmp_path, captured):
    from PIL import Image

    root = tmp_path / "drift"
    conditions = [
        {"name": "full", "strategy": "full", "k": 16, "values": [0.5]},
        {"name": "hot-25", "strategy": "topk", "k": 2, "values": [0.5]},
        {"name": "attention-only", "strategy": "none", "k": 0, "values": [0.4]},
    ]
    _synthetic_study(root, conditions, [0])
    rng = np.random.default_rng(0)
    counts_SLE = rng.integers(0, 50, size=(4, 3, 8))
    counts_SLE[:, :, :2] += 400  # routing never changes its top-2: like with like, full's Jaccard is 1 throughout
    for name, selected_LE in (
        ("full", np.ones((3, 8), dtype=bool)),
        ("hot-25", np.eye(8, dtype=bool)[[0, 1]].any(0)[None].repeat(3, 0)),
        ("attention-only", np.zeros((3, 8), dtype=bool)),
    ):
        _write_trace(root / "runs" / f"moe-sieve-default__facts__{name}__s0", counts_SLE, selected_LE, [2, 2, 2])
    paths = write_report(root, root / "report.html")
    md = paths["md"].read_text()
    drift = {row[0].split(" / ")[-1]: row for row in _md_table_rows(md, "| run group | runs |")}
    assert drift["full"][4] == "1.000 (top-k vs step-0 top-k)"  # not 2/8 = 0.25
    assert drift["hot-25"][4] == "1.000" and drift["attention-only"][3:5] == ["–", "–"]
    (png,) = [p for p in paths["figures"] if p.name == "routing_drift.png"]
    width = Image.open(png).size[0]
    assert width <= 1064  # shown at its own size in the 1,100 px page, not shrunk
    fig = next(f for f in captured if any("KL(now" in ax.get_title() for ax in f.axes))
    sizes = [t.get_fontsize() for t in fig.findobj(lambda o: hasattr(o, "get_fontsize") and o.get_text())]
    assert min(sizes) >= 8  # pt at 110 dpi, >= 12 px on screen
    heat = [ax for ax in fig.axes if "KL(now" in ax.get_title()]
    assert len(heat) == 3
    for ax in heat:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "10", "20", "30"]
        assert ax.get_xlim() == (-0.5, 3.5)  # one column per measurement, no empty steps in between
    jaccard_ax = next(ax for ax in fig.axes if ax.get_title().startswith("Jaccard"))
    labels = {line.get_label(): line for line in jaccard_ax.lines}
    full_line = labels["full (top-k vs step-0 top-k)"]  # one model and task: panels name the condition
    assert full_line.get_linestyle() == "--" and np.allclose(full_line.get_ydata(), 1.0)
    assert not any("attention-only" in label for label in labels)


def test_cv_by_depth_has_one_legend_entry_per_dataset(captured):
    report_figures.cv_by_depth(
        ["arith", "sql", "endings"], [[0.5, 0.6], [0.4, 0.3], [0.7, 0.8]], [0.1, 0.2, 0.15], [0, 1]
    )
    (fig,) = captured
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert texts == [
        "arith (global CV 0.10, dashed)",
        "sql (global CV 0.20, dashed)",
        "endings (global CV 0.15, dashed)",
    ]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs the Debian package chromium (.ci/run installs it)")
def test_claims_table_and_forest_plot_render_in_headless_chromium(tmp_path):
    from PIL import Image

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from screenshot_report import screenshot
    finally:
        sys.path.pop(0)
    root = tmp_path / "shot"
    _roles_study(root)
    paths = write_report(root, root / "report.html", reference="baseline")
    html = paths["html"].read_text()
    assert html.index("id='claims'") < html.index("id='forest'") < html.index("id='accuracy'")
    png = screenshot(paths["html"], tmp_path / "shot.png", width=1100, height=2000)
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # the claims table's verdict cells: green "held here" (#e3f4e6) and red "not held here" (#fde8e6)
    held = (abs(r - 0xE3) <= 2) & (abs(g - 0xF4) <= 2) & (abs(b - 0xE6) <= 2)
    not_held = (abs(r - 0xFD) <= 2) & (abs(g - 0xE8) <= 2) & (abs(b - 0xE6) <= 2)
    # the forest plot's innermost TOST band: three overlapping light-green bands
    band = (r > 150) & (g - r > 25) & (abs(r - b) < 6)
    assert held.sum() > 2000 and not_held.sum() > 1000, (held.sum(), not_held.sum())
    assert band.sum() > 5000, band.sum()
    rows_held = np.nonzero(held.sum(1) > 60)[0]  # rows crossing a verdict cell
    rows_band = np.nonzero(band.sum(1) > 10)[0]  # rows crossing the band (and a few of green text)
    assert len(rows_band) > 200 and rows_held.max() < np.median(rows_band)  # the claims table, then the plot


def test_docs_report_commands_run(tmp_path, monkeypatch):
    """The bash block of docs/report.md, on a synthetic study in its paths."""
    import shlex

    rng = np.random.default_rng(8)
    full = 0.8 + _exact(rng, 3, 0.0, 0.02)
    conditions = [
        {"name": "full", "strategy": "full", "k": 16, "values": list(full)},
        {"name": "hot-25", "strategy": "topk", "k": 4, "values": list(full + _exact(rng, 3, -0.01, 0.005))},
    ]
    root = _synthetic_study(tmp_path / "runs" / "study", conditions, range(3), metric="gold_prob")
    with (root / "results.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["gold_logprob"] = repr(float(np.log(float(row["gold_prob"]))))
    with (root / "results.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(FIELDNAMES))
        writer.writeheader()
        writer.writerows(rows)
    text = (ROOT / "docs" / "report.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert len(commands) == 3 and all(c[0] == "moe-sieve" for c in commands)
    monkeypatch.chdir(tmp_path)
    outputs = []
    for command in commands:
        res = CliRunner().invoke(app, command[1:])
        assert res.exit_code == 0, (command, res.output)
        outputs.append(res.stdout)
    hot = next(r for r in json.loads(outputs[1]) if r["condition"] == "hot-25")
    assert hot["unit"] == "nats" and hot["delta"] < 0 and set(hot["tost"]) == {"0.05", "0.1"}
    html = (root / "report.html").read_text()
    assert "id='claims'" in html and "id='forest'" in html and "id='curves'" in html
