"""The routing drift monitor against an independent numpy recomputation from the model's own router logits."""

import json
import random

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.numpy import load_file
from scipy.stats import entropy
from transformers import TrainerCallback

from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora
from moe_sieve.data.calibration import make_batches, tokenize_example
from moe_sieve.data.tasks import Example
from moe_sieve.training.monitor import KL_SMOOTHING, TRACE_FILE, DriftMonitor, plot_drift, profile_counts

from .conftest import small_train_config

LAYERS, EXPERTS, TOP_K = 16, 32, 4


def _deep_model(seed=0):
    torch.manual_seed(seed)
    config = tf.OlmoeConfig(
        vocab_size=259,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=8,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        max_position_embeddings=128,
        pad_token_id=258,
        eos_token_id=257,
        bos_token_id=256,
    )
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0)
    return model.eval()


def _batches(byte_tokenizer, n=12, batch_size=4):
    rng = random.Random(1)
    examples = [
        Example(
            prompt=f"q{i}: " + "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(5, 30))),
            completion="x",
            source=f"t:{i}",
        )
        for i in range(n)
    ]
    tokenized = [tokenize_example(e, byte_tokenizer, 64) for e in examples]
    return make_batches(tokenized, batch_size=batch_size, pad_token_id=258)


def _reference_counts(model, batches):
    """Counts from the router logits transformers returns, top-k in numpy (no moe-sieve hooks)."""
    counts = np.zeros((LAYERS, EXPERTS), np.int64)
    with torch.no_grad():
        for b in batches:
            out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_router_logits=True)
            mask = b.count_mask.reshape(-1).numpy()
            for layer, logits in enumerate(out.router_logits):
                top = np.argsort(-logits.float().numpy(), axis=1)[:, :TOP_K][mask]
                counts[layer] += np.bincount(top.reshape(-1), minlength=EXPERTS)
    return counts


def _reference_figures(c0, c1, selection, k):
    cov, jac, kl, hot, cold = [], [], [], [], []
    for layer in range(LAYERS):
        sel = set(selection[layer])
        top_now = set(sorted(range(EXPERTS), key=lambda e: (-c1[layer, e], e))[:k])
        top0 = set(sorted(range(EXPERTS), key=lambda e: (-c0[layer, e], e))[:k])
        cov.append(sum(c1[layer, e] for e in sel) / c1[layer].sum())
        jac.append(len(top_now & sel) / len(top_now | sel))
        kl.append(entropy(c1[layer] + KL_SMOOTHING, c0[layer] + KL_SMOOTHING))
        hot.append(len(top_now - top0))
        cold.append(len(top0 - top_now))
    return cov, jac, kl, hot, cold


