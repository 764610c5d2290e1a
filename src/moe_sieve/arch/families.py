"""The model families moe-sieve knows: one :class:`ArchSpec` each, registered on import of ``moe_sieve.arch``.
A new family is one more entry here (or a ``register_arch`` call in user code)."""

from __future__ import annotations

from .registry import ArchSpec, register_arch, routing_from_scores_and_logits, routing_from_tuple

for _spec in (
    ArchSpec(
        "olmoe",
        ("olmoe", "flex_olmo"),
        serving_router_lora=("vllm",),
        description="OLMoE: fused experts, no shared experts",
    ),
    ArchSpec(
        "qwen2_moe",
        ("qwen2_moe",),
        serving_router_lora=("vllm",),
        description="Qwen1.5/Qwen2-MoE: fused experts, gated shared expert",
    ),
    ArchSpec(
        "qwen3_moe",
        ("qwen3_moe",),
        serving_router_lora=("vllm",),
        description="Qwen3-MoE: fused experts, no shared experts",
    ),
    ArchSpec(
        "mixtral",
        ("mixtral",),
        serving_expert_projections=("w1", "w3", "w2"),
        serving_moe_block="block_sparse_moe",
        serving_router_lora=("vllm",),
        description="Mixtral: fused experts, no shared experts",
    ),
    ArchSpec(
        "deepseek_v3",
        ("deepseek_v3", "deepseek_v2", "glm4_moe", "kimi_k2"),
        serving_router_lora=("vllm",),
        description="DeepSeek-V3: group-limited sigmoid routing with score-correction bias, shared experts",
    ),
    ArchSpec(
        "gpt_oss",
        ("gpt_oss",),
        shared_attrs=(),
        serving_experts_3d=True,
        serving_router_lora=("vllm",),
        packing_unsupported=(
            "GptOssModel builds its attention masks without position_ids (transformers 5.23), so with sdpa/eager "
            "attention packed examples attend to each other"
        ),
        description="GPT-OSS: transposed interleaved gate/up with biases",
    ),
    ArchSpec(
        "llama4",
        ("llama4", "llama4_text"),
        routing_from_router=routing_from_scores_and_logits,
        experts_lora_unsupported=(
            "Llama4TextExperts runs every expert on every token (scores pre-multiplied, no routing inputs), "
            "outside transformers' experts interface that routed-expert LoRA hooks into"
        ),
        description="Llama4 text: transposed fused experts fed all tokens, sigmoid top-k router, shared expert",
    ),
    ArchSpec(
        "deepseek_moe",
        ("deepseek",),
        routing_from_router=routing_from_tuple,
        packing_unsupported=(
            "remote code whose attention mask comes from attention_mask alone, so packed examples would attend "
            "to each other"
        ),
        description="DeepSeek-MoE (remote code): ModuleList experts, MoEGate returns (index, weight, aux)",
    ),
):
    register_arch(_spec)
