"""Sweeps on the embedded model: validation, resume after a kill, failures recorded, submitit, executors."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml

from moe_sieve.modeling import default_model_path
from moe_sieve.sweep import COLUMNS, SweepConfig, SweepOptions, expand, is_finished, run_one, run_sweep
from moe_sieve.sweep import executors as executors_mod
from moe_sieve.sweep.gather import gather

pytestmark = pytest.mark.skipif(
    not (default_model_path() / "model.safetensors").exists(), reason="embedded model not built"
)

SRC = str(Path(__file__).resolve().parents[1] / "src")
SMALL = {
    "arith_train": 24,
    "arith_validation": 2,
    "arith_test": 4,
    "spider_train": 4,
    "spider_validation": 2,
    "spider_test": 2,
    "hellaswag_train": 4,
    "hellaswag_validation": 2,
    "hellaswag_test": 2,
    "corpus_train_docs": 4,
    "corpus_validation_docs": 1,
}
# Timing and memory differ between two executions of the same run; everything else must not.
VOLATILE = {"wall_time_s", "tokens_per_s", "peak_memory_bytes", "run_wall_time_s"}


def _sweep_dict(conditions=None, seeds=(0, 1)) -> dict:
    return {
        "name": "test",
        "models": ["moe-sieve-default"],
        "tasks": [{"name": "arith", "data": "gsm8k:{study}/minitasks/arith", "eval": {"split": "test"}}],
        "minitasks": {"sizes": SMALL},
        "profiles": {"model": "moe-sieve-default", "data": {"arith": "gsm8k:{study}/minitasks/arith"}},
        "train": {
            "max_steps": 3,
            "batch_size": 2,
            "micro_batch_size": 2,
            "r": 2,
            "alpha": 4,
            "max_length": 96,
            "device": "cpu",
            "save_steps": 1,
            "logging_steps": 1,
            "learning_rate": 1e-2,
            "profile": "{study}/profiles/arith",
        },
        "eval": {"max_examples": 2, "max_new_tokens": 4, "batch_size": 2},
        "conditions": conditions
        or [
            {"name": "hot-25", "train": {"strategy": "topk", "k": "25%"}},
            {"name": "full", "train": {"strategy": "full"}},
        ],
        "seeds": list(seeds),
    }


def _write(tmp_path: Path, data: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _statuses(out: Path) -> list[str]:
    try:
        return [r["status"] for r in json.loads((out / "results.json").read_text())]
    except (OSError, ValueError):
        return []


def _stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in rows]


# --- configuration --------------------------------------------------------------------------------------------


def test_unknown_keys_name_the_file_and_key(tmp_path):
    data = _sweep_dict()
    data["condtions"] = []
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=r"sweep\.yaml: unknown key 'condtions'"):
        SweepConfig.from_yaml(path)
    data = _sweep_dict(conditions=[{"name": "x", "train": {"strategy": "topk", "kk": 3}}])
    with pytest.raises(ValueError, match=r"sweep\.yaml: conditions\[0\]\.train: unknown train option 'kk'"):
        SweepConfig.from_yaml(_write(tmp_path, data))
    data = _sweep_dict(conditions=[{"name": "x", "train": {"seed": 3}}])
    with pytest.raises(ValueError, match="'seed' is set by the sweep"):
        SweepConfig.from_yaml(_write(tmp_path, data))
    data = _sweep_dict(conditions=[{"name": "x", "train": {"strategy": "bogus"}}])
    with pytest.raises(ValueError, match=r"condition 'x'.*--strategy 'bogus'"):
        expand(SweepConfig.from_yaml(_write(tmp_path, data)), tmp_path / "out")
    data = _sweep_dict(conditions=[{"name": "a/b", "train": {}}])
    with pytest.raises(ValueError, match="name 'a/b'"):
        SweepConfig.from_yaml(_write(tmp_path, data))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        SweepConfig.from_yaml(tmp_path / "missing.yaml")


def test_expand_is_deterministic_and_layers_options(tmp_path):
    config = SweepConfig.from_dict(_sweep_dict(), source=str(tmp_path / "s.yaml"))
    runs = expand(config, tmp_path / "out")
    assert [r.run_id for r in runs] == [
        "moe-sieve-default__arith__hot-25__s0",
        "moe-sieve-default__arith__full__s0",
        "moe-sieve-default__arith__hot-25__s1",
        "moe-sieve-default__arith__full__s1",
    ]
    assert [r.run_id for r in expand(config, tmp_path / "out")] == [r.run_id for r in runs]
    hot, full = runs[0], runs[1]
    assert hot.train["strategy"] == "topk" and full.train["strategy"] == "full"
    assert hot.train["max_steps"] == 3 and hot.train["seed"] == 0 and runs[2].train["seed"] == 1
    assert hot.train["profile"] == str(tmp_path / "out" / "profiles" / "arith")
    assert hot.train["out"] == str(tmp_path / "out" / "runs" / hot.run_id)
    assert hot.eval["data"] == hot.train["data"] and hot.eval["max_examples"] == 2
    assert hot.fingerprint != runs[2].fingerprint  # the seed is part of the settings


def test_study_preset_is_the_papers_design():
    from moe_sieve.sweep.study import preset_path

    config = SweepConfig.from_yaml(preset_path("mini"))
    runs = expand(config, "/tmp/study")
    by_condition = {r.condition: r for r in runs}
    assert len(config.seeds) >= 4
    strategies = {name: (r.train["strategy"], tuple(r.train["targets"])) for name, r in by_condition.items()}
    assert strategies["full"][0] == "full" and strategies["hot-25"] == ("topk", strategies["full"][1])
    assert strategies["random-25"][0] == "random" and strategies["attention-only"][1] == ("attention",)
    ks = {r.train["k"] for r in runs if r.train["strategy"] == "topk"}
    assert len(ks) >= 3  # a k sweep
    assert set(config.profiles.data) >= {"arith", "sql", "endings"}


# --- finished means finished ----------------------------------------------------------------------------------


def test_partial_run_is_never_finished(tmp_path):
    config = SweepConfig.from_dict(_sweep_dict(seeds=(0,)), source=str(tmp_path / "s.yaml"))
    spec = expand(config, tmp_path)[0]
    run_dir = tmp_path / "runs" / spec.run_id
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter.safetensors").write_bytes(b"x")
    (run_dir / "metrics.json").write_text("{}")
    assert not is_finished(run_dir, spec)  # no evaluation yet
    (run_dir / "eval.json").write_text('{"accuracy": 0.5, "n": 2, "fingerpr')  # cut short
    assert not is_finished(run_dir, spec)
    (run_dir / "eval.json").write_text(json.dumps({"accuracy": 0.5, "n": 2, "fingerprint": "other"}))
    assert is_finished(run_dir) and not is_finished(run_dir, spec)  # made with other settings
    rows = gather([spec], tmp_path)
    assert rows[0]["status"] == "pending"
    assert list(json.loads((tmp_path / "results.json").read_text())[0])[: len(COLUMNS)] == list(COLUMNS)
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert header[: len(COLUMNS)] == list(COLUMNS)


def test_runs_recorded_with_the_former_fixed_budget_keep_their_status(tmp_path):
    """The sweep used to record max_new_tokens 128 for every task; now it scores each task with its own budget
    (None recorded). An old finished run stays finished where 128 is its task's own budget (GSM8K) and is redone
    where it is not (an LLM-Adapters commonsense set: 32)."""
    import dataclasses

    data = _sweep_dict(seeds=(0,))
    data["eval"] = {"max_examples": 2, "batch_size": 2}
    spec = expand(SweepConfig.from_dict(data, source=str(tmp_path / "s.yaml")), tmp_path)[0]
    assert spec.eval["max_new_tokens"] is None
    run_dir = tmp_path / "runs" / spec.run_id
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter.safetensors").write_bytes(b"x")
    (run_dir / "metrics.json").write_text("{}")
    (run_dir / "eval.json").write_text(json.dumps({"accuracy": 0.5, "n": 2, "fingerprint": "recorded-before"}))
    before = {key: value for key, value in spec.eval.items() if key != "keep_distinct"} | {"max_new_tokens": 128}
    for data_string, finished in (("gsm8k:x.jsonl", True), ("commonsense-boolq:x.json", False)):
        record = {**spec.to_json(), "eval": {**before, "data": data_string}}
        (run_dir / "run.json").write_text(json.dumps(record))
        now = dataclasses.replace(spec, eval={**spec.eval, "data": data_string})
        assert is_finished(run_dir, now) is finished, data_string
        explicit = dataclasses.replace(now, eval={**now.eval, "max_new_tokens": 128})  # asked for 128: same run
        assert is_finished(run_dir, explicit)


def test_local_executor_gives_each_run_one_gpu_or_a_cpu_share(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(executors_mod, "run_worker", lambda run_dir, env, **kw: seen.append((run_dir, env)) or 0)
    monkeypatch.setattr(executors_mod, "_gpu_count", lambda: 2)
    executors_mod.run_local([f"r{i}" for i in range(6)], jobs=2)
    assert {env["CUDA_VISIBLE_DEVICES"] for _, env in seen} == {"0", "1"} and len(seen) == 6
    with pytest.raises(ValueError, match="--jobs 3: only 2 GPUs"):
        executors_mod.run_local(["r"], jobs=3)
    seen.clear()
    monkeypatch.setattr(executors_mod, "_gpu_count", lambda: 0)
    executors_mod.run_local(["a", "b"], jobs=2)
    assert all("CUDA_VISIBLE_DEVICES" not in env and int(env["OMP_NUM_THREADS"]) >= 1 for _, env in seen)


# --- end to end on the embedded model ---------------------------------------------------------------------------


def test_sweep_killed_after_first_run_resumes_without_redoing_it(tmp_path):
    """2 conditions x 2 seeds: kill the sweep once its first run is finished, run it again: the finished run is
    untouched, the rest complete, and the table equals the one of the same runs done without interruption."""
    sweep_yaml = _write(tmp_path, _sweep_dict())
    out = tmp_path / "study"
    config = SweepConfig.from_yaml(sweep_yaml)
    runs = expand(config, out)
    first = out / "runs" / runs[0].run_id
    cmd = [sys.executable, "-m", "moe_sieve.cli", "sweep", str(sweep_yaml), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not (is_finished(first, runs[0]) and _statuses(out)[:1] == ["finished"]):
            assert proc.poll() is None, "the sweep ended before its first run finished"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    marks = {p: p.stat().st_mtime_ns for p in (first / "eval.json", first / "adapter" / "adapter.safetensors")}
    rows = json.loads((out / "results.json").read_text())
    assert rows[0]["status"] == "finished" and sum(r["status"] == "finished" for r in rows) < 4
    time.sleep(1.0)  # the second run's worker dies with the sweep (PR_SET_PDEATHSIG): nothing writes any more
    second_files = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    time.sleep(1.0)
    assert second_files == {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}

    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 already finished, 3 to run" in result.stdout.replace("\n", " ")
    assert marks == {p: p.stat().st_mtime_ns for p in marks}  # not redone
    resumed = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in resumed] == ["finished"] * 4
    assert all(r[c] is not None for r in resumed for c in ("accuracy", "trainable_params", "adapter_bytes", "k"))
    assert [r["k"] for r in resumed] == [4, 16, 4, 16]  # 25% and all of the 16 routed experts
    assert resumed[0]["trainable_params"] < resumed[1]["trainable_params"]

    # the same four runs, uninterrupted, in this process (run_one, the worker's function): the same table
    reference = tmp_path / "reference"
    (reference / "minitasks").parent.mkdir(parents=True)
    os.symlink(out / "minitasks", reference / "minitasks")
    os.symlink(out / "profiles", reference / "profiles")
    ref_runs = expand(config, reference)
    for spec in ref_runs:
        run_one(spec)
    expected = gather(ref_runs, reference)
    assert _stable(resumed) == _stable(expected)
    # running the finished sweep once more does nothing
    again = run_sweep(config, out)
    assert _stable(again) == _stable(resumed) and marks == {p: p.stat().st_mtime_ns for p in marks}

    # the report is produced from this sweep's directory, and renders in headless Chromium where installed
    from moe_sieve.report import write_report

    paths = write_report(out, out / "report.html", out / "report.md", stability_trials=5)
    assert {"runs", "accuracy", "cost"} <= set(paths["sections"])
    html = (out / "report.html").read_text()
    assert all(row["condition"] in html for row in resumed) and "data:image/png;base64," in html
    if shutil.which("chromium"):
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
        try:
            from screenshot_report import screenshot
        finally:
            sys.path.pop(0)
        assert screenshot(paths["html"], tmp_path / "shot.png", width=800, height=1200).stat().st_size > 10_000


def test_failing_run_is_recorded_and_the_rest_go_on(tmp_path):
    conditions = [
        {"name": "broken", "train": {"strategy": "topk", "selection": "{study}/no-such-selection.json"}},
        {"name": "hot-25", "train": {"strategy": "topk"}},
    ]
    sweep_yaml = _write(tmp_path, _sweep_dict(conditions, seeds=(0,)))
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "moe_sieve.cli", "sweep", str(sweep_yaml), "--out", str(out)]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert result.returncode == 1  # not every run finished
    rows = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in rows] == ["failed", "finished"]
    assert "no-such-selection.json" in rows[0]["error"] and rows[0]["accuracy"] is None
    assert "broken__s0: FAILED" in result.stdout.replace("\n", "")
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 3 and ",failed," in csv_rows[1]


def test_submitit_local_executor_runs_a_small_sweep(tmp_path):
    pytest.importorskip("submitit")
    config = SweepConfig.from_dict(
        _sweep_dict([{"name": "hot-25", "train": {"strategy": "topk"}}], seeds=(0, 1)), source=str(tmp_path / "s.yaml")
    )
    out = tmp_path / "study"
    rows = run_sweep(config, out, SweepOptions(executor="submitit", cluster="local", submitit_parameters={}))
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert list((out / "submitit").glob("*_log.out"))  # the jobs went through submitit
    assert all(r["eval_n"] == 2 for r in rows)


# --- the routed-mini preset (issue 11): Routed-PEFT variants as sweep conditions ---------------------------------


def test_routed_mini_preset_is_the_comparison_design():
    from moe_sieve.sweep.study import preset_path

    config = SweepConfig.from_yaml(preset_path("routed-mini"))
    mini = SweepConfig.from_yaml(preset_path("mini"))
    runs = expand(config, "/tmp/study")
    assert len(config.seeds) == 3 and len(runs) == 8 * 3
    t = {r.condition: r.train for r in runs if r.seed == config.seeds[0]}
    assert (t["attention-only"]["strategy"], t["attention-only"]["targets"]) == ("none", ["attention"])
    assert (t["hot-25"]["strategy"], t["hot-25"]["k"], t["full"]["strategy"]) == ("topk", "25%", "full")
    assert all(t[c]["method"] == "sieve" for c in ("attention-only", "hot-25", "full"))
    keys = ("variant", "num_adapters", "top_k_adapters", "strategy")
    routed = {c: tuple(o[k] for k in keys) for c, o in t.items() if o["method"] == "routed"}
    assert routed["routed-S"][0] == "S" and routed["routed-D4"][:2] == ("D", 4)
    assert routed["routed-R4k2"][:3] == ("R", 4, 2)
    assert routed["routed-E"][::3] == ("E", "full") and routed["routed-E-hot-25"][::3] == ("E", "topk")
    assert t["routed-E-hot-25"]["k"] == "25%"
    # sieve conditions keep mini.yaml's rate; routed ones the per-variant rates of the measured sweep (docs/study.md)
    assert {t[c].get("learning_rate", mini.train["learning_rate"]) for c in ("attention-only", "hot-25", "full")} == {
        mini.train["learning_rate"]
    }
    rates = {"routed-S": 5e-3, "routed-D4": 3e-3, "routed-R4k2": 3e-3, "routed-E": 1e-2, "routed-E-hot-25": 1e-2}
    assert {c: t[c]["learning_rate"] for c in rates} == rates
    assert config.train == mini.train and config.eval == mini.eval and config.tasks == mini.tasks


def _shrunk_routed_mini(tmp_path: Path, tasks: list[dict] | None = None) -> list[dict]:
    """The shipped routed-mini preset cut to 2 conditions (sieve hot-25, routed R), 1 seed, 3 steps, run by
    `moe-sieve study`; returns its results rows."""
    from moe_sieve.sweep.study import preset_path

    data = yaml.safe_load(preset_path("routed-mini").read_text())
    data["minitasks"]["sizes"] = SMALL
    data["profiles"]["max_examples"] = 8
    data["train"].update(
        max_steps=3, batch_size=2, micro_batch_size=2, r=2, alpha=4, max_length=96, save_steps=3, logging_steps=1
    )
    data["eval"] = {"max_examples": 2, "max_new_tokens": 4, "batch_size": 2}
    data["tasks"][0]["eval"] = {"split": "test"}
    data["tasks"] = tasks or data["tasks"]
    data["conditions"] = [c for c in data["conditions"] if c["name"] in ("hot-25", "routed-R4k2")]
    data["seeds"] = [0]
    path = _write(tmp_path, data)
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "moe_sieve.cli", "study", "--preset", str(path), "--out", str(out), "--jobs", "1"]
    result = subprocess.run([*cmd, "--reference", "hot-25"], env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    table = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in table] == ["finished"] * 2
    return table


def test_routed_mini_preset_shrunk_runs_end_to_end(tmp_path):
    """The results table has the routed run's columns right, and the report lists it as routed."""
    rows = {r["condition"]: r for r in _shrunk_routed_mini(tmp_path)}
    out = tmp_path / "study"
    hot, routed = rows["hot-25"], rows["routed-R4k2"]
    assert (hot["method"], hot["variant"], hot["k"]) == ("sieve", None, 4)
    assert (routed["method"], routed["variant"], routed["adapter_type"]) == ("routed", "R", "lora")
    assert (routed["num_adapters"], routed["top_k_adapters"], routed["k"]) == (4, 2, 0)  # R adapts no expert
    # R's trainable parameters per MoE layer: N adapters of 2*D*r plus the D x N router (README formula)
    config = json.loads((default_model_path() / "config.json").read_text())
    d, layers, n, r = config["hidden_size"], config["num_hidden_layers"], 4, 2
    assert routed["trainable_params"] == layers * (n * 2 * d * r + d * n)
    assert routed["accuracy"] is not None and routed["adapter_bytes"] > 0
    metrics = json.loads((out / routed["run_dir"] / "metrics.json").read_text())
    assert metrics["method"] == "routed" and metrics["routed"]["config"]["variant"] == "R"
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[: len(COLUMNS)] == list(COLUMNS) and "variant" in header
    assert (out / "report.html").is_file() and "routed-R" in (out / "report.md").read_text()


