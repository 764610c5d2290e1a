"""All model-family knowledge lives here: where the router, routed and shared experts sit, and how to
read the routing decision. Nothing else in moe-sieve looks at model names."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .._io import fingerprint

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


@dataclass
class MoELayer:
    """One MoE block of a loaded model, resolved through its :class:`ArchSpec`."""

    layer_id: int
    name: str
    block: nn.Module
    router_name: str
    router: nn.Module
    experts_name: str
    experts: nn.Module
    num_experts: int
    top_k: int
    layout: ExpertLayout
    shared: dict[str, nn.Module] = field(default_factory=dict)
    # The module whose 2D ``[num_experts, hidden]`` weight computes the router logits (the router itself,
    # or one linear inside it), or None with ``router_weight_missing`` saying why.
    router_weight_name: str | None = None
    router_weight_missing: str = ""
    # Children of the MoE block with weights that are neither router, experts nor shared: never adapted.
    unrecognised: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def routing_source(self) -> str:
        """``experts``: read from the experts' inputs; ``router``: from the router's output."""
        return "experts" if self.layout.storage == "fused" and self.layout.dispatched else "router"

    def describe(self) -> dict[str, Any]:
        return {
            "layer": self.layer_id,
            "block": self.name,
            "router": self.router_name,
            "router_weight": self.router_weight_name,
            "experts": self.experts_name,
            "shared": sorted(self.shared),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "layout": self.layout.to_json(),
        }


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


def get_arch(model_or_config: Any) -> ArchSpec:
    config = getattr(model_or_config, "config", model_or_config)
    return ARCHS.get(getattr(config, "model_type", None) or "", GENERIC)


def _config_value(config: Any, keys: Sequence[str]) -> int | None:
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for key in keys:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


_MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
_LAYOUT_FLAGS = ("has_gate", "is_transposed")


def _expert_layout(experts: nn.Module, hidden_size: int | None) -> ExpertLayout | None:
    """Read the storage layout: the decorator's flags where transformers set them, else the real shapes."""
    if isinstance(experts, nn.ModuleList):
        if len(experts) and all(hasattr(experts[0], part) for part in _MLP_PARTS[1:]):
            return ExpertLayout("module_list", has_gate=hasattr(experts[0], "gate_proj"))
        return None
    up = getattr(experts, "gate_up_proj", None)
    if up is None:
        up = getattr(experts, "up_proj", None)
    down = getattr(experts, "down_proj", None)
    if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3 and down.dim() == 3):
        return None
    if all(hasattr(experts, flag) for flag in _LAYOUT_FLAGS):
        return ExpertLayout(
            "fused",
            has_gate=bool(experts.has_gate),
            has_bias=bool(getattr(experts, "has_bias", False)),
            is_transposed=bool(experts.is_transposed),
            is_concatenated=bool(getattr(experts, "is_concatenated", True)),
        )
    # Not a transformers experts-interface module (no routing inputs, no flags): infer from the shapes.
    # (out, in) storage has up [E, n*I, H] and down [E, H, I]; transposed has up [E, H, n*I], down [E, I, H].
    has_gate = hasattr(experts, "gate_up_proj")
    if hidden_size is None or (up.shape[-1] == hidden_size) == (up.shape[-2] == hidden_size):
        raise UnsupportedModelError(
            f"{type(experts).__name__}: cannot tell from gate_up/up {tuple(up.shape)} and down {tuple(down.shape)} "
            f"with hidden size {hidden_size} whether the expert weights are stored transposed"
        )
    transposed = up.shape[-2] == hidden_size
    return ExpertLayout(
        "fused",
        has_gate=has_gate,
        has_bias=hasattr(experts, "down_proj_bias"),
        is_transposed=transposed,
        is_concatenated=True,
        dispatched=False,
    )


def _router_weight(
    router: nn.Module, router_name: str, num_experts: int, hidden_size: int | None
) -> tuple[str | None, str]:
    """The module holding the ``[num_experts, hidden]`` logit weight, judged by shape, not by class name.

    The router's own weight may carry extra rows (Inkling scores its shared experts too: ``[E + S, hidden]``).
    """

    def is_logit_weight(module: nn.Module, extra_rows: bool = False) -> bool:
        weight = getattr(module, "weight", None)
        if not (isinstance(weight, torch.Tensor) and weight.dim() == 2):
            return False
        rows_ok = weight.shape[0] >= num_experts if extra_rows else weight.shape[0] == num_experts
        return rows_ok and (hidden_size is None or weight.shape[1] == hidden_size)

    if is_logit_weight(router, extra_rows=True):
        return router_name, ""
    inner = [(n, m) for n, m in router.named_modules() if n and isinstance(m, nn.Linear) and is_logit_weight(m)]
    if len(inner) == 1:
        return f"{router_name}.{inner[0][0]}", ""
    what = f"{len(inner)} linears with {num_experts} outputs" if inner else f"no [{num_experts}, hidden] weight"
    return None, f"router module type {type(router).__name__} holds {what}"