def test_figures_on_a_hand_made_routing_change_match_numpy(byte_tokenizer, tmp_path):
    model = _deep_model()
    batches = _batches(byte_tokenizer)
    k = 8
    c0_ref = _reference_counts(model, batches)
    selection = {i: sorted(np.argsort(-c0_ref[i], kind="stable")[:k].tolist()) for i in range(LAYERS)}
    apply_sieve_lora(model, selection, SieveLoraConfig(r=2, alpha=4, targets=("router", "experts")))
    selected = np.zeros((LAYERS, EXPERTS), bool)
    for i, ids in selection.items():
        selected[i, ids] = True
    monitor = DriftMonitor(
        batches,
        every=1,
        selected_LE=selected,
        k_L=[k] * LAYERS,
        layer_ids=list(range(LAYERS)),
        profile_fn=profile_counts,
        trace_path=tmp_path / TRACE_FILE,
    )
    monitor.measure(model, 0)
    # hand-made routing change: make the coldest experts of every other layer hot and move the rest at random
    torch.manual_seed(3)
    with torch.no_grad():
        for i in range(0, LAYERS, 2):
            delta = model.model.layers[i].mlp.gate.parametrizations.weight[0]
            cold = np.argsort(c0_ref[i], kind="stable")[:3]
            delta.lora_B[cold] = 5.0
            delta.lora_B[:] += 0.3 * torch.randn_like(delta.lora_B)
    monitor.measure(model, 1)
    c1_ref = _reference_counts(model, batches)

    trace = load_file(str(tmp_path / TRACE_FILE))
    np.testing.assert_array_equal(trace["steps_S"], [0, 1])
    np.testing.assert_array_equal(trace["counts_SLE"][0], c0_ref)
    np.testing.assert_array_equal(trace["counts_SLE"][1], c1_ref)
    assert (c1_ref != c0_ref).any(axis=1)[::2].all()  # the change really moved routing
    cov, jac, kl, hot, cold = _reference_figures(c0_ref, c1_ref, selection, k)
    np.testing.assert_allclose(trace["coverage_SL"][1], cov, rtol=1e-12)
    np.testing.assert_allclose(trace["jaccard_SL"][1], jac, rtol=1e-12)
    np.testing.assert_allclose(trace["kl_SL"][1], kl, rtol=1e-9)
    np.testing.assert_array_equal(trace["became_hot_SL"][1], hot)
    np.testing.assert_array_equal(trace["went_cold_SL"][1], cold)
    assert sum(hot) > 0 and min(jac) < 1
    np.testing.assert_array_equal(trace["kl_SL"][0], 0.0)
    np.testing.assert_array_equal(trace["jaccard_SL"][0], 1.0)
    summary = monitor.summary(10.0)
    assert summary["final"]["drift/became_hot"] == sum(hot)
    assert summary["final"]["drift/coverage"] == pytest.approx(np.mean(cov), abs=1e-6)
    out = plot_drift({"lora": tmp_path}, tmp_path / "drift.png")
    assert out.stat().st_size > 1000


def test_train_writes_trace_metrics_and_logs_drift(tiny_model_dir, copy_digits_jsonl, tmp_path):
    from moe_sieve.training import train

    data = copy_digits_jsonl
    config = small_train_config(
        tiny_model_dir,
        data,
        tmp_path / "run",
        max_steps=5,
        save_steps=100,
        learning_rate=5e-2,
        monitor_every=2,
        monitor_examples=8,
    )
    seen = []

    class Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append((state.global_step, dict(logs or {})))

    result = train(config, callbacks=[Logs()])
    trace = load_file(str(tmp_path / "run" / TRACE_FILE))
    np.testing.assert_array_equal(trace["steps_S"], [0, 2, 4, 5])
    assert trace["counts_SLE"].shape == (4, 3, 8)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    drift = metrics["routing_drift"]
    assert drift["steps"] == [0, 2, 4, 5] and drift["monitor_seconds"] > 0
    assert drift["final"]["drift/kl"] == pytest.approx(trace["kl_SL"][-1].mean(), abs=1e-7)
    assert drift == result.metrics["routing_drift"]
    assert [step for step, logs in seen if "drift/coverage" in logs] == [2, 4, 5]
    # the monitor's own log lines must not swallow the loss logged at the same steps (logging_steps=1)
    assert [step for step, logs in seen if "loss" in logs] == [1, 2, 3, 4, 5]
    assert result.metrics["first_loss"] is not None
    # monitoring draws no random numbers and computes no gradients: the adapter is the one trained without it
    import dataclasses

    from safetensors.torch import load_file as load_torch

    off = train(dataclasses.replace(config, out=str(tmp_path / "off"), monitor_every=0))
    assert "routing_drift" not in off.metrics and not (tmp_path / "off" / TRACE_FILE).exists()
    with_monitor = load_torch(tmp_path / "run" / "adapter" / "adapter.safetensors")
    without = load_torch(tmp_path / "off" / "adapter" / "adapter.safetensors")
    assert with_monitor.keys() == without.keys()
    for key in without:
        assert torch.equal(with_monitor[key], without[key]), key


def test_monitor_every_zero_is_off_and_validated():
    from moe_sieve.training import TrainConfig

    with pytest.raises(ValueError, match="--monitor-every"):
        TrainConfig(model="m", data="d", out="o", monitor_every=-1)
    with pytest.raises(ValueError, match="--reselect grow needs --monitor-every"):
        TrainConfig(model="m", data="d", out="o", monitor_every=0, reselect="grow")
