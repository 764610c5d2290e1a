"""The memory prediction from shapes against the sizes of the real tensors."""

from __future__ import annotations

import pytest
import torch
from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora
from moe_sieve.adapters.sieve.experts import ExpertLoRA, sieve_lora_experts_forward
from moe_sieve.adapters.sieve.memory import SavedTensorMeter, sieve_experts_saved_bytes, training_state_bytes

from .conftest import VOCAB, build_tiny

HID, INTER, NUM_E, TOP_K, TOKENS, RANK = 64, 48, 16, 4, 96, 8


def _case(dtype: torch.dtype, ids: list[int]):
    torch.manual_seed(0)
    module = OlmoeExperts(OlmoeConfig(hidden_size=HID, intermediate_size=INTER, num_experts=NUM_E))
    module.config._experts_implementation = "sieve_lora"
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.1)
    module = module.to(dtype).requires_grad_(False)
    if ids:
        module.sieve_lora = ExpertLoRA.for_experts(module, ids, r=RANK, alpha=2.0 * RANK)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(TOKENS, HID, generator=gen).to(dtype).requires_grad_(True)
    index = torch.stack([torch.randperm(NUM_E, generator=gen)[:TOP_K] for _ in range(TOKENS)])
    weights = torch.rand(TOKENS, TOP_K, generator=gen).to(dtype).requires_grad_(True)
    return module, hidden, index, weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ids", [[], [2, 5, 11], list(range(NUM_E))], ids=["floor", "hot", "all"])
def test_experts_saved_bytes_equal_the_measured_saved_tensors(dtype: torch.dtype, ids: list[int]) -> None:
    module, hidden, index, weights = _case(dtype, ids)
    meter = SavedTensorMeter(
        exclude=[*module.parameters(), *getattr(module, "sieve_lora", torch.nn.Module()).parameters()]
    )
    with meter:
        out = sieve_lora_experts_forward(module, hidden, index, weights)
    predicted = sieve_experts_saved_bytes(
        num_tokens=TOKENS,
        top_k=TOP_K,
        hidden_size=HID,
        intermediate_size=INTER,
        num_experts=NUM_E,
        dtype=dtype,
        rows_selected=int(torch.isin(index, torch.tensor(ids, dtype=index.dtype)).sum()),
        num_selected=len(ids),
        r=RANK,
    )
    assert meter.bytes == predicted["total"] > 0
    out.float().sum().backward()  # what was saved is what the backward needs
    if ids:
        assert module.sieve_lora.up_A.grad is not None
    # the LoRA part scales with the selected rows only: the hot prediction lies strictly between floor and all
    if ids and len(ids) < NUM_E:
        kw = dict(num_tokens=TOKENS, top_k=TOP_K, hidden_size=HID, intermediate_size=INTER, num_experts=NUM_E)
        floor = sieve_experts_saved_bytes(**kw, dtype=dtype)["total"]
        everything = sieve_experts_saved_bytes(**kw, dtype=dtype, num_selected=NUM_E, r=RANK)["total"]
        assert floor < predicted["total"] < everything


def test_training_state_bytes_equal_params_grads_and_adamw_states() -> None:
    model = build_tiny("qwen2_moe")
    apply_sieve_lora(model, {0: [1], 1: [0, 3], 2: [5]}, SieveLoraConfig(r=4, alpha=8.0, dropout=0.0, seed=0))
    predicted = training_state_bytes(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    input_ids = torch.randint(0, VOCAB - 3, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    grads = sum(p.grad.nbytes for p in trainable)
    states = sum(t.nbytes for state in optimizer.state.values() for name, t in state.items() if name != "step")
    params = sum(p.nbytes for p in model.parameters())
    assert predicted["grads"] == grads and predicted["optimizer_states"] == states
    assert predicted["frozen_params"] + predicted["trainable_params"] == params
    assert predicted["total"] == params + grads + states
    assert 0 < predicted["trainable_params"] < predicted["frozen_params"]
