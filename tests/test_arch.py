import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moe_sieve.arch import (
    ArchSpec,
    MoEShape,
    UnsupportedModelError,
    config_fingerprint,
    find_moe_layers,
    get_arch,
    register_arch,
    routing_from_tuple,
    topk_weights_of,
)

from .conftest import build_tiny, tiny_config

EXPECTED = {
    # family: (arch name, MoE layer ids, storage, shared modules)
    "olmoe": ("olmoe", [0, 1, 2], "fused", []),
    "qwen2_moe": ("qwen2_moe", [0, 1, 2], "fused", ["shared_expert", "shared_expert_gate"]),
    "qwen3_moe": ("qwen3_moe", [0, 1, 2], "fused", []),
    "mixtral": ("mixtral", [0, 1, 2], "fused", []),
    "deepseek_v3": ("deepseek_v3", [1, 2], "fused", ["shared_experts"]),
    "gpt_oss": ("gpt_oss", [0, 1, 2], "fused", []),
    "modulelist": ("deepseek_moe", [1, 2], "module_list", ["shared_experts"]),
}


def test_discovers_every_family(tiny_family, tiny_model):
    arch, layer_ids, storage, shared = EXPECTED[tiny_family]
    layers = find_moe_layers(tiny_model)
    assert get_arch(tiny_model).name == arch
    assert [layer.layer_id for layer in layers] == layer_ids
    assert MoEShape.of(layers) == MoEShape(tuple(layer_ids), 8, 2)
    for layer in layers:
        assert layer.layout.storage == storage
        assert sorted(layer.shared) == shared
        assert layer.router_name.startswith(layer.name)
        assert dict(tiny_model.named_modules())[layer.experts_name] is layer.experts


def test_gpt_oss_layout_flags_are_read_from_the_experts_class():
    layout = find_moe_layers(build_tiny("gpt_oss"))[0].layout
    assert (layout.is_transposed, layout.is_concatenated, layout.has_bias, layout.has_gate) == (
        True,
        False,
        True,
        True,
    )
    olmoe = find_moe_layers(build_tiny("olmoe"))[0].layout
    assert (olmoe.is_transposed, olmoe.is_concatenated, olmoe.has_bias) == (False, True, False)


def test_dense_model_is_refused_with_class_name():
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*no MoE layer found.*experts"):
        find_moe_layers(model)


def test_register_arch_refuses_duplicates_and_custom_attrs_work():
    with pytest.raises(ValueError, match="already registered"):
        register_arch(ArchSpec("olmoe-again", ("olmoe",)))
    spec = ArchSpec("renamed", experts_attr="not_there")
    with pytest.raises(UnsupportedModelError, match="not_there"):
        find_moe_layers(build_tiny("olmoe"), spec)


def test_routing_from_tuple_layouts():
    index = torch.tensor([[0, 3], [2, 1]])
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    logits = torch.randn(2, 4)
    for output in [(logits, weights, index), (index, weights, None), (weights, index)]:
        got_index, got_weights = routing_from_tuple(output, 4)
        assert got_index is index and got_weights is weights
    dense = torch.zeros(2, 4).scatter(1, index, weights)
    got_index, got_dense = routing_from_tuple((dense, index), 4)
    assert torch.equal(topk_weights_of(got_index, got_dense, 4), weights)
    with pytest.raises(UnsupportedModelError, match="expert-index"):
        routing_from_tuple(logits, 4)


def test_config_fingerprint_ignores_dtype_but_not_geometry():
    base = tiny_config("olmoe")
    same = tiny_config("olmoe")
    same.dtype = torch.bfloat16
    other = tiny_config("olmoe")
    other.num_experts = 16
    assert config_fingerprint(base) == config_fingerprint(same)
    assert config_fingerprint(base) != config_fingerprint(other)
