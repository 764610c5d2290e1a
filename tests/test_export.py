"""Every export format, every supported family: the dense per-weight deltas rebuilt from the exported files
alone equal the ones ``merge_sieve_lora`` folds into the base weights (float64)."""

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora, merge_sieve_lora, save_sieve_adapter
from moe_sieve.adapters import trainable_parameters as trainables
from moe_sieve.adapters.peft_export import export_peft_adapter
from moe_sieve.adapters.serving import PREFIX, export_serving_adapter
from moe_sieve.arch import find_moe_layers, get_arch

from .conftest import FUSED_FAMILIES, build_tiny, run_cli

FAMILIES = FUSED_FAMILIES + ["modulelist"]
SELECTED = (0, 3, 5)
CONFIG = SieveLoraConfig(r=4, alpha=8, dropout=0.0, seed=0)
NO_ROUTER = ("attention", "shared", "experts")


def build(family, layers=3, experts_implementation=None):
    """A seeded tiny model of ``family`` with ``layers`` decoder layers (same weights on every call)."""
    return build_tiny(family, experts_implementation=experts_implementation, layers=layers)


def adapted(family, layers=3, targets=CONFIG.targets):
    """Float64 model with random factors on SELECTED experts of every MoE layer (B = 0 would hide bugs)."""
    model = build(family, layers)
    config = SieveLoraConfig(r=CONFIG.r, alpha=CONFIG.alpha, dropout=0.0, seed=0, targets=targets)
    apply_sieve_lora(model, {layer.layer_id: list(SELECTED) for layer in find_moe_layers(model)}, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainables(model).values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    return model.double().eval()


def base64(family, layers=3):
    implementation = "eager" if family != "modulelist" else None
    return build(family, layers, implementation).double()


def merge_reference(model, family, layers):
    """What merge_sieve_lora adds to each base weight, in float64."""
    merged = merge_sieve_lora(copy.deepcopy(model)).state_dict()
    base = base64(family, layers).state_dict()
    assert merged.keys() == base.keys()
    return {k: merged[k].double() - base[k].double() for k in base}


def _expert_rows(experts, part, dense_OI):
    """Where one expert's (out, in) gate/up/down delta goes in that parameter's storage layout."""
    transposed = bool(getattr(experts, "is_transposed", False))
    dense = dense_OI.T if transposed else dense_OI
    if part == "down":
        return "down_proj", None, dense
    inter = dense_OI.shape[0]
    if getattr(experts, "is_concatenated", True):
        rows = slice(0, inter) if part == "gate" else slice(inter, 2 * inter)
    else:
        rows = slice(0, None, 2) if part == "gate" else slice(1, None, 2)
    return "gate_up_proj", rows, dense


def dense_from_serving(path, base):
    """Rebuild {state-dict key: delta} from a vllm/sglang export, reading only its files (and the base's layout)."""
    config = json.loads((path / "adapter_config.json").read_text())
    tensors = {k: v.double() for k, v in load_file(str(path / "adapter_model.safetensors")).items()}
    scaling = config["lora_alpha"] / config["r"]
    spec = get_arch(base)
    layers = find_moe_layers(base)
    renames = {}
    if spec.serving_moe_block:
        renames = {f"{layer.name.rpartition('.')[0]}.{spec.serving_moe_block}": layer.name for layer in layers}
    fused = {layer.experts_name: layer.experts for layer in layers if layer.layout.storage == "fused"}
    parts = dict(zip(spec.serving_expert_projections, ("gate", "up", "down"), strict=True))
    deltas = {}
    for ckpt in sorted({key[len(PREFIX) :].rsplit(".lora_", 1)[0] for key in tensors}):
        lora_A, lora_B = tensors[f"{PREFIX}{ckpt}.lora_A.weight"], tensors[f"{PREFIX}{ckpt}.lora_B.weight"]
        name = ckpt
        for new, old in renames.items():
            if name.startswith(new + "."):
                name = old + name[len(new) :]
        experts_name = name.removesuffix(".base_layer")
        if experts_name in fused and config["target_parameters"]:
            experts = fused[experts_name]
            param = "gate_up_proj" if name.endswith(".base_layer") else "down_proj"
            num_experts = getattr(experts, param).shape[0]
            rank = lora_A.shape[0] // num_experts
            a_ERI = lora_A.reshape(num_experts, rank, -1)
            b_EOR = lora_B.reshape(lora_B.shape[0], rank, num_experts).permute(2, 0, 1)
            dense = scaling * b_EOR @ a_ERI
            deltas[f"{experts_name}.{param}"] = dense.transpose(1, 2) if experts.is_transposed else dense
            continue
        match = re.fullmatch(r"(.+)\.(\d+)\.(\w+)", name)
        if match and match.group(1) in fused:
            experts = fused[match.group(1)]
            param, rows, dense = _expert_rows(experts, parts[match.group(3)], scaling * lora_B @ lora_A)
            key = f"{match.group(1)}.{param}"
            target = deltas.setdefault(key, torch.zeros_like(getattr(experts, param), dtype=torch.float64))
            expert = int(match.group(2))
            if rows is None:
                target[expert] += dense
            elif experts.is_transposed:
                target[expert][:, rows] += dense
            else:
                target[expert][rows] += dense
            continue
        deltas[f"{name}.weight"] = scaling * lora_B @ lora_A
    return deltas


def dense_from_peft(path, family, layers):
    """PEFT's own reading of the PEFT export: merge_and_unload on a fresh float64 base."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base64(family, layers), str(path)).merge_and_unload().state_dict()
    base = base64(family, layers).state_dict()
    return {k: merged[k].double() - base[k].double() for k in base}


def assert_same_deltas(got, reference):
    assert set(got) <= set(reference), sorted(set(got) - set(reference))[:5]
    changed = [k for k, v in reference.items() if v.abs().max() > 0]
    assert any(".experts." in k for k in changed), "the adapter must change routed experts"
    for key, expected in reference.items():
        actual = got.get(key, torch.zeros_like(expected))
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12, msg=key)


def check_export(family, fmt, tmp_path, layers=3):
    model = adapted(family, layers, targets=NO_ROUTER)
    reference = merge_reference(model, family, layers)
    out = tmp_path / fmt
    if fmt == "peft":
        export_peft_adapter(model, out)
        got = dense_from_peft(out, family, layers)
    else:
        export_serving_adapter(model, out, engine=fmt)
        got = dense_from_serving(out, base64(family, layers))
    assert_same_deltas(got, reference)
    return out


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["peft", "vllm", "sglang"])
def test_export_rebuilds_the_merged_deltas(family, fmt, tmp_path):
    if fmt == "sglang" and family == "gpt_oss":
        pytest.skip("refused by design: SGLang's 3D expert layout is not verified (test_sglang_refuses_3d_experts)")
    check_export(family, fmt, tmp_path)


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("family", ["olmoe", "mixtral", "gpt_oss", "modulelist"])
def test_vllm_export_at_16_layers(family, tmp_path):
    out = check_export(family, "vllm", tmp_path, layers=16)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and not config["rank_pattern"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("family", FAMILIES)
def test_router_lora_goes_to_vllm_where_its_gate_takes_lora(family, tmp_path):
    """Router LoRA included: rebuilt for vLLM where the family's router is vLLM's GateLinear, else refused."""
    model = adapted(family)
    if "vllm" not in get_arch(model).serving_router_lora:
        with pytest.raises(ValueError, match=r"--targets attention,shared,experts"):
            export_serving_adapter(model, tmp_path / "vllm", engine="vllm")
        assert not (tmp_path / "vllm").exists()
        return
    export_serving_adapter(model, tmp_path / "vllm", engine="vllm")
    got = dense_from_serving(tmp_path / "vllm", base64(family))
    assert any(re.search(r"\.(gate|router)\.weight$", k) and v.abs().max() > 0 for k, v in got.items())
    assert_same_deltas(got, merge_reference(model, family, 3))


def test_sglang_refuses_router_lora(tmp_path):
    with pytest.raises(ValueError, match=r"sglang cannot put LoRA on router gates.*export --format merged"):
        export_serving_adapter(adapted("olmoe"), tmp_path / "s", engine="sglang")
    assert not (tmp_path / "s").exists()


def test_sglang_refuses_3d_experts(tmp_path):
    model = adapted("gpt_oss", targets=("attention", "experts"))
    with pytest.raises(ValueError, match="--format vllm or merged"):
        export_serving_adapter(model, tmp_path / "s", engine="sglang")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_vllm_keys_zero_fill_every_expert_and_config_matches_keys(tmp_path):
    result = export_serving_adapter(adapted("mixtral", targets=("attention", "experts")), tmp_path / "v", engine="vllm")
    tensors = load_file(str(tmp_path / "v" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    for layer in range(3):
        for expert in range(8):
            for proj in ("w1", "w2", "w3"):
                key = f"{PREFIX}model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.lora_A.weight"
                assert bool(tensors[key].abs().max() > 0) == (expert in SELECTED)
    assert tensors[f"{PREFIX}model.layers.0.block_sparse_moe.experts.0.w1.lora_A.weight"].shape == (4, 32)
    assert tensors[f"{PREFIX}model.layers.0.block_sparse_moe.experts.0.w2.lora_B.weight"].shape == (32, 4)
    leaves = {k[len(PREFIX) :].rsplit(".lora_", 1)[0].rpartition(".")[2] for k in tensors}
    assert set(config["target_modules"]) == leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"}
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")
    assert result.zero_filled_experts == 3 * 5 and result.bytes > result.sieve_bytes


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_gpt_oss_vllm_export_pads_every_module_to_one_rank(tmp_path):
    export_serving_adapter(adapted("gpt_oss"), tmp_path / "v", engine="vllm")
    tensors = load_file(str(tmp_path / "v" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16.0)
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight") and ".experts" not in k} == {8}
    assert tensors[f"{PREFIX}model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (8 * 8, 32)
    assert tensors[f"{PREFIX}model.layers.0.mlp.experts.lora_B.weight"].shape == (32, 8 * 8)
    assert sorted(config["target_parameters"]) == [
        f"model.layers.{i}.mlp.experts.{p}" for i in range(3) for p in ("down_proj", "gate_up_proj")
    ]


def test_unequal_ranks_are_refused(tmp_path):
    from torch import nn

    model = adapted("olmoe", targets=("attention", "experts"))
    linear = model.get_submodule("model.layers.1.self_attn.q_proj")
    linear.lora_A = nn.Linear(32, 2, bias=False, dtype=torch.float64)
    linear.lora_B = nn.Linear(2, 32, bias=False, dtype=torch.float64)
    with pytest.raises(ValueError, match="rank 2"):
        export_serving_adapter(model, tmp_path / "v", engine="vllm")


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning", "ignore::UserWarning")
def test_export_command_every_format(monkeypatch, capsys, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from moe_sieve.adapters import load_sieve_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    apply_sieve_lora(model, {layer.layer_id: list(SELECTED) for layer in find_moe_layers(model)}, CONFIG)
    with torch.no_grad():
        for p in trainables(model).values():
            p.normal_(0.0, 0.2)
    save_sieve_adapter(model, tmp_path / "adapter", base_model=str(tiny_model_dir))
    adapter = tmp_path / "adapter"
    for fmt in ("peft", "vllm", "sglang", "merged"):
        code, out, err = run_cli(monkeypatch, capsys, "export", adapter, "--format", fmt, "--out", tmp_path / fmt)
        if fmt == "sglang":  # the default targets include the router
            assert code == 2 and "--targets attention,shared,experts" in err and not (tmp_path / fmt).exists()
            continue
        assert code == 0, err
        if fmt != "merged":
            assert "exported vs" in out and "for the sieve adapter" in out
    code, _, err = run_cli(monkeypatch, capsys, "export", adapter, "--format", "vllm", "--out", tmp_path / "vllm")
    assert code == 2 and "--overwrite" in err
    code, _, err = run_cli(monkeypatch, capsys, "export", adapter, "--format", "onnx", "--out", tmp_path / "x")
    assert code == 2 and "peft, vllm, sglang, merged" in err
    code, _, err = run_cli(monkeypatch, capsys, "export-peft", adapter, "--out", tmp_path / "peft2")
    assert code == 0, err
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    load_sieve_adapter(fresh, adapter)
    expected = merge_sieve_lora(fresh).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=0, msg=key)
