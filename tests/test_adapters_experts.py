"""ExpertLoRA and the ``sieve_lora`` experts forward against a naive per-(token, expert) weight-space loop."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn
from transformers import GptOssConfig, OlmoeConfig, OlmoeForCausalLM
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

import moe_sieve.adapters.sieve.experts as experts_mod
from moe_sieve.adapters.sieve.experts import (
    SIEVE_EXPERTS_IMPLEMENTATION,
    ExpertLoRA,
    compile_config,
    grouped_mm,
    iter_fused_experts,
    register_sieve_experts_implementation,
    restore_experts_implementation,
    sieve_lora_experts_forward,
    use_sieve_experts,
)

H, FF, E, K, T = 16, 8, 6, 2, 11
R, ALPHA = 4, 8.0
LAYOUTS = ["olmoe", "gpt_oss", "transposed_concat_bias", "no_gate_bias", "post_norm"]
SELECTIONS = [[], [2], [0, 3, 5], list(range(E))]


def _randomize(module: nn.Module, seed: int, std: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def _generic_experts(*, has_gate: bool, is_transposed: bool, is_concatenated: bool, has_bias: bool) -> nn.Module:
    """A decorated experts class with the given layout flags (layouts no tiny HF config covers portably)."""

    @use_experts_implementation(
        has_gate=has_gate, is_transposed=is_transposed, is_concatenated=is_concatenated, has_bias=has_bias
    )
    class TinyExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = E
            cols = (2 if has_gate else 1) * FF
            name = "gate_up_proj" if has_gate else "up_proj"
            setattr(self, name, nn.Parameter(torch.empty(E, *((H, cols) if is_transposed else (cols, H)))))
            self.down_proj = nn.Parameter(torch.empty(E, *((FF, H) if is_transposed else (H, FF))))
            if has_bias:
                setattr(self, f"{name}_bias", nn.Parameter(torch.empty(E, cols)))
                self.down_proj_bias = nn.Parameter(torch.empty(E, H))
            self.act_fn = nn.SiLU() if has_gate else nn.GELU()

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise NotImplementedError

    return TinyExperts(types.SimpleNamespace(_experts_implementation=SIEVE_EXPERTS_IMPLEMENTATION))


def make_experts(layout: str, seed: int = 0) -> nn.Module:
    if layout == "olmoe":
        config = OlmoeConfig(hidden_size=H, intermediate_size=FF, num_experts=E, num_experts_per_tok=K)
        module = OlmoeExperts(config)
    elif layout == "gpt_oss":
        config = GptOssConfig(
            hidden_size=H,
            intermediate_size=FF,
            num_local_experts=E,
            num_experts_per_tok=K,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=4,
        )
        module = GptOssExperts(config)
    elif layout == "transposed_concat_bias":
        module = _generic_experts(has_gate=True, is_transposed=True, is_concatenated=True, has_bias=True)
    elif layout == "no_gate_bias":
        module = _generic_experts(has_gate=False, is_transposed=False, is_concatenated=True, has_bias=True)
    elif layout == "post_norm":
        module = _generic_experts(has_gate=True, is_transposed=False, is_concatenated=True, has_bias=False)
        module.has_post_expert_norm = True
        module.post_expert_norm = nn.LayerNorm(H)
    else:
        raise ValueError(layout)
    if layout in ("olmoe", "gpt_oss"):
        module.config._experts_implementation = "eager"
    _randomize(module, seed)
    return module.double()


def make_lora(module: nn.Module, ids: list[int], seed: int = 1, dropout: float = 0.0) -> ExpertLoRA:
    lora = ExpertLoRA.for_experts(module, ids, r=R, alpha=ALPHA, dropout=dropout)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith("_B"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return lora


def make_routing(seed: int = 2, dense: bool = False, sentinel: bool = False):
    gen = torch.Generator().manual_seed(seed)
    hidden_TH = torch.randn(T, H, generator=gen, dtype=torch.float64)
    top_k_index_TK = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    top_k_weights_TK = torch.rand(T, K, generator=gen, dtype=torch.float64)
    if sentinel:
        top_k_index_TK[1, 0] = E
        top_k_index_TK[4, 1] = E
        top_k_index_TK[7, 0] = E
    if dense:
        weights_TE = torch.rand(T, E, generator=gen, dtype=torch.float64)
        return hidden_TH, top_k_index_TK, weights_TE
    return hidden_TH, top_k_index_TK, top_k_weights_TK


def _math_weights(module: nn.Module, lora: ExpertLoRA | None, e: int) -> dict[str, torch.Tensor]:
    """Expert ``e``'s (out, in) matrices with ``W + s B A`` built explicitly when ``e`` is selected."""
    t = module.is_transposed
    weights: dict[str, torch.Tensor] = {}
    if module.has_gate:
        gate_up = module.gate_up_proj[e].T if t else module.gate_up_proj[e]  # [2I, H]
        inter = gate_up.shape[0] // 2
        if module.is_concatenated:
            weights["gate"], weights["up"] = gate_up[:inter], gate_up[inter:]
        else:
            weights["gate"], weights["up"] = gate_up[0::2], gate_up[1::2]
    else:
        weights["up"] = module.up_proj[e].T if t else module.up_proj[e]
    weights["down"] = module.down_proj[e].T if t else module.down_proj[e]  # [H, I]
    ids = [] if lora is None else lora.expert_ids.tolist()
    if e in ids:
        slot = ids.index(e)
        for name in list(weights):
            lora_A, lora_B = getattr(lora, f"{name}_A")[slot], getattr(lora, f"{name}_B")[slot]
            weights[name] = weights[name] + lora.scaling * (lora_B.to(lora_A.dtype) @ lora_A).to(weights[name].dtype)
    return weights


