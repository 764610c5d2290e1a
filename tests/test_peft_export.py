import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize

from moe_sieve._io import ArtifactExistsError
from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora, trainable_parameters
from moe_sieve.adapters.peft_export import _copy_experts, _param_wrapper, export_peft_adapter
from moe_sieve.adapters.sieve.experts import SIEVE_EXPERTS_IMPLEMENTATION, ExpertLoRA, iter_fused_experts
from moe_sieve.arch import find_moe_layers

from .conftest import FUSED_FAMILIES, build_tiny

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

SMALL = SieveLoraConfig(r=4, alpha=8, dropout=0.0, seed=0)
SELECTED = (0, 3, 5)


def _inputs(seed=0, batch=2, seq=12):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 250, (batch, seq), generator=gen)


def _adapted(family, config=SMALL, seed=1):
    """A tiny model with Sieve LoRA on SELECTED experts and every factor random (B = 0 would hide bugs)."""
    model = build_tiny(family)
    apply_sieve_lora(model, {layer.layer_id: list(SELECTED) for layer in find_moe_layers(model)}, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _base(family, dtype=torch.float32):
    """A fresh base model (same seed, same weights); float64 needs the eager experts (grouped_mm has no CPU kernel)."""
    implementation = "eager" if dtype == torch.float64 and family != "modulelist" else None
    return build_tiny(family, experts_implementation=implementation).to(dtype)


def _load_peft(family, path, dtype=torch.float32):
    return PeftModel.from_pretrained(_base(family, dtype), str(path)).eval()


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("family", FUSED_FAMILIES + ["modulelist"])
def test_peft_model_reproduces_sieve_logits(family, tmp_path):
    model = _adapted(family).double()
    ids = _inputs()
    expected = _logits(model, ids)
    base = _logits(_base(family, torch.float64), ids)
    assert (expected - base).abs().max() > 1e-3  # the adapter matters, so a dropped one would be caught

    export_peft_adapter(model, tmp_path / "peft")
    loaded = _load_peft(family, tmp_path / "peft", torch.float64)
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=1e-10)


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_float32_round_trip(family, tmp_path):
    model = _adapted(family)
    ids = _inputs(seed=3)
    export_peft_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(
        _logits(_load_peft(family, tmp_path / "peft"), ids), _logits(model, ids), atol=1e-5, rtol=1e-5
    )


def _config(path):
    return json.loads((path / "adapter_config.json").read_text())


def test_adapter_config_for_fused_experts_routers_and_shared_experts(tmp_path):
    model = _adapted("deepseek_v3", SieveLoraConfig(r=4, alpha=8, dropout=0.1, seed=0))
    export_peft_adapter(model, tmp_path / "peft", base_model="org/tiny-deepseek")
    config = _config(tmp_path / "peft")
    moe = [f"model.layers.{i}.mlp" for i in (1, 2)]  # first_k_dense_replace=1
    shared = [f"{m}.shared_experts.{p}.weight" for m in moe for p in ("gate_proj", "up_proj", "down_proj")]
    experts = [f"{m}.experts.{p}" for m in moe for p in ("gate_up_proj", "down_proj")]
    assert sorted(config["target_parameters"]) == sorted(shared + experts + [f"{m}.gate.weight" for m in moe])
    attention = ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    assert sorted(config["target_modules"]) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in attention
    )
    gate_up = {rf"model\.layers\.{i}\.mlp\.experts\.gate_up_proj" for i in (1, 2)}
    assert config["rank_pattern"] == dict.fromkeys(gate_up, 8)
    assert config["alpha_pattern"] == dict.fromkeys(gate_up, 16.0)
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.0)
    assert config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == "org/tiny-deepseek"


def test_adapter_config_for_modulelist_experts(tmp_path):
    model = _adapted("modulelist")
    export_peft_adapter(model, tmp_path / "peft")
    config = _config(tmp_path / "peft")
    experts = [
        f"model.layers.{i}.mlp.experts.{e}.{p}.weight"
        for i in (1, 2)
        for e in SELECTED
        for p in ("gate_proj", "up_proj", "down_proj")
    ]
    assert set(experts) <= set(config["target_parameters"])
    assert not any(".experts.1." in name for name in config["target_parameters"])
    assert not config["rank_pattern"] and not config["alpha_pattern"]


def test_unselected_experts_get_zero_factors(tmp_path):
    model = _adapted("olmoe")
    export_peft_adapter(model, tmp_path / "peft")
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.mlp.experts"
    # transformers registers gate_up_proj first, so PEFT wraps it innermost (under base_layer)
    gate_up_A = tensors[f"{prefix}.base_layer.lora_A.weight"].reshape(8, 8, 32)  # (E, 2r, H)
    gate_up_B = tensors[f"{prefix}.base_layer.lora_B.weight"].reshape(32, 8, 8)  # (2I, 2r, E)
    down_A = tensors[f"{prefix}.lora_A.weight"].reshape(8, 4, 16)  # (E, r, I)
    unselected = [e for e in range(8) if e not in SELECTED]
    for full_A in (gate_up_A, down_A):
        assert full_A[unselected].abs().max() == 0 and full_A[list(SELECTED)].abs().min(dim=-1).values.gt(0).all()
    assert gate_up_B[:, :, unselected].abs().max() == 0
    assert gate_up_B[:16, 4:, :].abs().max() == 0 and gate_up_B[16:, :4, :].abs().max() == 0  # block-diagonal


