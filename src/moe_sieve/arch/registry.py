"""The model-family registry: :class:`ArchSpec` (where a family keeps its MoE parts and how to read its routing),
:func:`register_arch` and :func:`get_arch`. The families themselves are registered in ``families.py``, and
``layers.py`` finds a loaded model's MoE blocks through them. Nothing else in moe-sieve looks at model names."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

ExpertStorage = Literal["fused", "module_list"]


class UnsupportedModelError(ValueError):
    """The model has no MoE layer moe-sieve can recognise."""


@dataclass(frozen=True)
class ExpertLayout:
    """How the routed experts' weights are stored.

    For fused experts the flags are the ones transformers' ``@use_experts_implementation`` puts on the
    class (``has_gate``, ``has_bias``, ``is_transposed``, ``is_concatenated``), read, never assumed.
    """

    storage: ExpertStorage
    has_gate: bool = True
    has_bias: bool = False
    is_transposed: bool = False
    is_concatenated: bool = True
    # Whether the experts' forward receives the routing (transformers' ``@use_experts_implementation``
    # interface). Other fused experts (Llama4: every expert sees every token, pre-scaled) are profiled
    # from their router's output and cannot take the ``sieve_lora`` implementation.
    dispatched: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "storage": self.storage,
            "has_gate": self.has_gate,
            "has_bias": self.has_bias,
            "is_transposed": self.is_transposed,
            "is_concatenated": self.is_concatenated,
            "dispatched": self.dispatched,
        }


RoutingExtractor = Callable[[Any, int], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class ArchSpec:
    """Where one model family keeps its MoE parts.

    ``routing_from_router`` is only needed for ``module_list`` experts, whose forward never sees the
    routing: it turns the router module's output into ``(top_k_index [T, K], top_k_weights [T, K])``.
    """

    name: str
    model_types: tuple[str, ...] = ()
    experts_attr: str = "experts"
    router_attrs: tuple[str, ...] = ("gate", "router")
    shared_attrs: tuple[str, ...] = ("shared_expert", "shared_experts", "shared_expert_gate", "shared_mlp")
    # Attention is also found structurally (any module class named ``*Attention``); these names add to it.
    attention_attrs: tuple[str, ...] = ("self_attn", "self_attention")
    mlp_projections: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    num_experts_keys: tuple[str, ...] = ("num_experts", "num_local_experts", "n_routed_experts")
    top_k_keys: tuple[str, ...] = ("num_experts_per_tok", "moe_topk", "top_k")
    routing_from_router: RoutingExtractor | None = None
    description: str = ""
    # Why routed-expert LoRA is refused for this family (None: supported); named in the error.
    experts_lora_unsupported: str | None = None
    # How serving engines name this family's LoRA (moe_sieve.adapters.serving; checked in their source):
    # the checkpoint's per-expert projection names (gate, up, down), the MoE block's name in the checkpoint
    # when it differs from the transformers module, whether vLLM stores the experts as 3D weights
    # (``is_3d_moe_weight``), and the engines whose router accepts LoRA (vLLM's ``GateLinear``).
    serving_expert_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    serving_moe_block: str | None = None
    serving_experts_3d: bool = False
    serving_router_lora: tuple[str, ...] = ()
    # Why padding-free packed batches (``train --packing``) are not exact for this family (None: they are,
    # checked in tests/test_packing.py): transformers' packed-sequence mask needs the model to hand
    # ``position_ids`` to its mask functions.
    packing_unsupported: str | None = None


def routing_from_tuple(output: Any, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Find the routing in a router's output: the integer tensor is the expert index, the float
    tensor of the same leading shape the weights (``[T, K]``, or dense ``[T, E]``).

    Covers the common layouts: ``(logits, weights, index)``, ``(index, weights, aux_loss)`` and
    ``(weights, index)``. A bare ``[T, E]`` float tensor is taken as logits and routed as softmax top-k
    is not knowable from the output alone, so it is refused.
    """
    tensors = [t for t in (output if isinstance(output, (tuple, list)) else (output,)) if torch.is_tensor(t)]
    index = next((t for t in tensors if not t.is_floating_point() and t.dim() == 2), None)
    if index is None:
        raise UnsupportedModelError(
            "router output holds no integer [tokens, top_k] expert-index tensor; register an ArchSpec with "
            "routing_from_router for this model family"
        )
    weights = [t for t in tensors if t.is_floating_point() and t.dim() == 2 and t.shape[0] == index.shape[0]]
    same_k = [t for t in weights if t.shape[1] == index.shape[1]]
    if same_k:
        return index, same_k[0]
    dense = [t for t in weights if t.shape[1] == num_experts]
    if dense:
        return index, dense[-1]
    raise UnsupportedModelError("router output holds an expert index but no matching weight tensor")


def routing_from_scores_and_logits(output: Any, num_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routers that return ``(dense scores [T, E], logits [T, E])`` and pick ``topk(logits, k)`` (Llama4).

    The index is recomputed with the same ``torch.topk`` the router ran, so it is the router's own choice.
    """
    scores, logits = output[0], output[1]
    if not (torch.is_tensor(scores) and torch.is_tensor(logits) and scores.shape == logits.shape):
        raise UnsupportedModelError("router output is not (scores [tokens, experts], logits [tokens, experts])")
    index = torch.topk(logits.reshape(-1, num_experts), top_k, dim=1).indices
    return index, scores.reshape(-1, num_experts).gather(1, index)


def read_routing(spec: ArchSpec, output: Any, num_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``spec.routing_from_router`` on a router output; extractors that take ``top_k`` get it."""
    extractor = spec.routing_from_router
    if "top_k" in inspect.signature(extractor).parameters:
        return extractor(output, num_experts, top_k=top_k)
    return extractor(output, num_experts)


def topk_weights_of(top_k_index: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Bring router weights to ``[T, K]``: some routers hand the experts dense ``[T, E]`` weights."""
    if weights.shape[-1] == top_k_index.shape[-1]:
        return weights
    if weights.shape[-1] == num_experts:
        return weights.gather(-1, top_k_index.clamp(0, num_experts - 1).long())
    raise ValueError(
        f"routing weights of shape {tuple(weights.shape)} fit neither top-k {top_k_index.shape[-1]} "
        f"nor {num_experts} experts"
    )


ARCHS: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec, *, overwrite: bool = False) -> ArchSpec:
    """Teach moe-sieve a model family; ``model_types`` are matched against ``config.model_type``."""
    for model_type in spec.model_types or (spec.name,):
        if model_type in ARCHS and not overwrite:
            raise ValueError(f"an ArchSpec for model_type {model_type!r} is already registered")
        ARCHS[model_type] = spec
    return spec


GENERIC = ArchSpec(
    name="generic",
    routing_from_router=routing_from_tuple,
    description="structural discovery: an `experts` child next to a `gate`/`router`",
    packing_unsupported=(
        "an unregistered family, so nothing shows that its attention keeps packed examples apart "
        "(register an ArchSpec once a packed forward is checked equal to the padded one)"
    ),
)


def get_arch(model_or_config: Any) -> ArchSpec:
    config = getattr(model_or_config, "config", model_or_config)
    return ARCHS.get(getattr(config, "model_type", None) or "", GENERIC)
