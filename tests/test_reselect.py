"""--reselect grow: adds exactly the experts that entered the top-k, with fresh AdamW state, and resumes exactly."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from moe_sieve.adapters import load_sieve_adapter, read_adapter_config
from moe_sieve.training import train
from moe_sieve.training.monitor import TRACE_FILE
from moe_sieve.training.reselect import RESELECT_FILE

from .conftest import small_train_config


@pytest.fixture(scope="module")
def toy(copy_digits_jsonl):
    return copy_digits_jsonl


def _config(model_dir, data, out, **kw):
    values = dict(
        max_steps=8,
        save_steps=4,
        learning_rate=0.1,
        dropout=0.05,
        profile_subsample=1.0,
        k=2,
        monitor_every=2,
        monitor_examples=12,
        reselect="grow",
    )
    return small_train_config(model_dir, data, out, **{**values, **kw})


class _OptimizerSteps(TrainerCallback):
    """AdamW's per-tensor step count at the last step, by parameter name."""

    def __init__(self):
        self.steps = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == state.max_steps:
            names = {id(p): n for n, p in model.named_parameters()}
            inner = getattr(optimizer, "optimizer", optimizer)
            self.steps = {names[id(p)]: int(inner.state[p]["step"]) for g in inner.param_groups for p in g["params"]}


def test_grow_adds_exactly_the_experts_that_became_hot(tiny_model_dir, toy, tmp_path):
    probe = _OptimizerSteps()
    result = train(_config(tiny_model_dir, toy, tmp_path / "run"), callbacks=[probe])
    run = tmp_path / "run"
    events = json.loads((run / RESELECT_FILE).read_text())["events"]
    assert events, "the routing did not move enough to grow: raise the learning rate of this test"
    trace = load_numpy(str(run / TRACE_FILE))
    selection = {int(k): v for k, v in json.loads((run / "selection.json").read_text())["layers"].items()}
    adapted = {layer: set(ids) for layer, ids in selection.items()}
    layers = sorted(adapted)
    for s, step in enumerate(trace["steps_S"]):
        # independent recomputation: top-2 of the measured counts (ties to the lower id) minus what was adapted
        expected = {}
        for i, layer in enumerate(layers):
            top = set(sorted(range(8), key=lambda e: (-trace["counts_SLE"][s, i, e], e))[:2])
            assert set(np.flatnonzero(trace["selected_SLE"][s, i])) == adapted[layer]
            if top - adapted[layer]:
                expected[str(layer)] = sorted(top - adapted[layer])
        got = [e["experts"] for e in events if e["step"] == step]
        if step in (0, 8):
            assert not got  # nothing grows before training or at the last step (it would never train)
            continue
        assert got == ([expected] if expected else [])
        for layer, ids in expected.items():
            adapted[int(layer)] |= set(ids)
    config = read_adapter_config(run / "adapter")
    assert {int(k): set(v) for k, v in config["experts"].items()} == adapted
    assert config["reselect"]["events"] == events
    assert result.metrics["adapted_experts"] == sum(len(v) for v in adapted.values())
    # grown tensors started with fresh AdamW state at their growth step; trained ones kept theirs
    expected_steps = {}
    for layer in layers:
        grown_at = [e["step"] for e in events if str(layer) in e["experts"]]
        for j, step in enumerate(grown_at, start=1):
            expected_steps[f"model.layers.{layer}.mlp.experts.sieve_lora.parts.{j}."] = 8 - step
    assert expected_steps
    for name, count in probe.steps.items():
        prefix = next((p for p in expected_steps if name.startswith(p)), None)
        assert count == (8 if prefix is None else expected_steps[prefix]), name
    # the final adapter is an ordinary one: it loads on a fresh base model and reproduces the saved factors
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    load_sieve_adapter(model, run / "adapter")
    saved = load_file(run / "adapter" / "adapter.safetensors")
    for name, tensor in saved.items():
        assert torch.equal(model.get_parameter(name), tensor)


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 6:
            raise KeyboardInterrupt


def test_grow_resume_is_exact(tiny_model_dir, toy, tmp_path):
    train(_config(tiny_model_dir, toy, tmp_path / "full"))
    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_model_dir, toy, tmp_path / "cut"), callbacks=[_Interrupt()])
    result = train(_config(tiny_model_dir, toy, tmp_path / "cut"), resume=True)
    assert result.metrics["resumed_from"].endswith("checkpoint-4")
    full_events = json.loads((tmp_path / "full" / RESELECT_FILE).read_text())["events"]
    assert any(e["step"] <= 4 for e in full_events)
    assert json.loads((tmp_path / "cut" / RESELECT_FILE).read_text())["events"] == full_events
    full = load_file(tmp_path / "full" / "adapter" / "adapter.safetensors")
    cut = load_file(tmp_path / "cut" / "adapter" / "adapter.safetensors")
    assert full.keys() == cut.keys()
    for key in full:
        torch.testing.assert_close(cut[key], full[key], rtol=0, atol=0)
    a = load_numpy(str(tmp_path / "full" / TRACE_FILE))
    b = load_numpy(str(tmp_path / "cut" / TRACE_FILE))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