class _FakeExperts(nn.Module):
    """Just the parameters and layout flags of a transformers fused experts module, with uneven sizes."""

    def __init__(self, has_gate: bool, is_transposed: bool, is_concatenated: bool, E=4, H=6, I=5):  # noqa: E741
        super().__init__()
        self.has_gate, self.is_transposed, self.is_concatenated, self.num_experts = (
            has_gate,
            is_transposed,
            is_concatenated,
            E,
        )
        first = (2 if has_gate else 1) * I
        shape_in, shape_down = ((E, H, first), (E, I, H)) if is_transposed else ((E, first, H), (E, H, I))
        setattr(self, "gate_up_proj" if has_gate else "up_proj", nn.Parameter(torch.randn(shape_in)))
        self.down_proj = nn.Parameter(torch.randn(shape_down))


class _Holder(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("has_gate", [True, False])
@pytest.mark.parametrize("is_transposed", [False, True])
@pytest.mark.parametrize("is_concatenated", [True, False])
def test_expert_factors_give_peft_the_same_dense_update(has_gate, is_transposed, is_concatenated):
    experts = _FakeExperts(has_gate, is_transposed, is_concatenated)
    lora = ExpertLoRA.for_experts(experts, [1, 3], r=2, alpha=6.0)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_()
    first = "gate_up_proj" if has_gate else "up_proj"
    rank = {"experts.gate_up_proj": 4} if has_gate else {}
    alpha = {"experts.gate_up_proj": 12.0} if has_gate else {}
    config = LoraConfig(
        r=2,
        lora_alpha=6.0,
        target_modules=[],
        target_parameters=[f"experts.{first}", "experts.down_proj"],
        rank_pattern=rank,
        alpha_pattern=alpha,
    )
    peft_model = get_peft_model(_Holder(experts), config)
    expected = lora.delta_weights()
    for name in (first, "down_proj"):
        wrapper = _param_wrapper(peft_model.base_model.model.experts, name)
        with torch.no_grad():
            _copy_experts(wrapper, lora, name, name)
        dense = torch.zeros_like(getattr(experts, name))
        dense[[1, 3]] = expected[name]
        torch.testing.assert_close(wrapper.get_delta_weight("default"), dense)
        lhs, rhs, scaling = wrapper.get_delta_factors("default")  # the path PEFT's forward takes
        torch.testing.assert_close(scaling * lhs @ rhs, dense)


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")
def test_export_leaves_the_model_unchanged(tmp_path):
    model = _adapted("qwen2_moe")
    ids = _inputs()
    before = _logits(model, ids)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    state = {name: t.clone() for name, t in model.state_dict().items()}
    export_peft_adapter(model, tmp_path / "peft")
    assert torch.equal(_logits(model, ids), before)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert model.moe_sieve is not None
    assert not any("default" in name for name, _ in model.named_modules())
    for _, experts in iter_fused_experts(model):
        assert experts.config._experts_implementation == SIEVE_EXPERTS_IMPLEMENTATION
        assert isinstance(experts.sieve_lora, ExpertLoRA)


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")
def test_export_refuses_an_existing_path_unless_overwrite(tmp_path):
    model = _adapted("olmoe")
    export_peft_adapter(model, tmp_path / "peft")
    with pytest.raises(ArtifactExistsError):
        export_peft_adapter(model, tmp_path / "peft")
    assert export_peft_adapter(model, tmp_path / "peft", overwrite=True) == tmp_path / "peft"
    assert (tmp_path / "peft" / "adapter_model.safetensors").exists()


def test_export_needs_sieve_adapters(tmp_path):
    with pytest.raises(ValueError, match="no Sieve LoRA"):
        export_peft_adapter(build_tiny("olmoe"), tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


class _Double(nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_router_with_a_foreign_parametrization_is_refused(tmp_path):
    model = _adapted("olmoe")
    parametrize.register_parametrization(model.get_submodule("model.layers.0.mlp.gate"), "weight", _Double())
    with pytest.raises(NotImplementedError, match="parametrizations"):
        export_peft_adapter(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")
def test_peft_target_rewrite_is_caught(tmp_path, monkeypatch):
    """PEFT's transformers-v5 MoE conversion moves ``*.gate_proj`` targets to the fused experts (dropping the
    shared experts); exporting those linears as target_modules must fail loudly, not write a wrong adapter."""
    pytest.importorskip("peft.utils.transformers_weight_conversion")
    from moe_sieve.adapters import peft_export

    monkeypatch.setattr(peft_export, "_remapped_leaves", frozenset)
    with pytest.raises(NotImplementedError, match="rewrote"):
        export_peft_adapter(_adapted("deepseek_v3"), tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("family", FUSED_FAMILIES + ["modulelist"])
def test_peft_round_trip_at_16_layers(family, tmp_path):
    """PEFT shortens a target_modules list of 20+ names to suffixes that match the same modules; the export
    must accept that (it refused every model with 5+ layers) and PEFT's forward must equal ours."""
    from .test_export import adapted, base64

    model = adapted(family, layers=16)
    ids = _inputs()
    expected = _logits(model, ids)
    assert (expected - _logits(base64(family, 16), ids)).abs().max() > 1e-3
    export_peft_adapter(model, tmp_path / "peft")
    saved = _config(tmp_path / "peft")
    if family != "modulelist":  # PEFT did shorten the list: the spelling changed, the modules did not
        assert len(saved["target_modules"]) < 16 * 3
    loaded = PeftModel.from_pretrained(base64(family, 16), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=1e-10)