@pytest.mark.slow  # the pieces are covered fast: math50k loading (test_minitasks), math-gsm8k eval (test_llm_adapters)
def test_routed_mini_on_the_llm_adapters_math_format(tmp_path):
    """The Routed-PEFT pipeline in miniature as a sweep task: train on the Math50K-format file, score the math
    test-set format with LLM-Adapters' rule."""
    folder = "{study}/minitasks/llm-adapters-math"
    task = {"name": "arith-la", "data": f"math50k:{folder}", "train": {"max_length": 192}}  # the Alpaca prompt
    table = _shrunk_routed_mini(tmp_path, [{**task, "eval": {"data": f"math-gsm8k:{folder}"}}])
    assert [(r["metric"], r["eval_n"]) for r in table] == [("accuracy", 2)] * 2
    assert json.loads((tmp_path / "study" / table[1]["run_dir"] / "eval.json").read_text())["task"] == "math-gsm8k"
    assert table[1]["method"] == "routed"


def test_an_unscorable_eval_fails_at_expand_not_after_training(tmp_path):
    data = _sweep_dict(seeds=(0,))
    data["tasks"] = [{"name": "la", "data": "math50k:{study}/x.json"}]  # eval defaults to the training data
    with pytest.raises(ValueError, match=r"task 'la'\.eval: .*math50k is an LLM-Adapters training mix"):
        expand(SweepConfig.from_dict(data, source="s.yaml"), tmp_path)
    data["tasks"][0]["eval"] = {"data": "math-gsm8k"}
    with pytest.raises(ValueError, match="not on the Hugging Face hub; pass math-gsm8k:PATH"):
        expand(SweepConfig.from_dict(data, source="s.yaml"), tmp_path)


