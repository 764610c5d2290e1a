"""Routed-PEFT adapters against a naive per-token float64 reference, on every MoE family."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from moe_sieve.adapters import load_sieve_adapter, merge_sieve_lora, save_sieve_adapter
from moe_sieve.adapters.routed import RoutedAdapterConfig, apply_routed_adapters, plan_routed
from moe_sieve.arch import find_moe_layers

from .conftest import FUSED_FAMILIES, build_tiny, run_cli

FAMILIES = FUSED_FAMILIES + ["modulelist"]


def _double_model(family: str, seed: int = 0):
    impl = None if family == "modulelist" else "eager"  # transformers' grouped_mm has no float64 CPU kernel
    return build_tiny(family, seed=seed, experts_implementation=impl).double()


def _base_routing(layer, x):
    """Frozen router's (index [T, K], weights [T, K]) for ``x``, read off the base block's experts call."""
    seen = {}
    if layer.layout.storage == "fused":

        def pre(module, args, kwargs):
            seen["index"], seen["weights"] = args[1], args[2]

        handle = layer.experts.register_forward_pre_hook(pre, with_kwargs=True)
    else:

        def post(module, args, output):
            seen["index"], seen["weights"] = output[0], output[1]

        handle = layer.router.register_forward_hook(post)
    with torch.no_grad():
        layer.block(x)
    handle.remove()
    index = seen["index"].reshape(-1, seen["index"].shape[-1])
    weights = seen["weights"].reshape(index.shape[0], -1)
    if weights.shape[-1] != index.shape[-1]:
        weights = weights.gather(-1, index)
    return index, weights


def _adapter_ref(kind, A_rD, B_Dr, scaling, x_D):
    """One adapter on one token, float64: lora s B A x; parallel W2 SiLU(W1 x)."""
    h = A_rD @ x_D
    return B_Dr @ (h * scaling if kind == "lora" else F.silu(h))


def _reference_delta(cfg, adapter, x_TD, routing, renormalize):
    bank = adapter.bank
    A, B = bank.first, bank.second
    rows = []
    for t in range(x_TD.shape[0]):
        x = x_TD[t]
        out = torch.zeros_like(x)
        if cfg.variant in ("S", "D"):
            for j in range(A.shape[0]):
                out = out + _adapter_ref(cfg.adapter_type, A[j], B[j], bank.scaling, x)
        elif cfg.variant == "R":
            probs = torch.softmax(adapter.router.weight @ x, dim=-1)
            order = sorted(range(probs.numel()), key=lambda j: -float(probs[j].detach()))[: cfg.top_k]
            weights = [probs[j] for j in order]
            if renormalize:
                total = sum(weights)
                weights = [w / total for w in weights]
            for j, w in zip(order, weights, strict=True):
                out = out + w * _adapter_ref(cfg.adapter_type, A[j], B[j], bank.scaling, x)
        else:
            index, weights = routing
            for e, w in zip(index[t].tolist(), weights[t], strict=True):
                if e in adapter.selected_experts:
                    slot = adapter.selected_experts.index(e)
                    out = out + w * _adapter_ref(cfg.adapter_type, A[slot], B[slot], bank.scaling, x)
        rows.append(out)
    return torch.stack(rows)


def _out(y):
    return y[0] if isinstance(y, tuple) else y


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["S", "D", "R", "E"])
@pytest.mark.parametrize("adapter_type", ["lora", "parallel"])
def test_variant_matches_float64_reference(family, variant, adapter_type):
    """Block output and every adapter gradient equal a per-token float64 loop (R: top-K, renorm, aux loss)."""
    torch.manual_seed(1)
    model, base = _double_model(family), _double_model(family)
    experts = None
    if variant == "E" and family in ("olmoe", "modulelist"):  # a hot-set selection, the project's combination
        experts = {layer.layer_id: [1, 3, 6] for layer in find_moe_layers(model)}
    cfg = RoutedAdapterConfig(
        variant=variant,
        adapter_type=adapter_type,
        r=3,
        alpha=5.0,
        dropout=0.0,
        num_adapters=5,
        top_k=2,
        experts="selected" if experts else "all",
    )
    state = apply_routed_adapters(model, experts, cfg)
    layer, base_layer = find_moe_layers(model)[-1], find_moe_layers(base)[-1]
    adapter = state.adapters[layer.layer_id]
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 9, model.config.hidden_size, dtype=torch.float64)
    x_TD = x.reshape(-1, x.shape[-1])
    routing = _base_routing(base_layer, x) if variant == "E" else None
    y = _out(layer.block(x)).reshape(-1, x.shape[-1])
    with torch.no_grad():
        y_base = _out(base_layer.block(x)).reshape(-1, x.shape[-1])
    renorm = getattr(adapter, "renormalize", False)
    y_ref = y_base + _reference_delta(cfg, adapter, x_TD, routing, renorm)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    assert (y - y_base).abs().max() > 1e-3  # the adapters do act

    params = [p for p in adapter.parameters()]
    g = torch.randn_like(y)
    loss, loss_ref = (y * g).sum(), (y_ref * g).sum()
    if variant == "R":
        aux = state.aux_loss()
        probs = torch.softmax(x_TD @ adapter.router.weight.t(), dim=-1)
        top = probs.topk(cfg.top_k, dim=-1).indices
        f = torch.zeros(cfg.num_adapters, dtype=torch.float64)
        for t in range(x_TD.shape[0]):
            for j in top[t].tolist():
                f[j] += 1.0 / x_TD.shape[0]
        aux_ref = cfg.num_adapters * (f * probs.mean(0)).sum()
        torch.testing.assert_close(aux, aux_ref, rtol=1e-12, atol=1e-12)
        loss, loss_ref = loss + 0.37 * aux, loss_ref + 0.37 * aux_ref
    grads = torch.autograd.grad(loss, params)
    grads_ref = torch.autograd.grad(loss_ref, params)
    for p, g1, g2 in zip(params, grads, grads_ref, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-10, msg=lambda m, p=p: f"{tuple(p.shape)}: {m}")
        assert g1.abs().max() > 0


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_renormalisation_follows_the_model(family):
    """auto renormalises R's top-K exactly when the model's own top-k weights sum to a constant."""
    model = build_tiny(family)
    state = apply_routed_adapters(model, None, RoutedAdapterConfig(variant="R", num_adapters=4, top_k=2))
    expected = {"olmoe": False, "qwen2_moe": False, "mixtral": True, "deepseek_v3": True, "gpt_oss": True}[family]
    assert all(a.renormalize == expected for a in state.adapters.values())
    forced = apply_routed_adapters(build_tiny(family), None, RoutedAdapterConfig(variant="R", renormalize="yes"))
    assert all(a.renormalize for a in forced.adapters.values())


def test_base_router_quirk_scales_by_the_base_weights():
    """The released OLMoE code's quirk: adapter slot k is scaled by the base router's k-th top-k weight."""
    model, base = _double_model("olmoe"), _double_model("olmoe")
    cfg = RoutedAdapterConfig(variant="R", r=2, dropout=0.0, num_adapters=4, top_k=2, base_router_weights=True)
    state = apply_routed_adapters(model, None, cfg)
    layer, base_layer = find_moe_layers(model)[0], find_moe_layers(base)[0]
    adapter = state.adapters[layer.layer_id]
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(1, 6, model.config.hidden_size, dtype=torch.float64)
    x_TD = x.reshape(-1, x.shape[-1])
    _, base_w = _base_routing(base_layer, x)
    y = _out(layer.block(x)).reshape(-1, x.shape[-1])
    with torch.no_grad():
        y_base = _out(base_layer.block(x)).reshape(-1, x.shape[-1])
        top = (x_TD @ adapter.router.weight.t()).softmax(-1).topk(2, dim=-1).indices
        ref = torch.stack(
            [
                sum(
                    base_w[t, k]
                    * _adapter_ref("lora", adapter.bank.first[j], adapter.bank.second[j], adapter.bank.scaling, x_TD[t])
                    for k, j in enumerate(top[t].tolist())
                )
                for t in range(x_TD.shape[0])
            ]
        )
    torch.testing.assert_close(y, y_base + ref)
    # the new router gets no gradient from the LM side under the quirk, only through its aux loss
    (grad,) = torch.autograd.grad(y.sum(), adapter.router.weight, allow_unused=True, materialize_grads=True)
    assert grad.abs().max() == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["S", "D", "R", "E"])
def test_zero_init_is_a_no_op_and_only_adapters_train(family, variant):
    model = build_tiny(family)
    ids = torch.randint(0, 250, (2, 11))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    state = apply_routed_adapters(model, None, RoutedAdapterConfig(variant=variant, adapter_type="parallel"))
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".routed_adapter." in n for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == state.trainable_params


@pytest.mark.parametrize("adapter_type", ["lora", "parallel"])
def test_parameter_counts_match_the_formulas(adapter_type):
    """S 2Dr, D N*2Dr, R N*2Dr + D*N, E E*2Dr or |sel|*2Dr, per MoE layer, on a 16-layer, 64-expert model."""
    from transformers import AutoModelForCausalLM, OlmoeConfig

    config = OlmoeConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=8,
        num_hidden_layers=16,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=64,
        num_experts_per_tok=8,
    )
    D, r, N, L = 48, 4, 8, 16
    expected = {"S": 2 * D * r, "D": N * 2 * D * r, "R": N * 2 * D * r + D * N, "E": 64 * 2 * D * r}
    for variant, per_layer in expected.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        cfg = RoutedAdapterConfig(variant=variant, adapter_type=adapter_type, r=r, num_adapters=N, top_k=2)
        assert apply_routed_adapters(model, None, cfg).trainable_params == L * per_layer
    hot = {layer: list(range(layer % 5 + 1)) for layer in range(L)}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    cfg = RoutedAdapterConfig(variant="E", adapter_type=adapter_type, r=r, experts="selected")
    state = apply_routed_adapters(model, hot, cfg)
    assert state.trainable_params == sum(len(v) for v in hot.values()) * 2 * D * r


def test_plan_from_config_alone(tmp_path):
    from transformers import OlmoeConfig

    config = OlmoeConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=8,
        num_hidden_layers=16,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=64,
        num_experts_per_tok=8,
    )
    config.save_pretrained(tmp_path)
    result = plan_routed(tmp_path / "config.json", RoutedAdapterConfig(variant="R", r=4, num_adapters=8, top_k=2))
    assert result["trainable_params"] == result["formula_params"] == 16 * (8 * 2 * 48 * 4 + 48 * 8)
    expert_params = 3 * 48 * 8  # gate, up, down of one expert
    activated = result["base_params"] - 16 * (64 - 8) * expert_params
    assert result["activated_params"] == activated
    assert result["trainable_pct_of_activated"] == pytest.approx(100 * result["trainable_params"] / activated)
    hot = plan_routed(tmp_path, RoutedAdapterConfig(variant="E", r=4, experts="selected"), k="25%")
    assert hot["trainable_params"] == 16 * 16 * 2 * 48 * 4


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "modulelist"])
@pytest.mark.parametrize("variant", ["R", "E"])
def test_save_load_round_trip_is_exact_and_merge_is_refused(family, variant, tmp_path):
    model = build_tiny(family)
    experts = {layer.layer_id: [0, 5] for layer in find_moe_layers(model)} if variant == "E" else None
    cfg = RoutedAdapterConfig(
        variant=variant, adapter_type="lora", r=3, num_adapters=3, top_k=2, experts="selected" if experts else "all"
    )
    apply_routed_adapters(model, experts, cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    ids = torch.randint(0, 250, (2, 8))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save_sieve_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["lora"]["method"] == "routed" and saved["lora"]["variant"] == variant
    fresh = build_tiny(family)
    load_sieve_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        got = fresh(input_ids=ids).logits
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="cannot be folded"):
        merge_sieve_lora(fresh)


def test_config_validation_names_the_option():
    with pytest.raises(ValueError, match="--variant"):
        RoutedAdapterConfig(variant="X")
    with pytest.raises(ValueError, match="--top-k-adapters"):
        RoutedAdapterConfig(variant="R", num_adapters=2, top_k=3)
    with pytest.raises(ValueError, match="--adapter-type"):
        RoutedAdapterConfig(adapter_type="prefix")
    assert RoutedAdapterConfig(variant="S", num_adapters=7).num_adapters == 1


def test_routed_lora_config_defaults_are_the_ones_train_and_plan_use():
    """`train --method routed`, `plan --method routed`, RoutedAdapterConfig() and the PEFT RoutedConfig() size the
    adapters alike (train and plan used to give r=32/alpha=64 where the configs said r=8/alpha=16); the sieve
    defaults stay the paper's r=32, alpha=64, dropout=0.05."""
    import typer

    from moe_sieve.adapters import SieveLoraConfig
    from moe_sieve.adapters.peft_method.config import RoutedConfig
    from moe_sieve.cli import app
    from moe_sieve.training import TrainConfig

    def options(config):
        return (config.r, config.alpha, config.dropout)

    trained = TrainConfig(model="m", data="d", out="o", method="routed", variant="R").adapter_config()
    assert options(RoutedAdapterConfig()) == options(trained) == options(RoutedConfig().to_routed_config())
    plan = {p.name: p.default for p in typer.main.get_command(app).commands["plan"].params}
    assert (plan["r"], plan["alpha"]) == (RoutedAdapterConfig().r, RoutedAdapterConfig().alpha)
    assert options(SieveLoraConfig()) == options(TrainConfig(model="m", data="d", out="o")) == (32, 64.0, 0.05)
    with pytest.raises(ValueError, match="--dropout must be in"):
        TrainConfig(model="m", data="d", out="o", dropout=1.0)  # before any model loads


