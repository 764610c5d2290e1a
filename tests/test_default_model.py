"""The embedded pretrained default model and the demo built on it."""

import json

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_sieve.demo import DEFAULT_MODEL_ALIAS, DemoConfig, default_model_path, run_demo
from moe_sieve.modeling import resolve_model_path
from moe_sieve.profiling import ProfileConfig, run_profile
from moe_sieve.routing_stats import global_cv, layer_cv

pytestmark = pytest.mark.skipif(
    not (default_model_path() / "model.safetensors").exists(), reason="embedded model not built"
)


def test_checkpoint_is_small_and_loads_with_plain_transformers():
    path = default_model_path()
    assert (path / "model.safetensors").stat().st_size <= 20 * 2**20
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "OlmoeForCausalLM"
    assert model.config.router_aux_loss_coef > 0
    ids = tokenizer("Ada has 3 apples.", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == model.config.vocab_size
    assert resolve_model_path(DEFAULT_MODEL_ALIAS) == str(path)
    meta = json.loads((path / "pretrain_config.json").read_text())
    assert meta["args"]["seed"] == 0 and (path / "training_log.json").exists()


def test_routing_is_skewed_per_layer(tmp_path):
    from moe_sieve.minitasks.generate import SMALL_SIZES, generate_minitasks

    generate_minitasks(tmp_path / "mt", seed=0, sizes=SMALL_SIZES)
    profile = run_profile(
        ProfileConfig(
            model=DEFAULT_MODEL_ALIAS,
            data=f"gsm8k:{tmp_path / 'mt' / 'arith'}",
            split="train",
            device="cpu",
            batch_size=16,
        ),
        progress=False,
    )
    assert float(np.mean(layer_cv(profile.counts_LE))) > 2 * global_cv(profile.counts_LE)


def test_demo_runs_end_to_end_small(tmp_path):
    summary = run_demo(
        DemoConfig(out=str(tmp_path / "demo"), profile_examples=32, eval_examples=8, train_steps=3, batch_size=8)
    )
    assert summary["trainable_params"]["hot_25pct"] < summary["trainable_params"]["full"]
    assert (tmp_path / "demo" / "train" / "adapter" / "adapter.safetensors").exists()
    assert 0 <= summary["accuracy"]["after"] <= 1 and summary["accuracy"]["n"] == 8
    with pytest.raises(FileExistsError):
        run_demo(DemoConfig(out=str(tmp_path / "demo")))
