import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_sieve.adapters import (
    AdapterMissingError,
    SieveLoraConfig,
    apply_sieve_lora,
    load_sieve_adapter,
    merge_sieve_lora,
    plan_adapters,
    save_sieve_adapter,
    trainable_parameters,
    verify_adapters,
)
from moe_sieve.arch import find_moe_layers, get_arch
from moe_sieve.profiling import ProfileMismatchError, RoutingRecorder

from .conftest import FUSED_FAMILIES, build_tiny

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = SieveLoraConfig(r=4, alpha=8, dropout=0.0, seed=0)


def _inputs(seed=0, batch=2, seq=12):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 250, (batch, seq), generator=gen)


def _selection(model, ids=(0, 3, 5)):
    return {layer.layer_id: list(ids) for layer in find_moe_layers(model)}


def _randomize(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)


@pytest.mark.parametrize("family", FUSED_FAMILIES + ["modulelist"])
def test_fresh_adapter_leaves_logits_unchanged(family):
    model = build_tiny(family)
    ids = _inputs()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        apply_sieve_lora(model, _selection(model), SMALL)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_trainable_parameters_match_hand_count():
    model = build_tiny("olmoe")  # hidden 32, 4 heads (head dim 8), 2 kv heads, 8 experts of width 16, 3 layers
    state = apply_sieve_lora(model, _selection(model, (1, 2)), SMALL)
    r = 4
    attention = r * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32))
    router = r * (32 + 8)
    per_expert = r * ((32 + 16) + (32 + 16) + (16 + 32))
    assert state.params_by_group() == {
        "attention": 3 * attention,
        "router": 3 * router,
        "shared": 0,
        "experts": 3 * 2 * per_expert,
    }
    assert sum(p.numel() for p in trainable_parameters(model).values()) == state.trainable_params
    assert all(
        not p.requires_grad for n, p in model.named_parameters() if "lora" not in n and "_A" not in n and "_B" not in n
    )


def test_qwen2_shared_expert_projections_are_adapted_but_not_its_gate():
    model = build_tiny("qwen2_moe")
    state = apply_sieve_lora(model, _selection(model), SMALL)
    shared = [m.name for m in state.modules if m.group == "shared"]
    assert sorted(n.rpartition(".")[2] for n in shared if ".0." in n or "layers.0." in n) == [
        "down_proj",
        "gate_proj",
        "up_proj",
    ]
    assert not any("shared_expert_gate" in n for n in shared)


def _expert_b_grads(model, layer):
    """Per expert id, the summed |grad| of that expert's LoRA B factors (None when it has none)."""
    grads = {}
    lora = getattr(layer.experts, "sieve_lora", None)
    if lora is not None:
        for slot, expert in enumerate(lora.expert_ids.tolist()):
            grads[expert] = sum(
                float(getattr(lora, f"{part}_B").grad[slot].abs().sum()) for part in ("gate", "up", "down")
            )
    else:
        for expert_id, expert in enumerate(layer.experts):
            if hasattr(expert.up_proj, "lora_B"):
                grads[expert_id] = sum(
                    float(getattr(expert, p).lora_B.weight.grad.abs().sum())
                    for p in ("gate_proj", "up_proj", "down_proj")
                )
    return grads


@pytest.mark.parametrize("family", FUSED_FAMILIES + ["modulelist"])
def test_backward_reaches_every_selected_expert_with_tokens_and_nothing_else(family):
    model = build_tiny(family)
    selected = (0, 3, 5, 6)
    apply_sieve_lora(model, _selection(model, selected), SMALL)
    layers = find_moe_layers(model)
    ids = _inputs(seq=24)
    recorder = RoutingRecorder(layers, get_arch(model))
    with recorder:
        recorder.begin_batch(torch.ones_like(ids, dtype=torch.bool))
        loss = (
            model(input_ids=ids, labels=ids).loss
            if family != "modulelist"
            else model(input_ids=ids).logits.pow(2).mean()
        )
        counts_LBE, _ = recorder.end_batch()
    loss.backward()
    for position, layer in enumerate(layers):
        routed = counts_LBE[position].sum(0)
        grads = _expert_b_grads(model, layer)
        assert sorted(grads) == list(selected)
        for expert in selected:
            assert (grads[expert] > 0) == bool(routed[expert] > 0), (layer.layer_id, expert)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_selection_must_fit_the_model():
    model = build_tiny("olmoe")
    with pytest.raises(ProfileMismatchError, match="MoE layers"):
        apply_sieve_lora(model, {0: [1], 1: [2]}, SMALL)
    with pytest.raises(ProfileMismatchError, match="out of range"):
        apply_sieve_lora(build_tiny("olmoe"), {0: [1], 1: [2], 2: [8]}, SMALL)
    with pytest.raises(ValueError, match="needs a selection"):
        apply_sieve_lora(build_tiny("olmoe"), None, SMALL)


