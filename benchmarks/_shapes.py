"""Model shapes and the random-weight OLMoE the benchmarks share."""

from __future__ import annotations

import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

PRESETS = {
    "small": dict(
        hidden_size=256,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=32,
        num_experts_per_tok=4,
        vocab_size=8192,
    ),
    "olmoe-1b-7b": dict(
        hidden_size=2048,
        intermediate_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=64,
        num_experts_per_tok=8,
        vocab_size=50304,
    ),
}


def build_olmoe(preset: str, seq_len: int, experts_implementation: str | None = None) -> OlmoeForCausalLM:
    """Seeded random weights; routers get a realistic spread so routing is not uniform."""
    torch.manual_seed(0)
    config = OlmoeConfig(
        **PRESETS[preset],
        max_position_embeddings=max(4096, seq_len),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if experts_implementation:
        config._experts_implementation = experts_implementation
    model = OlmoeForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.02)
    return model
