"""A loaded model's MoE blocks, found structurally through its :class:`ArchSpec`, and the routing geometry and
config fingerprint that profiles, selections and adapters are checked against."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._io import fingerprint
from .registry import ArchSpec, ExpertLayout, UnsupportedModelError, get_arch


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


def global_num_experts(experts: nn.Module) -> int:
    """Routed experts of a fused experts module across all ranks: transformers' expert-parallel engine sets
    ``num_experts`` to the rank's local count and keeps the weights as DTensors of the global shape
    (``distributed/expert_parallel.py`` ``MoEParamShard.shard_param``), and routing uses global ids."""
    if getattr(experts, "_is_expert_parallel", False):
        weight = getattr(experts, "down_proj", None)
        from torch.distributed.tensor import DTensor

        if isinstance(weight, DTensor):
            return int(weight.shape[0])
    return int(getattr(experts, "num_experts", 0) or 0)


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


# The decoder-layer index in a module path ("model.layers.12.mlp" -> 12).
LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


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
        num_experts = len(experts) if layout.storage == "module_list" else global_num_experts(experts)
        num_experts = num_experts or getattr(router, "num_experts", None) or cfg_experts
        top_k = getattr(router, "top_k", None) or getattr(block, "top_k", None) or cfg_top_k
        if not num_experts or not top_k:
            near_misses.append(f"{prefix}{spec.experts_attr}: cannot tell the number of experts or top-k")
            continue
        match = LAYER_INDEX.search(name)
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