_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def find_moe_layers(model: nn.Module, spec: ArchSpec | None = None) -> list[MoELayer]:
    """Every MoE block of ``model``, in depth order. Raises :class:`UnsupportedModelError` when none."""
    spec = spec or get_arch(model)
    config = getattr(model, "config", None)
    cfg_experts = _config_value(config, spec.num_experts_keys)
    cfg_top_k = _config_value(config, spec.top_k_keys)
    hidden_size = _config_value(config, ("hidden_size", "d_model"))
    layers: list[MoELayer] = []
    near_misses: list[str] = []
    for name, block in model.named_modules():
        experts = getattr(block, spec.experts_attr, None)
        if not isinstance(experts, nn.Module):
            continue
        prefix = f"{name}." if name else ""
        layout = _expert_layout(experts, hidden_size)
        router_attr = next((a for a in spec.router_attrs if isinstance(getattr(block, a, None), nn.Module)), None)
        if layout is None or router_attr is None:
            missing = "a router (" + "/".join(spec.router_attrs) + ")" if layout else "fused 3D expert weights"
            near_misses.append(f"{prefix}{spec.experts_attr} has no {missing}")
            continue
        router = getattr(block, router_attr)
        num_experts = len(experts) if layout.storage == "module_list" else int(getattr(experts, "num_experts", 0) or 0)
        num_experts = num_experts or getattr(router, "num_experts", None) or cfg_experts
        top_k = getattr(router, "top_k", None) or getattr(block, "top_k", None) or cfg_top_k
        if not num_experts or not top_k:
            near_misses.append(f"{prefix}{spec.experts_attr}: cannot tell the number of experts or top-k")
            continue
        match = _LAYER_INDEX.search(name)
        shared = {a: getattr(block, a) for a in spec.shared_attrs if isinstance(getattr(block, a, None), nn.Module)}
        known = {router_attr, spec.experts_attr, *shared}
        unrecognised = {
            n: m
            for n, m in block.named_children()
            if n not in known and any(isinstance(sub, nn.Linear) for sub in m.modules())
        }
        router_weight_name, router_weight_missing = _router_weight(
            router, prefix + router_attr, int(num_experts), hidden_size
        )
        layers.append(
            MoELayer(
                layer_id=int(match.group(1)) if match else len(layers),
                name=name,
                block=block,
                router_name=prefix + router_attr,
                router=router,
                experts_name=prefix + spec.experts_attr,
                experts=experts,
                num_experts=int(num_experts),
                top_k=int(top_k),
                layout=layout,
                shared=shared,
                router_weight_name=router_weight_name,
                router_weight_missing=router_weight_missing,
                unrecognised=unrecognised,
            )
        )
    if not layers:
        detail = "; ".join(near_misses[:3]) or (
            f"no module has an `{spec.experts_attr}` child holding fused 3D expert weights "
            "(gate_up_proj/up_proj + down_proj) or a ModuleList of gate/up/down MLPs next to a router"
        )
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={getattr(config, 'model_type', None)!r}, arch spec "
            f"{spec.name!r}): no MoE layer found: {detail}. Register an ArchSpec with "
            "moe_sieve.arch.register_arch for this family."
        )
    if len({layer.layer_id for layer in layers}) != len(layers):
        raise UnsupportedModelError(f"{type(model).__name__}: two MoE blocks map to the same layer index")
    if layers[0].routing_source == "router" and spec.routing_from_router is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: {type(layers[0].experts).__name__} never sees the routing, so it is read from "
            f"the router's output, which needs ArchSpec.routing_from_router (spec {spec.name!r})"
        )
    return layers


_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_attn_implementation",
    "attn_implementation",
    "_experts_implementation",
    "experts_implementation",
    "architectures",
    "use_cache",
    "output_router_logits",
    "auto_map",
}


def config_fingerprint(config: Any) -> str:
    """Hash of the architecture-defining config values (dtype, paths and backends excluded)."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return fingerprint({k: v for k, v in sorted(raw.items()) if k not in _VOLATILE_CONFIG_KEYS})


@dataclass(frozen=True)
class MoEShape:
    """The routing geometry a profile or selection is only valid for."""

    layer_ids: tuple[int, ...]
    num_experts: int
    top_k: int

    @classmethod
    def of(cls, layers: Sequence[MoELayer]) -> MoEShape:
        experts = {layer.num_experts for layer in layers}
        top_ks = {layer.top_k for layer in layers}
        if len(experts) != 1 or len(top_ks) != 1:
            raise UnsupportedModelError(
                f"MoE layers differ in expert count {sorted(experts)} or top-k {sorted(top_ks)}; "
                "moe-sieve needs one routed-expert pool size across layers"
            )
        return cls(tuple(layer.layer_id for layer in layers), experts.pop(), top_ks.pop())