# --- hardening round 3 (issue 18): typos fail at expand time, Ctrl-C stops the sweep ----------------------------


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [("k", "abc", "--k 'abc'"), ("learning_rate", "fast", "learning_rate (--learning-rate) must be a number")],
)
def test_a_bad_train_option_fails_when_the_grid_is_expanded(tmp_path, option, value, expected):
    data = _sweep_dict(conditions=[{"name": "ok", "train": {}}, {"name": "bad", "train": {option: value}}])
    config = SweepConfig.from_yaml(_write(tmp_path, data))
    with pytest.raises(ValueError, match=rf"condition 'bad', task 'arith'.*{re.escape(expected)}"):
        expand(config, tmp_path / "study")
    with pytest.raises(ValueError, match=re.escape(expected)):
        run_sweep(config, tmp_path / "study")
    assert not (tmp_path / "study").exists()  # refused before anything is written


_FAKE_WORKER = """
import json, os, sys, time
run_dir = sys.argv[1]
with open(os.path.join(run_dir, "started"), "w") as handle:
    json.dump({"pid": os.getpid(), "sid": os.getsid(0)}, handle)
try:
    time.sleep(60)
except KeyboardInterrupt:  # what pipeline.main does (tested below): record the run as interrupted, exit 130
    with open(os.path.join(run_dir, "error.json"), "w") as handle:
        json.dump({"error": "interrupted", "interrupted": True}, handle)
    sys.exit(130)
"""


