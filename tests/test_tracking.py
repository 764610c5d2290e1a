"""--report-to: TensorBoard event files, read back with TensorBoard's own EventAccumulator, hold the loss, learning
rate, tokens/s and the run's routing coverage, per layer and mean, equal to a recomputation from the profile."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_sieve.profiling import Profile
from moe_sieve.selection import Selection
from moe_sieve.training import TrainConfig, train
from moe_sieve.training.tracking import check_report_to

from .conftest import build_tiny


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory, byte_tokenizer):
    """A 16-layer tiny OLMoE (routers spread so every expert wins tokens)."""
    model = build_tiny("olmoe", layers=16)
    path = tmp_path_factory.mktemp("deep-olmoe")
    model.save_pretrained(path)
    byte_tokenizer.save_pretrained(path)
    return path


def test_tensorboard_event_files_hold_the_scalars(deep_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "toy.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"copy {a}:", "completion": f" {a}{a}{a}"}) + "\n" for a in range(32))
    )
    out = tmp_path / "run"
    config = TrainConfig(
        model=str(deep_model_dir), data=str(data), out=str(out), batch_size=8, micro_batch_size=8, max_steps=4,
        logging_steps=1, save_steps=4, learning_rate=3e-3, r=4, alpha=8, profile_subsample=0.5, device="cpu",
        warmup=0, k="25%", report_to="tensorboard",
    )  # fmt: skip
    train(config)
    event_files = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert event_files, list(out.rglob("*"))
    acc = EventAccumulator(str(event_files[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/learning_rate", "train/tokens_per_s"):
        assert tag in tags, sorted(tags)
        assert len(acc.Scalars(tag)) >= 3  # logged at (nearly) every step
    assert all(np.isfinite(e.value) for e in acc.Scalars("train/loss"))
    assert all(e.value > 0 for e in acc.Scalars("train/tokens_per_s"))
    # Routing figures: recomputed here from the run's own profile and selection, in float64.
    profile = Profile.load(out / "profile")
    selection = Selection.load(out / "selection.json")
    assert len(profile.layer_ids) == 16
    counts = profile.counts_LE.astype(np.float64)
    expected = {}
    for row, layer in enumerate(profile.layer_ids):
        expected[layer] = counts[row, selection.experts[layer]].sum() / counts[row].sum()
        (event,) = acc.Scalars(f"train/routing/coverage_layer_{layer}")
        assert event.value == pytest.approx(expected[layer], rel=1e-6)
    (mean,) = acc.Scalars("train/routing/coverage_mean")
    assert mean.value == pytest.approx(np.mean(list(expected.values())), rel=1e-6)
    (slots,) = acc.Scalars("train/routing/selected_experts")
    assert slots.value == selection.total_slots
    assert 0 < mean.value < 1


def test_report_to_is_checked_before_any_work():
    check_report_to("none")
    check_report_to("tensorboard")
    with pytest.raises(ValueError, match="--report-to must be one of none, tensorboard, wandb, mlflow"):
        check_report_to("comet")
    for name in ("wandb", "mlflow"):
        import importlib.util

        if importlib.util.find_spec(name) is None:
            with pytest.raises(ValueError, match=f"pip install {name}"):
                check_report_to(name)
