"""Routed-PEFT as a registered adapter method: how training, plan, export, sweep and report treat it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..methods import AdapterMethod
from .config import RoutedAdapterConfig
from .model import (
    NOT_MERGEABLE,
    RoutedLogCallback,
    RoutedState,
    apply_routed_adapters,
    load_routed_adapter,
    plan_routed,
)

NO_LORA_EXPORT = (
    "a Routed-PEFT adapter (method routed) has no {target} form: its adapters are functions of the FFN "
    "input that a LoRA on existing weights cannot express; serve it with moe-sieve (eval --adapter)"
)


def from_train(train: Any) -> RoutedAdapterConfig:
    """The adapter config ``train --method routed`` attaches (validates --variant, --adapter-type, ...)."""
    return RoutedAdapterConfig(
        variant=train.variant,
        adapter_type=train.adapter_type,
        r=train.r,
        alpha=train.alpha,
        dropout=train.dropout,
        num_adapters=train.num_adapters,
        top_k=train.top_k_adapters,
        aux_loss_coef=train.aux_loss_coef,
        experts="all" if train.strategy_experts == "all" else "selected",
        seed=train.seed,
    )


def _uses_experts(train: Any) -> bool:
    return str(train.get("variant", "")).upper() == "E"


def experts_mode(train: Any) -> str | None:
    return None if str(train.variant).upper() == "E" else "none"  # S/D/R need no selection


def plan_options(model: str | Any, k: str | int, options: dict[str, Any], trust_remote_code: bool = False) -> dict:
    """``moe-sieve plan --method routed``."""
    routed = RoutedAdapterConfig(
        variant=options["variant"],
        adapter_type=options["adapter_type"],
        r=options["r"],
        alpha=options["alpha"],
        num_adapters=options["num_adapters"],
        top_k=options["top_k_adapters"],
        experts=options["experts"],
    )
    return plan_routed(model, routed, k=k, trust_remote_code=trust_remote_code)


def plan_table(result: dict[str, Any], options: dict[str, Any]) -> list[Any]:
    return [
        f"Routed-PEFT {options['variant']}: {result['trainable_params']:,} trainable params = "
        f"{result['trainable_pct_of_total']:.3f}% of {result['base_params']:,} total, "
        f"{result['trainable_pct_of_activated']:.3f}% of {result['activated_params']:,} activated"
    ]


def sweep_columns(train: Mapping[str, Any]) -> dict[str, Any]:
    """The options that define a routed run (N and K only where the variant uses them)."""
    variant = str(train.get("variant", "")).upper()
    return {
        "variant": variant,
        "adapter_type": train.get("adapter_type"),
        "num_adapters": train.get("num_adapters") if variant in ("D", "R") else None,
        "top_k_adapters": train.get("top_k_adapters") if variant == "R" else None,
    }


def report_strategy(strategy: str | None, option: Callable[[str], Any]) -> str:
    """Not a sieve selection at its k (budget, controls): the report's rows say ``routed-VARIANT``."""
    return f"routed-{str(option('variant') or '').upper()}"


ROUTED = AdapterMethod(
    name="routed",
    label="Routed-PEFT",
    config_cls=RoutedAdapterConfig,
    state_cls=RoutedState,
    attach=apply_routed_adapters,
    load=load_routed_adapter,
    plan=plan_options,
    plan_table=plan_table,
    from_train=from_train,
    merge=None,
    not_mergeable=NOT_MERGEABLE,
    lora_export=False,
    no_lora_export=NO_LORA_EXPORT,
    train_checks=from_train,  # builds (so validates) the config
    experts_mode=experts_mode,
    token_rows=False,
    adds_loss=True,
    expert_guard=False,
    routing_monitor=False,
    train_callbacks=lambda state: [RoutedLogCallback(state)],
    metrics=lambda state: {
        "config": state.config.to_json(),
        "aux_loss": state.aux_log,
        "adapter_router_load": state.router_load(),
    },
    adapts_experts=_uses_experts,
    sweep_columns=sweep_columns,
    report_strategy=report_strategy,
)