@pytest.mark.parametrize("variant", ["S", "D", "R", "E"])
def test_short_training_lowers_the_loss_on_the_embedded_model(variant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_sieve.demo import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    texts = [f"copy {a}: {a}{a}{a}" for a in range(10)]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    cfg = RoutedAdapterConfig(variant=variant, r=4, alpha=8.0, dropout=0.0, num_adapters=4, top_k=2)
    state = apply_routed_adapters(model, None, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(12):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    if variant == "R":
        assert state.last_aux_loss is not None and state.router_load()["assignments_LN"]


def test_cli_plan_train_eval_with_a_routed_adapter(monkeypatch, capsys, tmp_path):
    """plan --json from config alone; train --method routed logs R's aux loss and writes its router load;
    eval --adapter reloads the adapter; merge refuses with one Error line."""
    from moe_sieve.demo import default_model_path

    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "plan",
        "--method",
        "routed",
        "--variant",
        "R",
        "--num-adapters",
        4,
        "--top-k",
        2,
        "--r",
        4,
        "--json",
    )
    assert code == 0, err
    plan = json.loads(out)
    assert plan["trainable_params"] == plan["formula_params"] == 4 * (4 * 2 * 128 * 4 + 128 * 4)
    assert 0 < plan["trainable_pct_of_total"] < plan["trainable_pct_of_activated"]

    rows = [{"question": f"What is {a} + 1?", "answer": f"{a} + 1 = {a + 1}.\n#### {a + 1}"} for a in range(16)]
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "train",
        "--data",
        f"gsm8k:{data}",
        "--out",
        run,
        "--method",
        "routed",
        "--variant",
        "R",
        "--num-adapters",
        4,
        "--top-k-adapters",
        2,
        "--r",
        4,
        "--alpha",
        8,
        "--max-steps",
        4,
        "--batch-size",
        8,
        "--micro-batch-size",
        8,
        "--logging-steps",
        2,
        "--learning-rate",
        "3e-3",
        "--device",
        "cpu",
    )
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "routed" and metrics["trainable_params"] == plan["trainable_params"]
    routed = metrics["routed"]
    assert [a["step"] for a in routed["aux_loss"]] == [2, 4] and all(a["aux_loss"] > 0 for a in routed["aux_loss"])
    load = routed["adapter_router_load"]
    assert len(load["share_LN"]) == 4 and all(abs(sum(row) - 1) < 1e-9 for row in load["share_LN"])
    assert not (run / "selection.json").exists()  # R needs no routing profile
    # the Trainer's optimizer held every adapter: each adapter's B (zero at init) has moved
    from safetensors.torch import load_file

    saved = load_file(run / "adapter" / "adapter.safetensors")
    bs = [t for name, t in saved.items() if name.endswith("lora_B")]
    assert len(bs) == 4 and all(bool((b.flatten(1).abs().amax(1) > 0).all()) for b in bs), list(saved)

    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "eval",
        "--model",
        default_model_path(),
        "--adapter",
        run / "adapter",
        "--data",
        f"gsm8k:{data}",
        "--max-examples",
        2,
        "--max-new-tokens",
        4,
        "--device",
        "cpu",
        "--out",
        tmp_path / "e.json",
    )
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 2
    code, out, err = run_cli(monkeypatch, capsys, "merge", run / "adapter", "--out", tmp_path / "merged")
    assert code == 2 and "Error:" in err and "cannot be folded" in err