def reference_forward(module, lora, hidden_TH, top_k_index_TK, weights) -> torch.Tensor:
    """Per-token, per-k loop applying each routed expert's merged weights; sentinel ids skipped."""
    rows = []
    for t in range(hidden_TH.shape[0]):
        acc = torch.zeros(hidden_TH.shape[-1], dtype=hidden_TH.dtype)
        x = hidden_TH[t]
        for k in range(top_k_index_TK.shape[1]):
            e = int(top_k_index_TK[t, k])
            if e >= module.num_experts:
                continue
            w = weights[t, k] if weights.shape[-1] == top_k_index_TK.shape[1] else weights[t, e]
            mats = _math_weights(module, lora, e)
            if module.has_gate:
                gate, up = mats["gate"] @ x, mats["up"] @ x
                pre = torch.cat([gate, up]) if module.is_concatenated else torch.stack([gate, up], dim=-1).flatten()
                if module.has_bias:
                    pre = pre + module.gate_up_proj_bias[e]
                h = module._apply_gate(pre[None])[0]
            else:
                pre = mats["up"] @ x
                if module.has_bias:
                    pre = pre + module.up_proj_bias[e]
                h = module.act_fn(pre)
            y = mats["down"] @ h
            if module.has_bias:
                y = y + module.down_proj_bias[e]
            if getattr(module, "has_post_expert_norm", False):
                y = module.post_expert_norm(y[None])[0]
            acc = acc + w * y
        rows.append(acc)
    return torch.stack(rows)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    grads = torch.autograd.grad((out * proj).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-10) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# --- forward and gradients against the naive reference -------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ids", SELECTIONS, ids=lambda s: f"sel{len(s)}")
@pytest.mark.parametrize("routing", ["topk", "dense", "sentinel"])
def test_forward_and_grads_match_reference(layout: str, ids: list[int], routing: str) -> None:
    module = make_experts(layout)
    if routing == "sentinel":
        module._is_expert_parallel = True
    module.sieve_lora = make_lora(module, ids)
    hidden_TH, top_k_index_TK, weights = make_routing(dense=routing == "dense", sentinel=routing == "sentinel")
    hidden_TH.requires_grad_(True)
    weights.requires_grad_(True)
    inputs = [hidden_TH, weights, *module.parameters()]

    out = sieve_lora_experts_forward(module, hidden_TH, top_k_index_TK, weights)
    ref = reference_forward(module, module.sieve_lora, hidden_TH, top_k_index_TK, weights)
    _assert_close(out, ref)
    for got, want in zip(_grads(out, inputs), _grads(ref, inputs), strict=True):
        _assert_close(got, want)


