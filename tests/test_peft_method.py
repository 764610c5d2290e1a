"""Sieve LoRA and Routed-PEFT as PEFT methods: ``get_peft_model`` / ``PeftModel.from_pretrained`` / merge / unload.

Every behaviour is compared against moe-sieve's own single-adapter path (``apply_sieve_lora``, ``merge_sieve_lora``,
``apply_routed_adapters``) and against PEFT's own entry points, on the embedded model and 16-layer OLMoE,
Qwen3-MoE and DeepSeek-V3 fixtures.
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING  # noqa: E402

import moe_sieve  # noqa: E402
from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora, merge_sieve_lora, trainable_parameters  # noqa: E402
from moe_sieve.adapters.peft_method import RoutedConfig, SieveConfig, SieveModel  # noqa: E402
from moe_sieve.adapters.routed import NOT_MERGEABLE, RoutedAdapterConfig, apply_routed_adapters  # noqa: E402
from moe_sieve.arch import find_moe_layers  # noqa: E402
from moe_sieve.profiling import Profile, ProfileMismatchError  # noqa: E402

from .conftest import build_tiny  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

MODELS = ["default", "olmoe:16", "qwen3_moe:16", "deepseek_v3:16"]


def _base(name: str):
    if name == "default":
        from moe_sieve.modeling import ModelSpec, load_model

        return load_model(ModelSpec("moe-sieve-default", device="cpu")).eval()
    family, layers = name.split(":")
    return build_tiny(family, layers=int(layers))


def _selection(model, k=3, shift=0):
    layers = find_moe_layers(model)
    num = layers[0].num_experts
    return {layer.layer_id: sorted({(layer.layer_id + shift + 2 * i) % num for i in range(k)}) for layer in layers}


def _ids(model, seed=0):
    vocab = model.config.vocab_size
    return torch.randint(0, vocab - 3, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _native_name(peft_name: str, adapter: str = "default") -> str:
    name = peft_name.removeprefix("base_model.model.").replace(".sieve_lora.lora_experts.", ".sieve_lora.")
    return name.replace(f".{adapter}.", ".").removesuffix(f".{adapter}")


def _peft_trainable(model, adapter="default"):
    return {_native_name(n, adapter): p for n, p in model.named_parameters() if p.requires_grad}


def _randomize(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(params):
            params[name].copy_(torch.randn(params[name].shape, generator=gen) * 0.05)


def _pair(name, seed=0, r=4, shift=0):
    """A PEFT model and an apply_sieve_lora model of the same base, selection and seed."""
    base = _base(name)
    sel = _selection(base, shift=shift)
    task = None if name.startswith("modulelist") else "CAUSAL_LM"  # the ModuleList fixture cannot generate
    config = SieveConfig(selection=sel, r=r, lora_alpha=2.0 * r, lora_dropout=0.0, seed=seed, task_type=task)
    peft_model = get_peft_model(base, config)
    native = _base(name)
    state = apply_sieve_lora(native, sel, SieveLoraConfig(r=r, alpha=2.0 * r, dropout=0.0, seed=seed))
    return peft_model, native, state, sel


def test_import_registers_the_methods_with_peft():
    assert "SieveConfig" in moe_sieve.__all__ and "RoutedConfig" in moe_sieve.__all__
    assert moe_sieve.SieveConfig is SieveConfig
    # PEFT looks saved adapters up by the plain string of adapter_config.json's "peft_type"
    assert PEFT_TYPE_TO_CONFIG_MAPPING["MOE_SIEVE"] is SieveConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["MOE_SIEVE"] is SieveModel
    assert PEFT_TYPE_TO_CONFIG_MAPPING["MOE_SIEVE_ROUTED"] is RoutedConfig


def test_post_import_hook_runs_after_the_module_executes(tmp_path, monkeypatch):
    from moe_sieve._peft_hook import install_hook

    (tmp_path / "late_pkg.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = install_hook("late_pkg", lambda: seen.append(sys.modules["late_pkg"].VALUE))
    assert hook is not None and seen == []
    try:
        import late_pkg  # noqa: F401

        assert seen == [42]
        assert hook not in sys.meta_path
    finally:
        sys.modules.pop("late_pkg", None)
    assert install_hook("json", lambda: seen.append("now")) is None and seen[-1] == "now"  # already imported


@pytest.mark.parametrize("name", [*MODELS, "modulelist:4"])
def test_get_peft_model_attaches_what_apply_sieve_lora_attaches(name):
    peft_model, native, state, _ = _pair(name)
    ours = _peft_trainable(peft_model)
    theirs = trainable_parameters(native)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:  # same seed, same draws: the same initial factors
        assert torch.equal(ours[key], theirs[key]), key
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == state.trainable_params == sum(p.numel() for p in theirs.values())
    for layer in find_moe_layers(peft_model.get_base_model()):
        if layer.layout.storage == "fused":
            assert layer.experts.config._experts_implementation == "sieve_lora"  # the same fused experts forward
    _randomize(theirs)
    with torch.no_grad():
        for key, param in ours.items():
            param.copy_(theirs[key])
    ids = _ids(native)
    assert torch.equal(_logits(peft_model.eval(), ids), _logits(native.eval(), ids))


def test_trainable_parameters_equal_the_plan():
    from moe_sieve.adapters import plan_adapters

    base = _base("default")
    peft_model = get_peft_model(base, SieveConfig(selection=_selection(base, k=4), r=8, lora_alpha=16))
    plan = plan_adapters("moe-sieve-default", k=4, lora=SieveLoraConfig(r=8, alpha=16))
    assert peft_model.get_nb_trainable_parameters()[0] == plan["sieve_params"]


@pytest.mark.parametrize("name", MODELS)
def test_from_pretrained_gives_identical_logits_and_keeps_the_selection(name, tmp_path):
    peft_model, _, _, sel = _pair(name)
    _randomize(_peft_trainable(peft_model))
    ids = _ids(peft_model)
    expected = _logits(peft_model.eval(), ids)
    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MOE_SIEVE"
    assert saved["selection"] == {str(layer): ids_ for layer, ids_ in sel.items()}
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    native = {k.removeprefix("base_model.model.").replace(".lora_experts.", ".") for k in keys}
    assert native == set(_peft_trainable(peft_model))  # moe-sieve's own adapter keys (see the test above)
    reloaded = PeftModel.from_pretrained(_base(name), tmp_path)
    assert isinstance(reloaded.peft_config["default"], SieveConfig)
    import copy
    import pickle

    config = peft_model.peft_config["default"]
    for clone in (pickle.loads(pickle.dumps(config)), copy.deepcopy(config)):  # trainers copy and pickle configs
        assert clone.to_dict() == config.to_dict()
    assert torch.equal(_logits(reloaded, ids), expected)
    assert not any(p.requires_grad for p in reloaded.parameters())  # inference by default, as PEFT does
    trainable = PeftModel.from_pretrained(_base(name), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == peft_model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("name", [*MODELS, "modulelist:4"])
def test_merge_and_unload_gives_merge_sieve_lora_weights(name):
    peft_model, native, _, _ = _pair(name)
    theirs = trainable_parameters(native)
    _randomize(theirs)
    with torch.no_grad():
        for key, param in _peft_trainable(peft_model).items():
            param.copy_(theirs[key])
    merged = peft_model.merge_and_unload()
    merge_sieve_lora(native)
    ours_sd, theirs_sd = merged.state_dict(), native.state_dict()
    assert sorted(ours_sd) == sorted(theirs_sd)
    for key in theirs_sd:
        assert torch.equal(ours_sd[key], theirs_sd[key]), key
    assert not hasattr(merged, "peft_config") and not any(p.requires_grad for p in merged.parameters())
    assert merged.config._experts_implementation == native.config._experts_implementation != "sieve_lora"


def test_merge_refuses_non_finite_factors():
    peft_model, _, _, _ = _pair("default")
    with torch.no_grad():
        next(p for p in peft_model.parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        peft_model.merge_and_unload()


def _profile(model, seed=0):
    layers = find_moe_layers(model)
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 500, (len(layers), layers[0].num_experts)).astype(np.int64)
    return Profile(
        counts,
        counts.astype(np.float32) / 7,
        counts[None].astype(np.int32),
        counts[None].astype(np.float32) / 7,
        np.array([int(counts.sum() // 2)]),
        [layer.layer_id for layer in layers],
        layers[0].num_experts,
        layers[0].top_k,
        {"model": {"id": "moe-sieve-default"}, "data": {"data": "gsm8k:toy", "split": "train"}},
    )


def test_inline_selection_from_profile_and_k(tmp_path):
    base = _base("default")
    profile = _profile(base)
    profile.save(tmp_path / "profile")
    config = SieveConfig(profile=str(tmp_path / "profile"), k=3, r=4, lora_alpha=8)
    order = np.argsort(-profile.counts_LE, axis=1, kind="stable")[:, :3]
    expected = {str(layer): sorted(order[i].tolist()) for i, layer in enumerate(profile.layer_ids)}
    assert config.selection == expected
    share = np.take_along_axis(profile.counts_LE, order, 1).sum(1) / profile.counts_LE.sum(1)
    assert config.selection_info["coverage"] == {
        str(layer): pytest.approx(share[i], abs=1e-6) for i, layer in enumerate(range(4))
    }
    model = get_peft_model(base, config)
    lora = model.get_base_model().model.layers[2].mlp.experts.sieve_lora.lora_experts["default"]
    assert list(lora.selected_experts) == expected["2"]


def test_selection_file_and_mapping_are_resolved_into_the_config(tmp_path):
    from moe_sieve.selection import Selection

    base = _base("default")
    sel = _selection(base)
    Selection(experts=sel, num_experts=16, strategy="topk").save(tmp_path / "hot.json")
    from_file = SieveConfig(selection=str(tmp_path / "hot.json"))
    inline = SieveConfig(selection={str(k): v for k, v in sel.items()})
    assert from_file.selection == inline.selection == {str(k): v for k, v in sel.items()}
    assert from_file.selection_info["source"].endswith("hot.json") and from_file.selection_info["strategy"] == "topk"


def test_config_and_model_mismatches_fail_in_one_line():
    with pytest.raises(ValueError, match="needs selection="):
        SieveConfig()
    with pytest.raises(ValueError, match="router='full'"):
        SieveConfig(selection={0: [1]}, router="full")
    with pytest.raises(ValueError, match="profile= needs k="):
        SieveConfig(profile=_profile(_base("default")))
    assert SieveConfig(experts="all").selection is None
    with pytest.raises(ProfileMismatchError, match="selection covers MoE layers"):
        get_peft_model(_base("default"), SieveConfig(selection={0: [1], 1: [2]}))
    with pytest.raises(ValueError, match="modules_to_save"):
        get_peft_model(_base("default"), SieveConfig(experts="all", modules_to_save=["lm_head"]))


def test_multiple_adapters_set_disable_delete_and_unload():
    base = _base("default")
    reference = _base("default")
    ids = _ids(base)
    base_logits = _logits(reference, ids)
    sel_a, sel_b = _selection(base), _selection(base, k=5, shift=1)
    model = get_peft_model(base, SieveConfig(selection=sel_a, r=4, lora_alpha=8, seed=0))
    _randomize(_peft_trainable(model), seed=1)
    logits_a = _logits(model.eval(), ids)
    model.add_adapter("hot5", SieveConfig(selection=sel_b, r=2, lora_alpha=4, seed=3))
    assert torch.equal(_logits(model, ids), logits_a)  # a new adapter is not active
    assert all("hot5" not in n for n, p in model.named_parameters() if p.requires_grad)
    model.set_adapter("hot5")
    assert model.active_adapters == ["hot5"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".hot5" in n for n in trainable)
    native = _base("default")
    apply_sieve_lora(native, sel_b, SieveLoraConfig(r=2, alpha=4, dropout=0.0, seed=3))
    ours = {_native_name(n, "hot5"): p for n, p in model.named_parameters() if ".hot5" in n}
    _randomize(ours, seed=2)
    with torch.no_grad():
        for key, param in trainable_parameters(native).items():
            param.copy_(ours[key])
    assert torch.equal(_logits(model, ids), _logits(native.eval(), ids))
    with model.disable_adapter():
        assert torch.equal(_logits(model, ids), base_logits)
    assert not torch.equal(_logits(model, ids), base_logits)
    with pytest.raises(ValueError, match="one active adapter at a time"):
        model.base_model.set_adapter(["default", "hot5"])
    model.set_adapter("default")
    assert torch.equal(_logits(model, ids), logits_a)
    model.delete_adapter("hot5")
    assert not any("hot5" in n for n, _ in model.named_parameters())
    plain = model.unload()
    assert torch.equal(_logits(plain, ids), base_logits)
    fresh = reference.state_dict()
    assert sorted(plain.state_dict()) == sorted(fresh)
    assert all(torch.equal(plain.state_dict()[k], fresh[k]) for k in fresh)


def test_mixing_with_another_peft_method_is_refused():
    base = _base("default")
    model = get_peft_model(base, SieveConfig(selection=_selection(base)))
    with pytest.raises(ValueError, match="different peft types"):
        model.add_adapter("lora", LoraConfig(target_modules=["q_proj"]))
    lora_model = get_peft_model(_base("default"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="cannot be mixed"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(lora_model.get_base_model(), SieveConfig(selection=_selection(base)))
    native = _base("default")
    apply_sieve_lora(native, _selection(native))
    with pytest.raises(ValueError, match="already carries moe-sieve adapters"):
        get_peft_model(native, SieveConfig(selection=_selection(native)))
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        get_peft_model(_base("default"), SieveConfig(selection=_selection(base)), mixed=True)


@pytest.mark.parametrize("name", ["default", "deepseek_v3:16"])
def test_routed_config_matches_apply_routed_adapters(name, tmp_path):
    base = _base(name)
    sel = _selection(base)
    config = RoutedConfig(variant="E", experts="selected", selection=sel, r=4, lora_alpha=8, lora_dropout=0.0)
    model = get_peft_model(base, config)
    native = _base(name)
    state = apply_routed_adapters(
        native, sel, RoutedAdapterConfig(variant="E", experts="selected", r=4, alpha=8, dropout=0.0)
    )
    assert model.get_nb_trainable_parameters()[0] == state.trainable_params
    ours = {n.removeprefix("base_model.model.").replace(".routed.default", ""): p for n, p in model.named_parameters()}
    theirs = trainable_parameters(native)
    assert set(theirs) <= set(ours)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    _randomize(theirs)
    with torch.no_grad():
        for key, param in theirs.items():
            ours[key].copy_(param)
    ids = _ids(native)
    expected = _logits(native.eval(), ids)
    assert torch.equal(_logits(model.eval(), ids), expected)
    with model.disable_adapter():
        assert torch.equal(_logits(model, ids), _logits(_base(name), ids))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "MOE_SIEVE_ROUTED"
    reloaded = PeftModel.from_pretrained(_base(name), tmp_path)
    assert torch.equal(_logits(reloaded, ids), expected)
    with pytest.raises(ValueError, match="cannot be folded into the base weights"):
        reloaded.merge_and_unload()
    assert NOT_MERGEABLE.startswith("Routed-PEFT adapters cannot be folded")
    with pytest.raises(ValueError, match="one Routed-PEFT adapter per model"):
        model.add_adapter("other", RoutedConfig(variant="S", r=2, lora_alpha=4))
    assert torch.equal(_logits(model.unload(), ids), _logits(_base(name), ids))
