"""Model-family registry: routers, routed and shared experts, and storage layouts."""

from . import families  # noqa: F401  (registers the built-in families)
from .layers import MoELayer, MoEShape, config_fingerprint, find_moe_layers
from .registry import (
    ARCHS,
    ArchSpec,
    ExpertLayout,
    UnsupportedModelError,
    get_arch,
    read_routing,
    register_arch,
    routing_from_scores_and_logits,
    routing_from_tuple,
    topk_weights_of,
)

__all__ = [
    "ARCHS",
    "ArchSpec",
    "ExpertLayout",
    "MoELayer",
    "MoEShape",
    "UnsupportedModelError",
    "config_fingerprint",
    "find_moe_layers",
    "get_arch",
    "read_routing",
    "register_arch",
    "routing_from_scores_and_logits",
    "routing_from_tuple",
    "topk_weights_of",
]