def test_missing_adapter_fails_loudly():
    model = build_tiny("mixtral")
    apply_sieve_lora(model, _selection(model), SMALL)
    del find_moe_layers(model)[1].experts.sieve_lora
    with pytest.raises(AdapterMissingError, match="layer 1: selected experts \\[0, 3, 5\\]"):
        verify_adapters(model)


def test_conditions_full_topk_none_and_experts_only():
    counts = {}
    for experts in ("all", "selected", "none"):
        model = build_tiny("olmoe")
        counts[experts] = apply_sieve_lora(
            model, _selection(model, (0, 1)), dataclasses.replace(SMALL, experts=experts)
        ).params_by_group()
    assert counts["all"]["experts"] == 4 * counts["selected"]["experts"]  # 8 vs 2 experts per layer
    assert counts["none"]["experts"] == 0
    assert counts["all"]["attention"] == counts["selected"]["attention"] == counts["none"]["attention"]
    model = build_tiny("olmoe")
    only = apply_sieve_lora(model, _selection(model), dataclasses.replace(SMALL, targets=("experts",)))
    assert only.params_by_group()["attention"] == only.params_by_group()["router"] == 0


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "gpt_oss", "deepseek_v3", "modulelist"])
def test_save_load_restores_exactly_and_merge_reproduces_logits(family, tmp_path):
    model = build_tiny(family)
    apply_sieve_lora(model, _selection(model), SMALL)
    _randomize(model)
    ids = _inputs()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    path = save_sieve_adapter(model, tmp_path / "adapter", base_model=family)
    with pytest.raises(FileExistsError):
        save_sieve_adapter(model, path)

    fresh = build_tiny(family)
    load_sieve_adapter(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, adapted, rtol=0, atol=0)

    merge_sieve_lora(fresh)
    assert not any("lora" in n for n, _ in fresh.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
    fresh.save_pretrained(tmp_path / "merged")
    reloaded = (type(fresh) if family == "modulelist" else AutoModelForCausalLM).from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_load_refuses_adapter_of_other_geometry(tmp_path):
    model = build_tiny("olmoe")
    apply_sieve_lora(model, _selection(model), SMALL)
    path = save_sieve_adapter(model, tmp_path / "a")
    with pytest.raises(ProfileMismatchError, match="adapter made for MoE layers"):
        load_sieve_adapter(build_tiny("deepseek_v3"), path)


@pytest.mark.parametrize(
    "config, k, full, hot",
    [
        # the paper's Table 4: 311.5M -> 85.0M (72.7%), 509.7M -> 151.3M (70.3%)
        ("olmoe-1b-7b.config.json", "25%", 311_459_840, 84_967_424),
        ("qwen1.5-moe-a2.7b.config.json", "25%", 509_654_016, 151_335_936),
    ],
)
def test_plan_reproduces_paper_table_4(config, k, full, hot):
    plan = plan_adapters(str(FIXTURES / config), k=k)
    assert (plan["full_params"], plan["sieve_params"]) == (full, hot)
    assert plan["full_bytes"] == 4 * full and plan["sieve_bytes"] == 4 * hot
    assert plan["reduction"] == pytest.approx(1 - hot / full)
    assert round(100 * plan["reduction"], 1) in (72.7, 70.3)
