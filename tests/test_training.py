import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from moe_sieve._io import ArtifactExistsError
from moe_sieve.profiling import Profile, ProfileMismatchError
from moe_sieve.training import NonFiniteLossError, TrainConfig, train

from .conftest import small_train_config

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """A learnable toy task: repeat a digit three times."""
    rng = random.Random(0)
    rows = []
    for _ in range(64):
        a = rng.randint(0, 9)
        rows.append({"prompt": f"copy {a}:", "completion": f" {a}{a}{a}"})
    path = tmp_path_factory.mktemp("toy") / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(model_dir, data, out, **kw):
    values = dict(
        batch_size=16,
        micro_batch_size=8,
        max_steps=8,
        save_steps=4,
        learning_rate=3e-3,
        dropout=0.05,
        profile_subsample=0.5,
    )
    return small_train_config(model_dir, data, out, **{**values, **kw})


def test_train_end_to_end_loss_falls_and_writes_artifacts(toy_data, tmp_path):
    """On the embedded pretrained model (the tiny random one cannot move its logits far from ln(vocab))."""
    from moe_sieve.demo import default_model_path

    result = train(
        _config(default_model_path(), toy_data, tmp_path / "run", max_steps=24, learning_rate=1e-2, save_steps=12)
    )
    run = tmp_path / "run"
    for name in (
        "profile/profile.safetensors",
        "selection.json",
        "adapter/adapter.safetensors",
        "metrics.json",
        "config.json",
        "data_report.json",
    ):
        assert (run / name).exists(), name
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 24 and m["tokens_per_s"] > 0 and m["peak_memory_bytes"] > 0 and m["wall_time_s"] > 0
    assert m["final_loss"] < 0.25 * m["first_loss"]
    assert m["trainable_params"] == result.metrics["trainable_params"]
    # the checkpoint holds the adapter and optimizer state, not base weights
    ckpt = run / "checkpoints" / "checkpoint-24"
    assert {"adapter.safetensors", "optimizer.pt"} <= {p.name for p in ckpt.iterdir()}
    assert not list(ckpt.glob("model*.safetensors"))
    assert all(
        "lora" in k or k.rsplit(".", 1)[-1] in ("gate_A", "gate_B", "up_A", "up_B", "down_A", "down_B")
        for k in load_file(ckpt / "adapter.safetensors")
    )


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 6:
            raise KeyboardInterrupt


def test_resume_is_exact(tiny_model_dir, toy_data, tmp_path):
    train(_config(tiny_model_dir, toy_data, tmp_path / "full"))
    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_model_dir, toy_data, tmp_path / "cut"), callbacks=[_Interrupt()])
    assert not (tmp_path / "cut" / "metrics.json").exists()
    result = train(_config(tiny_model_dir, toy_data, tmp_path / "cut"), resume=True)
    assert result.metrics["resumed_from"].endswith("checkpoint-4")
    full = load_file(tmp_path / "full" / "adapter" / "adapter.safetensors")
    cut = load_file(tmp_path / "cut" / "adapter" / "adapter.safetensors")
    assert full.keys() == cut.keys()
    for key in full:
        torch.testing.assert_close(cut[key], full[key], rtol=0, atol=0)


@pytest.mark.parametrize("strategy, experts_per_layer", [("full", 16), ("topk", 4), ("random", 4)])
def test_conditions_report_expected_trainable_parameters(
    tiny_model_dir, toy_data, tmp_path, strategy, experts_per_layer
):
    # tiny-olmoe of the fixture: hidden 32, 4 heads, 2 kv heads, 8 experts of width 16, 3 layers: see conftest;
    # here the saved fixture model has 8 experts, so the full condition adapts 8.
    result = train(_config(tiny_model_dir, toy_data, tmp_path / strategy, strategy=strategy, k="25%", max_steps=1))
    r, layers = 4, 3
    attention = r * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32))
    router = r * (32 + 8)
    per_expert = r * 3 * (32 + 16)
    n_experts = 8 if strategy == "full" else 2
    assert result.metrics["trainable_params"] == layers * (attention + router + n_experts * per_expert)
    assert result.metrics["adapted_experts"] == layers * n_experts


