"""--router lora|freeze|full and --router-aux-loss."""

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora, export_peft_adapter, load_sieve_adapter
from moe_sieve.adapters.sieve.model import enable_router_aux_loss
from moe_sieve.selection import Selection
from moe_sieve.training import TrainConfig, train
from moe_sieve.training.monitor import TRACE_FILE

from .conftest import build_tiny, small_train_config


@pytest.fixture(scope="module")
def toy(copy_digits_jsonl):
    return copy_digits_jsonl


def _config(model_dir, data, out, **kw):
    values = dict(max_steps=4, save_steps=100, learning_rate=5e-2, monitor_every=2, monitor_examples=8)
    return small_train_config(model_dir, data, out, **{**values, **kw})


def _router_weights(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}


def _last_layer_only(tmp_path):
    """Adapters only on the last MoE layer's experts: nothing trained sits upstream of any router."""
    path = tmp_path / "selection.json"
    Selection(experts={0: [], 1: [], 2: [1, 5]}, num_experts=8, strategy="manual").save(path)
    return str(path)


def test_freeze_keeps_router_bit_identical_and_drift_exactly_zero(tiny_model_dir, toy, tmp_path):
    base = _router_weights(tiny_model_dir)
    common = dict(selection=_last_layer_only(tmp_path), targets=("router", "experts"))
    frozen = train(_config(tiny_model_dir, toy, tmp_path / "freeze", router="freeze", **common))
    assert frozen.metrics["trainable_params_by_group"]["router"] == 0
    saved = load_file(tmp_path / "freeze" / "adapter" / "adapter.safetensors")
    assert not [k for k in saved if ".gate." in k]
    trace = load_numpy(str(tmp_path / "freeze" / TRACE_FILE))
    assert list(trace["steps_S"]) == [0, 2, 4]
    assert (trace["counts_SLE"] == trace["counts_SLE"][0]).all()
    assert (trace["kl_SL"] == 0).all() and (trace["became_hot_SL"] == 0).all()
    # the model the monitor saw kept its router weights bit for bit
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    load_sieve_adapter(model, tmp_path / "freeze" / "adapter")
    for name, weight in base.items():
        assert torch.equal(model.get_parameter(name), weight), name
    # the same setup with the router's LoRA trained does move the routing: the zero above is not vacuous
    lora = train(_config(tiny_model_dir, toy, tmp_path / "lora", router="lora", **common))
    assert lora.metrics["trainable_params_by_group"]["router"] > 0
    assert lora.metrics["routing_drift"]["final"]["drift/kl"] > 0


def test_full_router_trains_saves_and_reloads_its_weights(tiny_model_dir, toy, tmp_path):
    base = _router_weights(tiny_model_dir)
    result = train(_config(tiny_model_dir, toy, tmp_path / "full", router="full", max_steps=2))
    assert result.metrics["trainable_params_by_group"]["router"] == 3 * 8 * 32
    saved = load_file(tmp_path / "full" / "adapter" / "adapter.safetensors")
    routers = {k: v for k, v in saved.items() if k.endswith("mlp.gate.weight")}
    assert sorted(routers) == sorted(base)
    assert all(not torch.equal(routers[k], base[k]) for k in base)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    state = load_sieve_adapter(model, tmp_path / "full" / "adapter")
    assert state.config.router == "full"
    for name in base:
        assert torch.equal(model.get_parameter(name), routers[name])
    with pytest.raises(NotImplementedError, match="--router full"):
        export_peft_adapter(model, tmp_path / "peft")


def _numpy_aux_loss(router_logits, attention_mask, num_experts, top_k):
    """Switch-Transformer balance loss as transformers defines it: E * sum_e f_e P_e over all layers' tokens."""
    mask = attention_mask.reshape(-1).numpy().astype(bool)
    assigned = np.zeros(num_experts)
    prob = np.zeros(num_experts)
    rows = 0
    for logits in router_logits:
        z = logits.double().numpy()[mask]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        top = np.argsort(-p, axis=1)[:, :top_k]
        assigned += np.bincount(top.reshape(-1), minlength=num_experts)
        prob += p.sum(0)
        rows += z.shape[0]
    return num_experts * float(np.sum(assigned / rows * prob / rows))


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "mixtral"])
def test_aux_loss_adds_coef_times_the_balance_loss(family):
    model = build_tiny(family)
    apply_sieve_lora(model, {i: [0, 1] for i in range(3)}, SieveLoraConfig(r=2))
    torch.manual_seed(0)
    input_ids = torch.randint(0, 250, (2, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with torch.no_grad():
        plain = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        assert plain.aux_loss is None
        enable_router_aux_loss(model, 0.25)
        with_aux = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True).router_logits
    expected = _numpy_aux_loss(logits, attention_mask, logits[0].shape[-1], model.config.num_experts_per_tok)
    assert with_aux.aux_loss.item() == pytest.approx(expected, rel=1e-5)
    assert (with_aux.loss - plain.loss).item() == pytest.approx(0.25 * expected, rel=1e-4)


def test_aux_loss_refused_where_the_family_has_none():
    with pytest.raises(ValueError, match="--router-aux-loss: .* computes no load-balancing loss"):
        enable_router_aux_loss(build_tiny("deepseek_v3"), 0.01)
    with pytest.raises(ValueError, match="--router must be"):
        TrainConfig(model="m", data="d", out="o", router="bias")