def test_sentinel_pairs_contribute_nothing() -> None:
    module = make_experts("olmoe")
    module._is_expert_parallel = True
    module.sieve_lora = make_lora(module, [0, 3])
    hidden_TH, top_k_index_TK, weights_TK = make_routing(sentinel=True)
    weights_TK.requires_grad_(True)
    out = sieve_lora_experts_forward(module, hidden_TH, top_k_index_TK, weights_TK)
    (grad_w,) = torch.autograd.grad(out.sum(), weights_TK)
    assert torch.all(grad_w[top_k_index_TK == E] == 0)
    kept = top_k_index_TK.clone()
    kept[top_k_index_TK == E] = 0
    kept_weights = weights_TK.detach().masked_fill(top_k_index_TK == E, 0.0)
    _assert_close(out, sieve_lora_experts_forward(module, hidden_TH, kept, kept_weights))


def test_frozen_base_gets_no_grads_and_lora_grads_match() -> None:
    module = make_experts("gpt_oss")
    module.requires_grad_(False)
    module.sieve_lora = make_lora(module, [1, 4])
    module.sieve_lora.requires_grad_(True)
    hidden_TH, top_k_index_TK, weights_TK = make_routing()
    lora_params = list(module.sieve_lora.parameters())
    out = sieve_lora_experts_forward(module, hidden_TH, top_k_index_TK, weights_TK)
    ref = reference_forward(module, module.sieve_lora, hidden_TH, top_k_index_TK, weights_TK)
    for got, want in zip(_grads(out, lora_params), _grads(ref, lora_params), strict=True):
        _assert_close(got, want)
    sieve_lora_experts_forward(module, hidden_TH, top_k_index_TK, weights_TK).sum().backward()
    assert all(p.grad is None for p in module.parameters() if not p.requires_grad)
    assert all(p.grad is not None for p in lora_params)


def test_lora_matmuls_see_only_selected_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    module = make_experts("olmoe")
    module._is_expert_parallel = True
    ids = [1, E - 1]  # sentinels are clamped to E - 1 for bias lookups; they must still skip the LoRA
    module.sieve_lora = make_lora(module, ids)
    hidden_TH, top_k_index_TK, weights_TK = make_routing(sentinel=True)
    calls: list[tuple[int, int]] = []

    def spy(x, w, offsets):
        calls.append((x.shape[0], w.shape[0]))
        return grouped_mm(x, w, offsets)

    monkeypatch.setattr(experts_mod, "grouped_mm", spy)
    sieve_lora_experts_forward(module, hidden_TH, top_k_index_TK, weights_TK)
    routed_to_selected = int(torch.isin(top_k_index_TK, torch.tensor(ids)).sum())
    lora_calls = [rows for rows, groups in calls if groups == len(ids)]
    base_calls = [rows for rows, groups in calls if groups == E]
    assert len(base_calls) == 2 and all(rows == T * K for rows in base_calls)
    # gate|up A (stacked), gate|up B (block-diagonal), down A, down B: four GEMMs over the selected rows only
    assert len(lora_calls) == 4 and all(rows == routed_to_selected for rows in lora_calls)


# --- equality with transformers' own implementations ----------------------------------------------------


@pytest.mark.parametrize("layout", ["olmoe", "gpt_oss"])
@pytest.mark.parametrize("attach", [True, False], ids=["fresh_lora", "no_lora"])
def test_zero_update_equals_transformers_base(layout: str, attach: bool) -> None:
    module = make_experts(layout)
    if attach:
        module.sieve_lora = ExpertLoRA.for_experts(module, [0, 2, 5], r=R, alpha=ALPHA)
    hidden_TH, top_k_index_TK, weights_TK = make_routing()
    out = sieve_lora_experts_forward(module, hidden_TH, top_k_index_TK, weights_TK)
    eager = module(hidden_TH, top_k_index_TK, weights_TK)
    batched = ALL_EXPERTS_FUNCTIONS["batched_mm"](module, hidden_TH, top_k_index_TK, weights_TK)
    _assert_close(out, eager, atol=1e-12)
    _assert_close(out, batched, atol=1e-12)

    module32 = copy.deepcopy(module).float()  # transformers' native grouped_mm has no float64 CPU kernel
    args32 = (hidden_TH.float(), top_k_index_TK, weights_TK.float())
    grouped = ALL_EXPERTS_FUNCTIONS["grouped_mm"](module32, *args32)
    _assert_close(sieve_lora_experts_forward(module32, *args32), grouped, atol=1e-5)


