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
from moe_sieve.report import write_report
from moe_sieve.selection import Selection, select_topk
from moe_sieve.stats import routing_stats, selection_jaccard
from moe_sieve.sweep.gather import COLUMNS as RESULT_COLUMNS

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = list(RESULT_COLUMNS)  # the layout `moe-sieve sweep` writes
PROFILING = {"table2", "heatmaps", "cv_depth", "coverage", "jaccard", "stability", "allocation"}
RESULTS = {"runs", "accuracy", "std_ratio", "cost", "budget", "controls"}


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
    assert set(paths["sections"]) == {"runs", "accuracy", "cost"}
    html = paths["html"].read_text()
    assert "No &#x27;full&#x27; condition" in html and "TOST" not in html

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