def test_ctrl_c_stops_a_local_sweep_and_its_workers(monkeypatch, tmp_path):
    """Two runs at a time, four runs: Ctrl-C while the first two run stops both (each gets one SIGINT and
    records itself interrupted), starts no other run and raises SweepInterrupted in seconds."""
    import threading

    worker = tmp_path / "worker.py"
    worker.write_text(_FAKE_WORKER)
    monkeypatch.setattr(executors_mod, "worker_command", lambda d: [sys.executable, str(worker), str(d)])
    monkeypatch.setattr(executors_mod, "_gpu_count", lambda: 0)
    dirs = [tmp_path / f"r{i}" for i in range(4)]
    for folder in dirs:
        folder.mkdir()

    def press_ctrl_c() -> None:
        deadline = time.monotonic() + 30
        while not all((d / "started").exists() for d in dirs[:2]) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C reaches the sweep process

    done: list[tuple[str, int]] = []
    # Python's own Ctrl-C handler, whatever an earlier test in this process left installed (once, in the full
    # suite on CI, the SIGINT below raised nothing and the fake workers ran to the end)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(executors_mod.SweepInterrupted):
            executors_mod.run_local([str(d) for d in dirs], jobs=2, on_done=lambda d, code: done.append((d, code)))
    finally:
        signal.signal(signal.SIGINT, handler)
    if handler is not signal.default_int_handler:  # say so in the run's summary: another test leaks it
        warnings.warn(f"an earlier test left SIGINT handled by {handler!r}", stacklevel=1)
    assert time.monotonic() - started < 30
    assert sorted(done) == [(str(dirs[0]), 130), (str(dirs[1]), 130)]
    for folder in dirs[:2]:
        info = json.loads((folder / "started").read_text())
        assert info["sid"] != os.getsid(0)  # its own session: a terminal's Ctrl-C reaches it only through the sweep
        with pytest.raises(ProcessLookupError):
            os.kill(info["pid"], 0)  # exited and reaped: no orphan
        assert json.loads((folder / "error.json").read_text())["interrupted"] is True
    assert not [p for d in dirs[2:] for p in d.iterdir()]  # the other runs never started