def test_gradient_checkpointing_gives_the_same_adapter(tiny_model_dir, toy_data, tmp_path):
    plain = train(_config(tiny_model_dir, toy_data, tmp_path / "plain", max_steps=2, dropout=0.0))
    ckpt = train(
        _config(tiny_model_dir, toy_data, tmp_path / "gc", max_steps=2, dropout=0.0, gradient_checkpointing=True)
    )
    a = load_file(plain.run_dir / "adapter" / "adapter.safetensors")
    b = load_file(ckpt.run_dir / "adapter" / "adapter.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_existing_results_are_not_overwritten(tiny_model_dir, toy_data, tmp_path):
    train(_config(tiny_model_dir, toy_data, tmp_path / "run", max_steps=1))
    before = (tmp_path / "run" / "metrics.json").read_bytes()
    with pytest.raises(ArtifactExistsError, match="--overwrite"):
        train(_config(tiny_model_dir, toy_data, tmp_path / "run", max_steps=1))
    assert (tmp_path / "run" / "metrics.json").read_bytes() == before


def test_bad_rows_empty_data_and_foreign_selection(tiny_model_dir, toy_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        train(_config(tiny_model_dir, bad, tmp_path / "r1"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        train(_config(tiny_model_dir, empty, tmp_path / "r2"))
    foreign = tmp_path / "foreign.json"
    from moe_sieve.selection import Selection

    Selection({0: [1], 1: [2]}, num_experts=16, strategy="topk").save(foreign)
    with pytest.raises(ProfileMismatchError, match="does not fit"):
        train(_config(tiny_model_dir, toy_data, tmp_path / "r3", selection=str(foreign)))
    other = Profile(
        np.ones((2, 16), np.int64),
        np.ones((2, 16), np.float32),
        np.ones((1, 2, 16), np.int32),
        np.ones((1, 2, 16), np.float32),
        np.ones(1, np.int64),
        [0, 1],
        16,
        2,
        {"model": {"id": "other"}},
    )
    other.save(tmp_path / "other-profile")
    with pytest.raises(ProfileMismatchError, match="'other' does not fit"):
        train(_config(tiny_model_dir, toy_data, tmp_path / "r4", profile=str(tmp_path / "other-profile")))


def test_nan_loss_stops_with_step(tiny_model_dir, toy_data, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        train(_config(tiny_model_dir, toy_data, tmp_path / "nan", strategy="full"), model=model)
    assert not (tmp_path / "nan" / "metrics.json").exists()


def test_two_process_ddp_training_and_profiling_match_single_process(tiny_model_dir, toy_data, tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(HERE / "ddp_train.py"),
        str(tiny_model_dir),
        str(toy_data),
        str(tmp_path / "ddp"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 3

    from moe_sieve.training.distributed import profile_distributed

    single = train(
        _config(
            tiny_model_dir,
            toy_data,
            tmp_path / "single",
            batch_size=8,
            micro_batch_size=2,
            max_steps=1,
            profile_subsample=1.0,
        )
    )
    assert single.metrics["steps"] == 1
    two = Profile.load(tmp_path / "ddp" / "profile")
    one = Profile.load(tmp_path / "single" / "profile")
    np.testing.assert_array_equal(two.example_counts_NLE, one.example_counts_NLE)
    np.testing.assert_array_equal(two.counts_LE, one.counts_LE)
    assert callable(profile_distributed)


def test_every_preset_loads_as_a_valid_config():
    from moe_sieve.training.config import PRESET_DIR

    presets = sorted(PRESET_DIR.glob("*.yaml"))
    assert len(presets) >= 6
    for preset in presets:
        config = TrainConfig.from_yaml(preset, out="runs/x")
        assert (config.r, config.alpha, config.dropout, config.batch_size, config.epochs) == (32, 64, 0.05, 64, 3)
        assert config.strategy == "topk" and config.k == "25%"
    by_name = TrainConfig.from_yaml("olmoe-gsm8k", out="o", k="8")
    assert by_name.k == "8" and by_name.data == "gsm8k"
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({"model": "m", "data": "d", "out": "o", "lr": 1})


def test_config_validation_names_the_option():
    with pytest.raises(ValueError, match="--strategy"):
        TrainConfig(model="m", data="d", out="o", strategy="hot")
    with pytest.raises(ValueError, match="multiple of --micro-batch-size"):
        TrainConfig(model="m", data="d", out="o", batch_size=10, micro_batch_size=4)


def test_train_cli(monkeypatch, capsys, tiny_model_dir, toy_data, tmp_path):
    from .test_cli import run_cli

    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "train",
        "--model",
        tiny_model_dir,
        "--data",
        toy_data,
        "--out",
        tmp_path / "cli",
        "--max-steps",
        2,
        "--batch-size",
        8,
        "--micro-batch-size",
        4,
        "--r",
        4,
        "--alpha",
        8,
        "--device",
        "cpu",
        "--strategy",
        "greedy",
        "--targets",
        "attention,experts",
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["strategy"] == "greedy"
    assert metrics["trainable_params_by_group"]["router"] == 0
    code, _, err = run_cli(monkeypatch, capsys, "train", "--data", toy_data)
    assert code == 2 and "--out" in err


def test_config_accepts_hot_filler_strategy():
    from moe_sieve.training.config import TrainConfig

    config = TrainConfig(model="m", data="d", out="o", strategy="hot+filler", k="16", hot="8")
    assert config.experts_mode == "selected" and config.to_json()["hot"] == "8"


def test_train_hot_filler_adapts_top_hot_plus_cold_fillers(tiny_model_dir, toy_data, tmp_path):
    from moe_sieve.profiling import Profile
    from moe_sieve.selection import Selection, select_topk

    out = tmp_path / "filler"
    result = train(_config(tiny_model_dir, toy_data, out, strategy="hot+filler", k="4", hot="1", max_steps=1))
    sel = Selection.load(out / "selection.json")
    prof = Profile.load(out / "profile")
    assert sel.strategy == "hot+filler" and sel.params["hot_resolved"] == 1 and sel.params["seed"] == 0
    top1, top4 = select_topk(prof.counts_LE, 1, prof.layer_ids), select_topk(prof.counts_LE, 4, prof.layer_ids)
    for layer, ids in sel.experts.items():
        assert len(ids) == 4 and set(top1[layer]) <= set(ids) and not (set(ids) - set(top1[layer])) & set(top4[layer])
    assert result.metrics["adapted_experts"] == 3 * 4


class _StopAfterSave(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_resume_from_the_final_step_checkpoint_runs_no_extra_step(tiny_model_dir, toy_data, tmp_path):
    """40 examples / batch 16 = 3 steps per epoch, so step 4 lies inside the second epoch: transformers resumed
    there with one more update (5 steps for --max-steps 4) and a different adapter."""
    kw = dict(max_examples=40, max_steps=4, save_steps=2, scheduler="constant")
    full = train(_config(tiny_model_dir, toy_data, tmp_path / "full", **kw))
    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_model_dir, toy_data, tmp_path / "cut", **kw), callbacks=[_StopAfterSave(4)])
    assert not (tmp_path / "cut" / "adapter").exists()
    result = train(_config(tiny_model_dir, toy_data, tmp_path / "cut", **kw), resume=True)
    assert result.metrics["resumed_from"].endswith("checkpoint-4")
    assert result.metrics["steps"] == full.metrics["steps"] == 4
    a = load_file(tmp_path / "full" / "adapter" / "adapter.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_selection_fingerprint_covers_hot_and_keeps_the_fingerprints_of_runs_without_it(tmp_path):
    """--hot decides hot+filler's experts, so it is part of the selection fingerprint; unset, the fingerprint is
    the one recorded before --hot was covered (config.json of existing runs stays valid)."""
    import dataclasses

    from moe_sieve._io import fingerprint
    from moe_sieve.training.rundir import selection_fingerprint

    before = ("model", "data", "split", "max_examples", "spider_dir", "strategy", "k", "rank_by", "selection")
    before += ("profile", "profile_subsample", "coverage", "min_per_layer", "seed", "max_length")
    config = TrainConfig(model="m", data="d", out=str(tmp_path), strategy="hot+filler", k="8")
    recorded = {name: getattr(config, name) for name in before} | {"selection_content": None, "profile_content": None}
    assert selection_fingerprint(config) == fingerprint(recorded)
    two, three = (dataclasses.replace(config, hot=hot) for hot in ("2", "3"))
    assert len({selection_fingerprint(config), selection_fingerprint(two), selection_fingerprint(three)}) == 3
    from moe_sieve.selection import STRATEGIES
    from moe_sieve.training.rundir import selection_settings

    assert {name for s in STRATEGIES.values() for name in s.settings} <= set(selection_settings())
