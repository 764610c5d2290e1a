"""A small DeepSeek-MoE-style model with per-expert ``nn.ModuleList`` experts, as remote-code models
(DeepSeek-MoE-16B) and older transformers releases store them. Its gate returns
``(topk_idx, topk_weight, aux_loss)`` like DeepSeek's ``MoEGate``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class TinyDeepseekConfig(PretrainedConfig):
    model_type = "deepseek"

    def __init__(
        self,
        vocab_size=259,
        hidden_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.first_k_dense_replace = first_k_dense_replace
        super().__init__(**kwargs)


class DeepseekMLP(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.weight = nn.Parameter(torch.randn(config.n_routed_experts, config.hidden_size))

    def forward(self, hidden_states):
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        scores = F.linear(flat, self.weight).softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return topk_idx, topk_weight, None


class DeepseekMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.experts = nn.ModuleList(
            DeepseekMLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        self.gate = MoEGate(config)
        self.shared_experts = DeepseekMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_states):
        identity, shape = hidden_states, hidden_states.shape
        topk_idx, topk_weight, _ = self.gate(hidden_states)
        flat = hidden_states.reshape(-1, shape[-1])
        out = torch.zeros_like(flat)
        for expert_id, expert in enumerate(self.experts):
            token, slot = torch.where(topk_idx == expert_id)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * topk_weight[token, slot, None].to(flat.dtype))
        return out.view(shape) + self.shared_experts(identity)


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.mix = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.norm2 = nn.LayerNorm(config.hidden_size)
        self.mlp = (
            DeepseekMoE(config)
            if layer_idx >= config.first_k_dense_replace
            else DeepseekMLP(config.hidden_size, 2 * config.moe_intermediate_size)
        )

    def forward(self, x):
        h = self.norm1(x)
        # causal prefix mean: token t sees tokens <= t only, so right padding never changes real tokens
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
        x = x + self.mix(h.cumsum(dim=1) / steps)
        return x + self.mlp(self.norm2(x))


class TinyDeepseekForCausalLM(PreTrainedModel):
    config_class = TinyDeepseekConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x)
        return CausalLMOutput(logits=self.lm_head(x))


def build_modulelist_model(seed: int = 0, layers: int | None = None) -> TinyDeepseekForCausalLM:
    torch.manual_seed(seed)
    config = TinyDeepseekConfig() if layers is None else TinyDeepseekConfig(num_hidden_layers=layers)
    return TinyDeepseekForCausalLM(config)
