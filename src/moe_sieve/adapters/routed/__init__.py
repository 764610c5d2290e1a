"""Routed-PEFT (PERFT): adapters that follow (E) or learn (R) the MoE routing, or sit beside it (S, D)."""

from .config import ADAPTER_TYPES, VARIANTS, RoutedAdapterConfig
from .layer import AdapterBank, RoutedBlockAdapter, RoutedExpertAdapter
from .model import (
    NOT_MERGEABLE,
    RoutedLogCallback,
    RoutedState,
    apply_routed_adapters,
    load_routed_adapter,
    plan_routed,
    remove_routed_adapters,
)

__all__ = [
    "ADAPTER_TYPES",
    "NOT_MERGEABLE",
    "VARIANTS",
    "AdapterBank",
    "RoutedAdapterConfig",
    "RoutedBlockAdapter",
    "RoutedExpertAdapter",
    "RoutedLogCallback",
    "RoutedState",
    "apply_routed_adapters",
    "load_routed_adapter",
    "plan_routed",
    "remove_routed_adapters",
]