def test_absent_lora_equals_base_reference() -> None:
    for layout in LAYOUTS:
        module = make_experts(layout)
        hidden_TH, top_k_index_TK, weights_TK = make_routing()
        out = sieve_lora_experts_forward(module, hidden_TH, top_k_index_TK, weights_TK)
        _assert_close(out, reference_forward(module, None, hidden_TH, top_k_index_TK, weights_TK))


# --- dropout --------------------------------------------------------------------------------------------


def test_dropout_modes() -> None:
    module = make_experts("olmoe")
    module.sieve_lora = make_lora(module, [0, 2, 3], dropout=0.5)
    args = make_routing()
    ref = reference_forward(module, module.sieve_lora, *args)

    module.sieve_lora.eval()
    first = sieve_lora_experts_forward(module, *args)
    assert torch.equal(first, sieve_lora_experts_forward(module, *args))
    _assert_close(first, ref)

    module.sieve_lora.train()
    torch.manual_seed(0)
    assert not torch.allclose(sieve_lora_experts_forward(module, *args), first, atol=1e-6)

    module.sieve_lora.dropout.p = 1.0
    dropped = sieve_lora_experts_forward(module, *args)
    lora = module.sieve_lora
    del module.sieve_lora
    assert torch.equal(dropped, sieve_lora_experts_forward(module, *args))
    assert not torch.allclose(dropped, first, atol=1e-6)
    assert isinstance(lora, ExpertLoRA)


@pytest.mark.parametrize("layout", ["olmoe", "no_gate_bias"])
def test_dropout_called_once_per_projection_input(layout: str) -> None:
    module = make_experts(layout)
    module.sieve_lora = make_lora(module, [1, 2], dropout=0.1)
    calls: list[int] = []
    module.sieve_lora.dropout.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[1]))
    sieve_lora_experts_forward(module, *make_routing())
    assert calls == ([H, H, FF] if module.has_gate else [H, FF])


# --- construction, merge layout, registration -----------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_for_experts_shapes_and_init(layout: str) -> None:
    module = make_experts(layout)
    lora = ExpertLoRA.for_experts(module, [4, 1], r=R, alpha=ALPHA, dropout=0.05)
    n = 2
    assert lora.expert_ids.tolist() == [1, 4]
    assert lora.slot_of_expert.tolist() == [-1, 0, -1, -1, 1, -1]
    assert lora.scaling == ALPHA / R and lora.dropout.p == 0.05
    shapes = {name: tuple(p.shape) for name, p in lora.named_parameters()}
    expected = {"up_A": (n, R, H), "up_B": (n, FF, R), "down_A": (n, R, FF), "down_B": (n, H, R)}
    if module.has_gate:
        expected |= {"gate_A": (n, R, H), "gate_B": (n, FF, R)}
    assert shapes == expected
    assert all(p.dtype == torch.float64 for p in lora.parameters())
    assert lora.is_transposed == module.is_transposed and lora.is_concatenated == module.is_concatenated
    for name, p in lora.named_parameters():
        if name.endswith("_B"):
            assert torch.count_nonzero(p) == 0
        else:
            bound = 1 / p.shape[-1] ** 0.5  # kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), +)
            assert p.abs().max() <= bound and p.std() > bound / 4
    assert set(lora.state_dict()) == set(expected)


def test_rejects_bad_expert_ids() -> None:
    with pytest.raises(ValueError, match="expert ids"):
        ExpertLoRA([0, E], E, H, FF, R, ALPHA)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_delta_weights_merge_reproduces_lora_forward(layout: str) -> None:
    module = make_experts(layout)
    ids = [0, 3, 4]
    module.sieve_lora = make_lora(module, ids)
    args = make_routing()
    expected = sieve_lora_experts_forward(module, *args)

    merged = copy.deepcopy(module)
    deltas = merged.sieve_lora.delta_weights()
    del merged.sieve_lora
    with torch.no_grad():
        for name, delta in deltas.items():
            assert delta.shape == (len(ids), *getattr(merged, name).shape[1:])
            getattr(merged, name)[ids] += delta
    _assert_close(reference_forward(merged, None, *args), expected)
    if layout in ("olmoe", "gpt_oss"):
        _assert_close(merged(*args), expected)


