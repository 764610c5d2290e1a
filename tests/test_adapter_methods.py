"""Adapter methods are a registry: a third method, registered here in the test alone (no library edit), is
saved, loaded, refused by merge/export and trained through ``train --method`` by its record."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from moe_sieve.adapters import (
    AdapterMethod,
    AdapterState,
    adapter_methods,
    get_adapter_method,
    load_sieve_adapter,
    merge_sieve_lora,
    register_adapter_method,
    save_sieve_adapter,
)
from moe_sieve.adapters import methods as methods_mod
from moe_sieve.adapters.export import export_formats, formats_accepting
from moe_sieve.adapters.io import UnsupportedExportError, lora_state
from moe_sieve.arch import MoEShape, config_fingerprint, find_moe_layers

from .conftest import build_tiny, small_train_config

NAME = "toy-ia3"


@dataclass
class ScaleConfig:
    """IA3-like: one learned vector per MoE layer scales the block's output."""

    init: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return {"method": NAME, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScaleConfig:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class Scaled:
    group: str
    layer: int
    name: str
    params: int


@dataclass
class ScaleState(AdapterState):
    GROUPS = ("scales",)
    method = NAME

    config: ScaleConfig
    handles: list[Any] = field(default_factory=list)

    def table(self) -> str:
        return f"{NAME}: {self.trainable_params} trainable"


def attach_scales(model: nn.Module, selection: Any = None, config: ScaleConfig | None = None) -> ScaleState:
    config = config or ScaleConfig()
    layers = find_moe_layers(model)
    state = ScaleState(config, {}, MoEShape.of(layers), config_fingerprint(model.config))
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers:
        ref = next(layer.block.parameters())
        scale = nn.Parameter(torch.full((model.config.hidden_size,), config.init, dtype=ref.dtype))
        layer.block.ia3_scale = scale

        def hook(module, args, output, scale=scale):
            if isinstance(output, tuple):
                return (output[0] * scale, *output[1:])
            return output * scale

        state.handles.append(layer.block.register_forward_hook(hook))
        state.modules.append(Scaled("scales", layer.layer_id, f"{layer.name}.ia3_scale", scale.numel()))
    model.moe_sieve = state
    return state


def load_scales(model: nn.Module, path, saved: dict[str, Any]) -> ScaleState:
    from moe_sieve.adapters.factors import ADAPTER_WEIGHTS, load_factors

    state = attach_scales(model, None, ScaleConfig.from_json(saved["lora"]))
    load_factors(model, path / ADAPTER_WEIGHTS)
    return state


TOY = AdapterMethod(
    name=NAME,
    label="Toy IA3",
    config_cls=ScaleConfig,
    state_cls=ScaleState,
    attach=attach_scales,
    load=load_scales,
    plan=lambda model, k, options, trust_remote_code=False: {"method": NAME},
    plan_table=lambda result, options: [NAME],
    from_train=lambda train: ScaleConfig(),
    not_mergeable="toy scales are not merged by this test",
    lora_export=False,
    no_lora_export="a toy adapter has no {target} form",
    token_rows=False,
    expert_guard=False,
    routing_monitor=False,
)


@pytest.fixture
def toy(monkeypatch):
    """Register the toy method for one test; the registry is restored afterwards."""
    adapter_methods()  # the built-in methods first
    monkeypatch.setattr(methods_mod, "_METHODS", dict(methods_mod._METHODS))
    return register_adapter_method(TOY)


def test_builtin_methods_registered():
    assert adapter_methods()[:2] == ("sieve", "routed")
    assert get_adapter_method(None) is get_adapter_method("sieve")
    with pytest.raises(ValueError, match="--method must be sieve or routed, got 'nope'"):
        get_adapter_method("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_adapter_method(AdapterMethod(**{**get_adapter_method("sieve").__dict__, "label": "other"}))


def test_third_method_saves_loads_and_is_refused_by_merge_and_export(toy, tmp_path):
    model = build_tiny("olmoe")
    state = attach_scales(model)
    with torch.no_grad():
        for layer in find_moe_layers(model):
            layer.block.ia3_scale.uniform_(0.5, 1.5)
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        expected = model(ids).logits
    path = save_sieve_adapter(model, tmp_path / "adapter")
    saved = json.loads((path / "adapter_config.json").read_text())
    assert saved["lora"] == {"method": NAME, "init": 1.0}
    assert saved["params_by_group"] == {"scales": state.trainable_params} and saved["trainable_params"] > 0

    fresh = build_tiny("olmoe")
    with torch.no_grad():
        base = fresh(ids).logits
    loaded = load_sieve_adapter(fresh, path)  # io dispatches on lora.method
    assert isinstance(loaded, ScaleState)
    with torch.no_grad():
        got = fresh(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(base, expected)  # the scales do something
    with pytest.raises(ValueError, match="toy scales are not merged"):
        merge_sieve_lora(fresh)
    with pytest.raises(UnsupportedExportError, match="a toy adapter has no PEFT form"):
        lora_state(fresh, "PEFT")
    assert formats_accepting(TOY) == ()


def test_an_adapter_of_an_unknown_method_is_refused_naming_the_file(tmp_path):
    model = build_tiny("olmoe")
    attach_scales(model)
    path = save_sieve_adapter(model, tmp_path / "adapter")  # the toy method is not registered in this test
    with pytest.raises(ValueError, match=rf"adapter_config.json: lora.method '{NAME}' is no adapter method .*sieve"):
        load_sieve_adapter(build_tiny("olmoe"), path)


def test_export_formats_accepting_each_method():
    assert formats_accepting(get_adapter_method("sieve")) == export_formats()
    assert formats_accepting(get_adapter_method("routed")) == ()  # no LoRA form, not mergeable


def test_third_method_in_train_config(toy):
    from moe_sieve.training import TrainConfig
    from moe_sieve.training.fused_loss import _obstacle

    config = TrainConfig(model="m", data="d", out="o", method=NAME)
    assert isinstance(config.adapter_config(), ScaleConfig)
    with pytest.raises(ValueError, match=r"--train-tokens needs --method sieve \(Toy IA3 adapters hold no token"):
        TrainConfig(model="m", data="d", out="o", method=NAME, train_tokens="auto")
    with pytest.raises(ValueError, match=f"--method must be sieve or routed or {NAME}, got 'nope'"):
        TrainConfig(model="m", data="d", out="o", method="nope")
    cuda = torch.device("cuda")  # the device check comes first; nothing runs on it
    assert "adds its adapter loss" not in _obstacle(None, cuda, False, NAME, 0.0)  # adds_loss=False
    assert (
        _obstacle(None, cuda, False, "routed", 0.0) == "--method routed adds its adapter loss to the model's own loss"
    )


def test_third_method_trains_end_to_end(toy, tiny_model_dir, copy_digits_jsonl, tmp_path):
    from moe_sieve.training import train

    run = tmp_path / "run"
    result = train(
        small_train_config(tiny_model_dir, copy_digits_jsonl, run, method=NAME, strategy="none", max_steps=2)
    )
    assert result.metrics["method"] == NAME and result.metrics["trainable_params_by_group"].keys() == {"scales"}
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["lora"]["method"] == NAME
    model = build_tiny("olmoe")
    assert isinstance(load_sieve_adapter(model, run / "adapter"), ScaleState)
    trained = torch.cat([layer.block.ia3_scale for layer in find_moe_layers(model)])
    assert not torch.equal(trained, torch.ones_like(trained))  # two AdamW steps moved the scales