def _olmoe_double(num_experts: int = 8, top_k: int = 2, layers: int = 3, seed: int = 0):
    """A float64 OLMoE with the given expert count (eager experts, so the base has a CPU float64 kernel)."""
    from transformers import AutoModelForCausalLM

    from .conftest import tiny_config

    torch.manual_seed(seed)
    config = tiny_config("olmoe")
    config.num_experts, config.num_experts_per_tok, config.num_hidden_layers = num_experts, top_k, layers
    config._experts_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).double().eval()


def _logits_and_grads(model, state, ids):
    """Logits and the adapters' gradients (A, B per layer, in layer order) of a fixed random objective."""
    out = model(input_ids=ids).logits
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    params = [p for a in state.adapters.values() for p in (a.bank.first, a.bank.second)]
    return out, torch.autograd.grad((out * g).sum(), params)


def _set_bank(state, seed: int) -> None:
    """The same non-trivial adapter weights on every layer's bank, whatever the variant."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in state.adapters.values():
            for p in (adapter.bank.first, adapter.bank.second):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)


@pytest.mark.parametrize("adapter_type", ["lora", "parallel"])
@pytest.mark.parametrize("variant", ["D", "R", "E"])
def test_degenerate_variants_equal_the_shared_adapter(variant, adapter_type):
    """D with N=1, R with N=K=1 and E on a one-expert model all compute S (whole model: logits and gradients).

    Equivalences that must hold whatever the routing code does: catch a routing weight applied twice, a
    missing or doubled scaling, or an adapter reading another hidden state than S's."""
    num_experts = 1 if variant == "E" else 8
    common = dict(adapter_type=adapter_type, r=3, alpha=7.0, dropout=0.0)
    ids = torch.randint(0, 250, (2, 13), generator=torch.Generator().manual_seed(5))
    s_model = _olmoe_double(num_experts, top_k=1 if variant == "E" else 2)
    s_state = apply_routed_adapters(s_model, None, RoutedAdapterConfig(variant="S", **common))
    _set_bank(s_state, 11)
    v_model = _olmoe_double(num_experts, top_k=1 if variant == "E" else 2)
    v_cfg = RoutedAdapterConfig(variant=variant, num_adapters=1, top_k=1, **common)
    v_state = apply_routed_adapters(v_model, None, v_cfg)
    _set_bank(v_state, 11)
    ref, ref_grads = _logits_and_grads(s_model, s_state, ids)
    out, grads = _logits_and_grads(v_model, v_state, ids)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g1, g2 in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-11)
        assert g1.abs().max() > 0
    if variant == "R":  # softmax over one adapter is 1: the router learns nothing from the LM loss
        router = [a.router.weight for a in v_state.adapters.values()]
        grads_router = torch.autograd.grad(v_model(input_ids=ids).logits.sum(), router)
        assert all(g.abs().max() == 0 for g in grads_router)


def test_lora_init_matches_peft():
    """init='zero' is PEFT's LoRA init: A kaiming-uniform(a=sqrt(5)) on [r, D], i.e. U(-1/sqrt(D), 1/sqrt(D)); B = 0."""
    from peft import LoraConfig, get_peft_model

    r = 16
    bank = (
        apply_routed_adapters(_olmoe_double(), None, RoutedAdapterConfig(variant="D", r=r, num_adapters=64, seed=0))
        .adapters[0]
        .bank
    )
    D = bank.hidden_size
    torch.manual_seed(0)
    peft_model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(D, D)), LoraConfig(r=r, target_modules=["0"]))
    peft_A = peft_model.base_model.model[0].lora_A["default"].weight.detach().double() * D**0.5
    ours_A = bank.first.detach().double() * D**0.5  # both in units of the bound 1/sqrt(D)
    assert torch.count_nonzero(bank.second) == 0
    for A in (ours_A, peft_A):
        assert 0.9 < float(A.abs().max()) <= 1.0
        assert abs(float(A.mean())) < 0.05
    torch.testing.assert_close(ours_A.std(), peft_A.std(), rtol=0.08, atol=0)