def test_mixed_dtype_lora_runs_in_its_own_dtype() -> None:
    module = make_experts("gpt_oss")
    module.sieve_lora = ExpertLoRA.for_experts(module, [1, 2], r=R, alpha=ALPHA, dtype=torch.float32)
    with torch.no_grad():
        module.sieve_lora.up_B.fill_(0.1)
    args = make_routing()
    out = sieve_lora_experts_forward(module, *args)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert module.sieve_lora.up_B.grad.dtype == torch.float32
    _assert_close(out, reference_forward(module, module.sieve_lora.double(), *args), atol=1e-5)


@pytest.mark.parametrize("sizes", [[3, 0, 2, 4], [0, 0, 5], [2, 1, 0]])
def test_grouped_mm_helper(sizes: list[int]) -> None:
    gen = torch.Generator().manual_seed(3)
    tail = 2
    x = torch.randn(sum(sizes) + tail, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(len(sizes), 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    out = grouped_mm(x, w, offsets)
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    expected = torch.cat([torch.einsum("si,sio->so", x[: len(group)], w[group]), torch.zeros(tail, 3)])
    _assert_close(out, expected)
    for got, want in zip(_grads(out, [x, w]), _grads(expected, [x, w]), strict=True):
        _assert_close(got, want)


def _loop_only(x, w, offsets):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experts_mod, "_cpu_native_grouped_mm_ok", lambda *args: False)
        return grouped_mm(x, w, offsets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dim", [8, 2], ids=["aligned", "r2"])
def test_cpu_native_grouped_mm_is_the_loop_bit_for_bit(dtype: torch.dtype, out_dim: int) -> None:
    """CPU runs torch's one-op grouped GEMM where rows are aligned and covered: equal to the mm loop bit for bit,
    forward and backward, and any operand it cannot take (a rank-2 LoRA factor: 8-byte rows) takes the loop."""
    if not experts_mod._cpu_grouped_mm_available():
        pytest.skip("this torch has no CPU grouped_mm kernel")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, 16, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(4, 16, out_dim, generator=gen).to(dtype).requires_grad_()
    offsets = torch.tensor([7, 7, 25, 40], dtype=torch.int32)
    aligned = (out_dim * x.element_size()) % 16 == 0
    assert experts_mod._cpu_native_grouped_mm_ok(x, w, offsets) == aligned
    out, loop = grouped_mm(x, w, offsets), _loop_only(x, w, offsets)
    assert torch.equal(out, loop)
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    for got, want in zip(torch.autograd.grad(out, [x, w], grad), torch.autograd.grad(loop, [x, w], grad), strict=True):
        assert torch.equal(got, want)
    grouped_mm(x, w, offsets).sum().backward()  # an expanded (stride-0) output gradient
    assert x.grad is not None and w.grad is not None
    short = torch.tensor([7, 7, 25, 38], dtype=torch.int32)  # two rows past the end: only the loop zeroes them
    assert not experts_mod._cpu_native_grouped_mm_ok(x, w, short)
    assert not grouped_mm(x, w, short)[38:].any()


def _tiny_olmoe() -> OlmoeForCausalLM:
    config = OlmoeConfig(
        vocab_size=64,
        hidden_size=H,
        intermediate_size=FF,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=E,
        num_experts_per_tok=K,
    )
    torch.manual_seed(0)
    model = OlmoeForCausalLM(config).double().eval()
    model.set_experts_implementation("eager")
    for i, (_, experts) in enumerate(iter_fused_experts(model)):
        _randomize(experts, seed=10 + i)
    return model


def test_registration_and_model_logits_match_merged_eager() -> None:
    register_sieve_experts_implementation()
    register_sieve_experts_implementation()
    assert ALL_EXPERTS_FUNCTIONS[SIEVE_EXPERTS_IMPLEMENTATION] is sieve_lora_experts_forward

    model = _tiny_olmoe()
    selections = [[0, 5], [1, 2, 3]]
    found = list(iter_fused_experts(model))
    assert len(found) == 2
    for (_, experts), ids in zip(found, selections, strict=True):
        experts.sieve_lora = make_lora(experts, ids, seed=len(ids))
    merged = copy.deepcopy(model)
    for _, experts in iter_fused_experts(merged):
        deltas = experts.sieve_lora.delta_weights()
        ids = experts.sieve_lora.expert_ids
        del experts.sieve_lora
        with torch.no_grad():
            for name, delta in deltas.items():
                getattr(experts, name)[ids] += delta

    input_ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    base_logits = model(input_ids).logits
    previous = use_sieve_experts(model)
    assert set(previous.values()) == {"eager"}
    assert all(m.config._experts_implementation == SIEVE_EXPERTS_IMPLEMENTATION for _, m in found)
    sieve_logits = model(input_ids).logits
    torch.testing.assert_close(sieve_logits, merged(input_ids).logits, atol=1e-8, rtol=0)
    assert not torch.allclose(sieve_logits, base_logits, atol=1e-6)

    restore_experts_implementation(model, previous)
    assert all(m.config._experts_implementation == "eager" for _, m in found)
    torch.testing.assert_close(model(input_ids).logits, base_logits, atol=0, rtol=0)


def test_use_sieve_experts_requires_fused_experts() -> None:
    with pytest.raises(ValueError, match="no fused experts"):
        use_sieve_experts(nn.Linear(2, 2))


# --- whole models against the naive per-token reference (families, shared experts, 16 layers) ----------

NAIVE = "sieve_naive_reference"
MODEL_FAMILIES = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"]


def _naive_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """An experts backend that runs :func:`reference_forward` (merged weights, token by token)."""
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    index_TK = top_k_index.reshape(flat.shape[0], -1)
    weights = top_k_weights.reshape(flat.shape[0], -1)
    out = reference_forward(self, getattr(self, "sieve_lora", None), flat, index_TK, weights)
    return out.reshape(hidden_states.shape)


def _model_with_lora(family: str, experts: str, **overrides) -> nn.Module:
    """A float64 tiny model with attention/router/shared/expert LoRA, every ``B`` random (non-zero update)."""
    from transformers import AutoModelForCausalLM

    from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora
    from moe_sieve.arch import find_moe_layers

    from .conftest import build_tiny, tiny_config

    if overrides:
        torch.manual_seed(0)
        config = tiny_config(family)
        for key, value in overrides.items():
            setattr(config, key, value)
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[0]] * config.num_hidden_layers
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                    param.normal_(0.0, 1.0)
    else:
        model = build_tiny(family)
    model = model.double()
    layers = find_moe_layers(model)
    num_experts = layers[0].num_experts
    selection = {
        layer.layer_id: sorted({layer.layer_id % num_experts, (3 * layer.layer_id + 1) % num_experts})
        for layer in layers
    }
    config = SieveLoraConfig(r=R, alpha=ALPHA, dropout=0.0, seed=0, experts=experts)
    apply_sieve_lora(model, selection if experts == "selected" else None, config)
    if experts == "none":
        use_sieve_experts(model)  # the floor on the same backend
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and (name.endswith(("_B", "lora_B", "lora_B.weight")) or "lora_B" in name):
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.2)
    return model.train()