def test_an_interrupted_worker_records_its_run_as_interrupted(monkeypatch, tmp_path):
    from moe_sieve.sweep import pipeline

    runs = expand(SweepConfig.from_dict(_sweep_dict(seeds=(0,))), tmp_path)
    run_dir = tmp_path / "runs" / runs[0].run_id
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps(runs[0].to_json()))

    def cut(spec):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_one", cut)
    handler = signal.getsignal(signal.SIGINT)
    assert pipeline.main([str(run_dir)]) == 130
    assert signal.getsignal(signal.SIGINT) is handler  # only ignored while the record is written
    record = json.loads((run_dir / "error.json").read_text())
    assert record["interrupted"] is True and "continues it" in record["error"]
    assert [row["status"] for row in gather(runs, tmp_path)] == ["interrupted", "pending"]


@pytest.mark.slow  # two sweep processes and three workers; the fast tests above cover each piece
def test_ctrl_c_on_a_real_sweep_interrupts_it_and_the_rerun_continues(tmp_path):
    conditions = [{"name": "hot-25", "train": {"strategy": "topk", "max_steps": 40}}, {"name": "full", "train": {}}]
    sweep_yaml = _write(tmp_path, _sweep_dict(conditions=conditions, seeds=(0,)))
    out = tmp_path / "study"
    runs = expand(SweepConfig.from_yaml(sweep_yaml), out)
    first, second = (out / "runs" / spec.run_id for spec in runs)
    cmd = [sys.executable, "-m", "moe_sieve.cli", "sweep", str(sweep_yaml), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (first / "checkpoints" / "checkpoint-1" / "moe_sieve_complete.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: the whole foreground group
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    errors = [line for line in err.decode().splitlines() if "Error:" in line]
    assert proc.returncode == 130 and len(errors) == 1, err.decode()[-3000:]
    assert "sweep interrupted: 0 runs finished, 1 interrupted, 1 not started" in errors[0]
    assert f"moe-sieve sweep {sweep_yaml} --out {out}` again" in errors[0]
    assert _statuses(out) == ["interrupted", "pending"] and not (second / "worker.log").exists()

    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _statuses(out) == ["finished", "finished"]
    log = (first / "worker.log").read_text()
    assert "interrupted" in log and "resuming from" in log  # both attempts' logs are kept
    assert (first / "run.json").exists()
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["steps"] == 40 and len(metrics["segments"]) == 2


def test_ctrl_c_in_a_study_names_the_study_command(monkeypatch, tmp_path):
    """An interrupted study says to rerun the study (its preset and --out), not a sweep of a file it never named."""
    from moe_sieve.sweep import runner, study

    preset = _write(tmp_path, _sweep_dict(seeds=(0,)))
    monkeypatch.setattr(runner, "prepare", lambda *args: None)

    def cut(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_local", cut)
    out = tmp_path / "study"
    with pytest.raises(runner.SweepInterrupted, match=rf"`moe-sieve study --preset {preset} --out {out}` again"):
        study.run_study(str(preset), out, log=lambda line: None)
