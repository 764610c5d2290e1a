"""The shipped evidence study: its presets' design, and the core preset shrunk and run end to end by
`moe-sieve study`, down to the report (claims table and forest plot) rendered in headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from moe_sieve.sweep.config import SweepConfig, expand
from moe_sieve.sweep.study import preset_path

ROOT = Path(__file__).resolve().parents[1]


def test_evidence_presets_design_and_reuse(tmp_path):
    core, full = SweepConfig.from_yaml(preset_path("evidence")), SweepConfig.from_yaml(preset_path("evidence-full"))
    assert [c.name for c in core.conditions] == ["full", "hot-25", "random-25", "attention-only"]
    assert len(core.seeds) >= 8  # the paper's seed count at least
    assert core.metrics[0] == "gold_prob" and "paraphrase_gold_prob" in core.metrics
    assert core.tasks[0].eval.also == {"paraphrase": "facts:{study}/minitasks/facts/paraphrase.jsonl"}
    names = {c.name for c in full.conditions}
    assert {"greedy-25", "hot-2", "hot-8", "routed-D4", "routed-E-hot-25"} <= names
    # the full preset writes into the same study directory with the same settings: the core runs are reused
    assert core.name == full.name and core.seeds == full.seeds
    core_runs = {r.run_id: r.fingerprint for r in expand(core, tmp_path)}
    full_runs = {r.run_id: r.fingerprint for r in expand(full, tmp_path)}
    assert all(full_runs[run_id] == fp for run_id, fp in core_runs.items())


def test_evidence_preset_shrunk_runs_end_to_end(tmp_path):
    data = yaml.safe_load(preset_path("evidence").read_text())
    data["minitasks"]["sizes"] = {"facts_n": 12, "corpus_train_docs": 20, "arith_train": 4, "arith_test": 2}
    data["train"].update(max_steps=3, batch_size=4, micro_batch_size=4, r=2, alpha=4, save_steps=3, logging_steps=1)
    data["eval"]["max_examples"] = 4
    data["seeds"] = [0, 1]
    path = tmp_path / "evidence.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "moe_sieve.cli", "study", "--preset", str(path), "--out", str(out), "--jobs", "2"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and {r["status"] for r in rows} == {"finished"}
    for row in rows:
        assert 0 < float(row["gold_prob"]) < 1 and 0 < float(row["paraphrase_gold_prob"]) < 1
        assert row["converged"] in ("True", "False", "")
        run = json.loads((out / row["run_dir"] / "eval.json").read_text())
        assert run["metrics"]["gold_prob"] == pytest.approx(float(row["gold_prob"]))
        assert run["also"]["paraphrase"]["n"] == 4
    # one comparison and one report per preset metric, the first one the headline
    compare = json.loads((out / "compare.json").read_text())
    assert {r["condition"] for r in compare} == {"full", "hot-25", "random-25", "attention-only"}
    assert all(r["metric"] == "gold_prob" for r in compare)
    assert (out / "compare-paraphrase_gold_prob.json").is_file()
    html = (out / "report.html").read_text()
    assert "claims, as measured here" in html and "at a glance" in html  # claims table and forest plot
    if shutil.which("chromium") is None:
        pytest.skip("needs the Debian package chromium (.ci/run installs it)")
    from PIL import Image

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from screenshot_report import screenshot
    finally:
        sys.path.pop(0)
    png = screenshot(out / "report.html", tmp_path / "shot.png", width=1000, height=2000)
    image = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert len(np.unique(image)) > 50 and (image[:800] < 100).mean() > 0.002


def test_docs_study_python_block_runs(capsys):
    """The Python block of docs/study.md runs as written and prints the seed counts the page states."""
    text = (ROOT / "docs" / "study.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(block, "docs/study.md", "exec"), {})
    seeds = [int(line.split("-> ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()]
    assert seeds == [8, 11, 21, 185]
    assert "It prints 8, 11, 21 and 185 seeds" in text