def _naive_twin(model: nn.Module) -> nn.Module:
    ALL_EXPERTS_FUNCTIONS.register(NAIVE, _naive_experts_forward)
    twin = copy.deepcopy(model)
    restore_experts_implementation(twin, {name: NAIVE for name, _ in iter_fused_experts(twin)})
    return twin


def _loss_and_grads(model: nn.Module, input_ids: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(input_ids=input_ids, labels=input_ids)
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)  # e.g. a selected expert no token chose
    return out.logits, [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def _assert_model_matches_naive(model: nn.Module, seq_len: int = 9) -> None:
    from .conftest import VOCAB

    input_ids = torch.randint(0, VOCAB - 3, (2, seq_len), generator=torch.Generator().manual_seed(3))
    assert all(m.config._experts_implementation == SIEVE_EXPERTS_IMPLEMENTATION for _, m in iter_fused_experts(model))
    logits, grads = _loss_and_grads(model, input_ids)
    ref_logits, ref_grads = _loss_and_grads(_naive_twin(model), input_ids)
    _assert_close(logits, ref_logits)
    assert len(grads) == len(ref_grads) > 0
    for got, want in zip(grads, ref_grads, strict=True):
        _assert_close(got, want)


def test_experts_only_targets_match_naive_reference() -> None:
    """Without attention LoRA the first layer's hidden states need no gradient: the in-place row adds and
    gathers must still route gradients to the expert LoRA."""
    from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora

    from .conftest import build_tiny

    model = build_tiny("olmoe").double()
    config = SieveLoraConfig(r=R, alpha=ALPHA, dropout=0.0, seed=0, targets=("experts",))
    apply_sieve_lora(model, {0: [1, 2], 1: [3], 2: [0, 7]}, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and name.endswith("_B"):
                param.normal_(0.0, 0.2)
    _assert_model_matches_naive(model.train())


@pytest.mark.parametrize("family", MODEL_FAMILIES)
@pytest.mark.parametrize("experts", ["selected", "all", "none"], ids=["hot", "all_experts", "floor"])
def test_model_logits_and_grads_match_naive_reference(family: str, experts: str) -> None:
    """Every family (qwen2_moe and deepseek_v3 with shared experts): hot / all / no expert LoRA on one backend."""
    _assert_model_matches_naive(_model_with_lora(family, experts))


@pytest.mark.parametrize("family", ["olmoe", pytest.param("qwen2_moe", marks=pytest.mark.slow)])
def test_sixteen_layer_model_matches_naive_reference(family: str) -> None:
    model = _model_with_lora(family, "selected", num_hidden_layers=16, num_experts=32, num_experts_per_tok=4)
    assert len(list(iter_fused_experts(model))) == 16
    _assert_model_matches_naive(model, seq_len=7)


# --- bf16: within tolerance of the float64 reference, no worse than transformers' own backend ------------


def _bf16_case(ids: list[int]):
    torch.manual_seed(0)
    config = OlmoeConfig(hidden_size=64, intermediate_size=32, num_experts=16, num_experts_per_tok=4)
    module = OlmoeExperts(config)
    module.config._experts_implementation = "grouped_mm"
    _randomize(module, 0, std=0.2)
    module = module.bfloat16()
    if ids:
        module.sieve_lora = ExpertLoRA.for_experts(module, ids, r=8, alpha=16.0)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in module.sieve_lora.named_parameters():
                if name.endswith("_B"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(96, 64, generator=gen).bfloat16()
    index = torch.stack([torch.randperm(16, generator=gen)[:4] for _ in range(96)])
    weights = torch.softmax(torch.randn(96, 4, generator=gen), -1).bfloat16()
    return module, hidden, index, weights


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).abs().max() / want.detach().abs().max())


@pytest.mark.parametrize("ids", [[], [0, 5, 9, 12]], ids=["floor", "hot"])
def test_bf16_within_tolerance_of_float64_reference(ids: list[int]) -> None:
    module, hidden, index, weights = _bf16_case(ids)
    hidden.requires_grad_(True)
    lora = getattr(module, "sieve_lora", None)
    params = [hidden, *(lora.parameters() if lora is not None else [])]
    out = sieve_lora_experts_forward(module, hidden, index, weights)
    assert out.dtype == torch.bfloat16

    ref_module = copy.deepcopy(module).double()
    ref_hidden = hidden.detach().double().requires_grad_(True)
    ref_lora = getattr(ref_module, "sieve_lora", None)
    ref_params = [ref_hidden, *(ref_lora.parameters() if ref_lora is not None else [])]
    ref = reference_forward(ref_module, ref_lora, ref_hidden, index, weights.double())
    assert _rel_err(out, ref) < 2e-2  # bf16 has 8 mantissa bits: 2^-8 = 3.9e-3 per rounding
    for got, want in zip(_grads(out.double(), params), _grads(ref, ref_params), strict=True):
        assert _rel_err(got, want) < 3e-2
    # No worse than transformers' own grouped_mm backend on the same bf16 weights (floor: same math).
    if not ids:
        theirs = ALL_EXPERTS_FUNCTIONS["grouped_mm"](module, hidden.detach(), index, weights)
        assert _rel_err(out, ref) <= 1.5 * _rel_err(theirs, ref) + 1e-3


# --- the ops a forward + backward runs: no masked_fill, no dtype copies, no sorted index_put ------------


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.float_casts: list[tuple] = []
        self.accumulating_index_put = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops.append(name)
        out = func(*args, **kwargs)
        if name in ("_to_copy", "to", "copy_") and isinstance(out, torch.Tensor):
            src = args[1] if name == "copy_" else args[0]
            if src.is_floating_point() and out.is_floating_point() and src.dtype != out.dtype:
                self.float_casts.append((name, tuple(src.shape), src.dtype, out.dtype))
        if name.startswith("index_put") and (args[3] if len(args) > 3 else kwargs.get("accumulate", False)):
            self.accumulating_index_put += 1
        return out


@pytest.mark.parametrize("ids", [[], [1, 4, 7], list(range(16))], ids=["floor", "hot", "all"])
@pytest.mark.parametrize("expert_parallel", [False, True], ids=["no_ep", "ep"])
def test_no_masked_fill_or_dtype_copy_without_expert_parallelism(ids: list[int], expert_parallel: bool) -> None:
    module, hidden, index, weights = _bf16_case(ids)
    module._is_expert_parallel = expert_parallel
    hidden.requires_grad_(True)
    recorder = _OpRecorder()
    with recorder:
        out = sieve_lora_experts_forward(module, hidden, index, weights)
        out.float().square().sum().backward()
    masked = [op for op in recorder.ops if op.startswith("masked_fill")]
    if expert_parallel:  # the sentinel masks exist only for expert parallelism (so the count can fail)
        assert masked
    else:
        assert masked == []
        assert recorder.accumulating_index_put == 0
    # The only float cast is the test's own out.float() (and its backward); none inside the experts block.
    casts = [c for c in recorder.float_casts if c[1] != tuple(out.shape)]
    assert casts == []


# --- torch.compile(fullgraph=True): no graph breaks, same values and gradients as eager ------------------


def _decoder_layer_fn(model: nn.Module, layer_idx: int):
    layer = model.model.layers[layer_idx]

    def run(x: torch.Tensor) -> torch.Tensor:
        position_ids = torch.arange(x.shape[1], device=x.device)[None]
        position_embeddings = model.model.rotary_emb(x, position_ids)
        out = layer(x, attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings)
        return out[0] if isinstance(out, tuple) else out

    return run


def _compiled_matches_eager(experts: str, backend: str, dtype: torch.dtype, atol: float) -> None:
    model = _model_with_lora("olmoe", experts).to(dtype)
    run = _decoder_layer_fn(model, 1)
    params = [p for p in model.model.layers[1].parameters() if p.requires_grad]
    x = torch.randn(2, 12, model.config.hidden_size, generator=torch.Generator().manual_seed(4), dtype=dtype)

    def loss_and_grads(fn):
        xr = x.clone().requires_grad_(True)
        out = fn(xr)
        return out, torch.autograd.grad(out.square().sum(), [xr, *params])

    with compile_config():
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(run)(x)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(run, fullgraph=True, backend=backend)
        out, grads = loss_and_grads(compiled)
    if experts == "selected":  # without the config the selected rows' nonzero() is a graph break: the test can fail
        torch._dynamo.reset()
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False):
            reasons = torch._dynamo.explain(run)(x).break_reasons
        assert any("nonzero" in str(reason.reason) for reason in reasons)
    torch._dynamo.reset()
    ref_out, ref_grads = loss_and_grads(run)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=atol, rtol=0)


@pytest.mark.parametrize("experts", ["selected", "all", "none"], ids=["hot", "all_experts", "floor"])
def test_decoder_layer_compiles_fullgraph(experts: str) -> None:
    """Dynamo captures attention + router + sieve experts (the data-dependent selected rows included) in one
    graph; AOT autograd's traced forward and backward reproduce eager exactly in float64."""
    _compiled_matches_eager(experts, "aot_eager", torch.float64, atol=1e-10)


@pytest.mark.slow
def test_decoder_layer_compiles_with_inductor() -> None:
    """The same graph through inductor's CPU C++ codegen (needs a C++ compiler, gcc here; 20-70 s on the
    shared 2-core box); the fast aot_eager test covers graph capture and the traced backward."""
    _compiled_matches_eager("selected", "inductor", torch.float32, atol=1e-4)
