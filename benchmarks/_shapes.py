"""Model shapes and the random-weight MoE models the benchmarks share."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, OlmoeConfig, Qwen3MoeConfig

_OLMOE_1B_7B = dict(
    hidden_size=2048,
    intermediate_size=1024,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=64,
    num_experts_per_tok=8,
    vocab_size=50304,
)
# Qwen3-30B-A3B's layer shape (48 layers in the real model); 16 layers keep PEFT all-experts on one 80 GB card.
_QWEN3_30B_A3B = dict(
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    vocab_size=151936,
)

# name -> (config class, config kwargs, default batch size, default sequence length)
PRESETS: dict[str, tuple[type, dict, int, int]] = {
    "tiny": (
        OlmoeConfig,
        dict(
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=8,
            num_experts_per_tok=2,
            vocab_size=512,
        ),
        2,
        32,
    ),
    "qwen3-tiny": (
        Qwen3MoeConfig,
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=True,
            vocab_size=512,
        ),
        2,
        32,
    ),
    "small": (
        OlmoeConfig,
        dict(
            hidden_size=256,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=32,
            num_experts_per_tok=4,
            vocab_size=8192,
        ),
        4,
        128,
    ),
    "olmoe-1b-7b": (OlmoeConfig, _OLMOE_1B_7B, 8, 512),
    "qwen3-30b-a3b-16l": (Qwen3MoeConfig, dict(_QWEN3_30B_A3B, num_hidden_layers=16), 8, 512),
}


def build_model(
    preset: str,
    seq_len: int,
    experts_implementation: str | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """Seeded random weights, built directly on ``device`` in ``dtype`` (a 10B-parameter stack would take
    minutes to initialise on the host); routers get a realistic spread so routing is not uniform."""
    config_cls, kwargs, _, _ = PRESETS[preset]
    torch.manual_seed(0)
    config = config_cls(
        **kwargs,
        max_position_embeddings=max(4096, seq_len),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if experts_implementation:
        config._experts_implementation = experts_implementation
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.02)
    return model


def build_olmoe(preset: str, seq_len: int, experts_implementation: str | None = None) -> torch.nn.Module:
    """The historical entry point (float32 on the host)."""
    return build_model(preset, seq_len, experts_implementation)


def active_params(model: torch.nn.Module) -> int:
    """Parameters a token multiplies through: everything but the embedding, routed experts at top_k / E."""
    config = model.config
    num_experts = getattr(config, "num_experts", None) or config.num_local_experts
    frac = config.num_experts_per_tok / num_experts
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue
        if ".mlp.experts." in name:
            total += p.numel() * frac
        else:
            total += p.numel()
    if getattr(config, "tie_word_embeddings", False):
        total += model.get_input_embeddings().weight.numel()
    return int(total)


def step_flops(model: torch.nn.Module, batch: int, seq_len: int) -> float:
    """FLOPs of one LoRA training step (frozen base): forward 2N and backward input-gradients 2N per token,
    plus causal attention (QK^T and AV: 4 S^2 d per head forward, halved by causality, x3 for fwd + bwd).
    LoRA's own FLOPs (r / hidden of the base) are left out, so MFU is comparable across conditions."""
    config = model.config
    tokens = batch * seq_len
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn = 3 * (4 * seq_len * seq_len * head_dim * config.num_attention_heads // 2) * batch * config.num_hidden_layers
    return 4.0 * active_params(model) * tokens + attn
