"""The GPU benchmark drivers run end to end at tiny shapes on CPU (their numbers here mean nothing)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def benchmarks(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import lora_step
    import profile_overhead

    return lora_step, profile_overhead


def test_lora_step_tables_and_memory_prediction(benchmarks, tmp_path: Path) -> None:
    lora_step, _ = benchmarks
    md, js = tmp_path / "step.md", tmp_path / "step.json"
    argv = shlex.split(
        "--preset tiny --device cpu --steps 1 --warmup 0 --seq-len 16 --conditions floor-sieve,sieve-hot,sieve-hot+loop"
    )
    argv += ["--profile", "sieve-hot", "--markdown", str(md), "--json", str(js)]
    results = {r["condition"]: r for r in lora_step.main(argv)}
    floor, hot = results["floor-sieve"], results["sieve-hot"]
    for r in (floor, hot):
        assert r["experts_backend"] == "sieve_lora" and r["step_s"] > 0 and r["tokens_per_s"] > 0
        assert 0 < r["experts_act_bytes_pred"] < r["saved_act_bytes_meas"]  # the experts are part of the model
        assert r["mfu"] is None and r["peak_bytes"] is None  # no MFU or peak on CPU: never invented
    # The two conditions differ only in expert LoRA: the measured difference in saved activations is the
    # predicted one (up to routing moved by one optimizer step on the router LoRA).
    measured = hot["saved_act_bytes_meas"] - floor["saved_act_bytes_meas"]
    predicted = hot["experts_act_bytes_pred"] - floor["experts_act_bytes_pred"]
    assert predicted > 0 and abs(measured - predicted) <= 0.05 * predicted
    # CPU's one-op grouped GEMM keeps exactly what the per-expert loop kept for the backward
    assert results["sieve-hot+loop"]["saved_act_bytes_meas"] == hot["saved_act_bytes_meas"]
    text = md.read_text()
    assert "| floor-sieve | sieve_lora |" in text and "| sieve-hot | sieve_lora |" in text
    assert "CPU self time of one `sieve-hot` step" in text and "| GEMM |" in text
    assert json.loads(js.read_text())["results"][1]["condition"] == "sieve-hot"


def test_lora_step_rejects_unknown_condition(benchmarks) -> None:
    lora_step, _ = benchmarks
    with pytest.raises(ValueError, match="--profile"):
        lora_step.main(["--preset", "tiny", "--device", "cpu", "--conditions", "floor", "--profile", "sieve-hot"])


def test_profile_overhead_table(benchmarks, tmp_path: Path) -> None:
    _, profile_overhead = benchmarks
    md = tmp_path / "overhead.md"
    argv = shlex.split("--preset qwen3-tiny --device cpu --batch-size 2 --seq-len 16 --repeats 1") + [
        "--markdown",
        str(md),
    ]
    out = profile_overhead.main(argv)
    assert out["plain_s"] > 0 and out["profiled_s"] > 0
    assert "| profiled |" in md.read_text()


@pytest.mark.slow
def test_gpu_speed_script_smoke_on_cpu(tmp_path: Path) -> None:
    """What a GPU session runs, at tiny shapes (the fast tests above cover both drivers)."""
    env = {**os.environ, "OUT": str(tmp_path), "PRESETS": "tiny", "CONDITIONS": "floor,sieve-hot"}
    subprocess.run([str(ROOT / "scripts" / "gpu_speed.sh"), "--device", "cpu", "--tiny"], check=True, env=env)
    report = (tmp_path / "gpu_speed.md").read_text()
    assert "## tiny: training step" in report and "## tiny: routing-profiling overhead" in report


def test_train_epoch_runs_both_conditions_over_the_same_epoch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import train_epoch

    js = tmp_path / "epoch.json"
    argv = shlex.split("--preset tiny --device cpu --examples 16 --batch-size 4 --micro-batch-size 4")
    results = train_epoch.main([*argv, "--json", str(js)])
    hot, full = results["hot-25%"], results["full"]
    assert hot["steps"] == full["steps"] == 4  # one epoch of 16 examples in batches of 4, for both
    assert 0 < hot["trainable"] < full["trainable"] and hot["epoch_s"] > 0 and full["epoch_s"] > 0
    assert hot["peak_gib"] is None  # no peak memory on CPU: never invented
    saved = json.loads(js.read_text())
    assert saved["full_over_hot"] == pytest.approx(full["epoch_s"] / hot["epoch_s"])
