"""Sieve adapter sizes without weights: the real adapters attached to a meta-device model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ...arch import find_moe_layers
from ...routing_stats import resolve_k
from ..plan import ADAMW_STATE_BYTES, load_config, meta_model
from .config import SieveLoraConfig
from .model import apply_sieve_lora


def _trainable(config: Any, lora: SieveLoraConfig, experts: Any, trust_remote_code: bool) -> dict[str, int]:
    model = meta_model(config, trust_remote_code)
    state = apply_sieve_lora(model, experts, lora)
    return {"total": state.trainable_params, **state.params_by_group()}


def plan_adapters(
    model: str | Any,
    k: str | int = "25%",
    lora: SieveLoraConfig | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Trainable parameters, fp32 checkpoint bytes and AdamW state bytes for full LoRA vs the budget.

    The hot set's identity does not change its size, so no profile is needed: the first k experts of each
    layer stand in for it.
    """
    lora = lora or SieveLoraConfig()
    config = load_config(model, trust_remote_code) if isinstance(model, (str, Path)) else model
    base = meta_model(config, trust_remote_code)
    layers = find_moe_layers(base)
    k_int = resolve_k(k, layers[0].num_experts)
    hot = {layer.layer_id: list(range(k_int)) for layer in layers}
    full = _trainable(config, dataclasses.replace(lora, experts="all"), None, trust_remote_code)
    sieve = _trainable(config, dataclasses.replace(lora, experts="selected"), hot, trust_remote_code)
    floor = _trainable(config, dataclasses.replace(lora, experts="none"), None, trust_remote_code)
    base_params = sum(p.numel() for p in base.parameters())
    return {
        "model": str(model) if isinstance(model, (str, Path)) else type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "base_params": base_params,
        "moe_layers": len(layers),
        "num_experts": layers[0].num_experts,
        "k": k_int,
        "r": lora.r,
        "alpha": lora.alpha,
        "full_params": full["total"],
        "sieve_params": sieve["total"],
        "no_expert_params": floor["total"],
        "reduction": 1.0 - sieve["total"] / full["total"],
        "full_bytes": 4 * full["total"],
        "sieve_bytes": 4 * sieve["total"],
        "full_optimizer_bytes": ADAMW_STATE_BYTES * full["total"],
        "sieve_optimizer_bytes": ADAMW_STATE_BYTES * sieve["total"],
        "full_by_group": {g: v for g, v in full.items() if g != "total"},
        "sieve_by_group": {g: v for g, v in sieve.items() if g != "total"},
    }


def plan_options(model: str | Any, k: str | int, options: dict[str, Any], trust_remote_code: bool = False) -> dict:
    """``moe-sieve plan --method sieve``: :func:`plan_adapters` at the command's ``r`` and ``alpha``."""
    lora = SieveLoraConfig(r=options["r"], alpha=options["alpha"])
    return plan_adapters(model, k=k, lora=lora, trust_remote_code=trust_remote_code)


def plan_table(result: dict[str, Any], options: dict[str, Any]) -> list[Any]:
    """What ``moe-sieve plan`` prints for a sieve plan: full LoRA vs the hot set, then the reduction."""
    from rich.table import Table

    r, alpha = options["r"], options["alpha"]
    table = Table(title=f"{result['model']}: LoRA r={r}, alpha={alpha:g}, hot {result['k']}/{result['num_experts']}")
    for column in ("", "trainable params", "fp32 checkpoint", "AdamW state"):
        table.add_column(column, justify="right")
    for name, key in (("full LoRA", "full"), (f"sieve hot-{result['k']}", "sieve")):
        table.add_row(
            name,
            f"{result[f'{key}_params'] / 1e6:,.1f}M",
            _gb(result[f"{key}_bytes"]),
            _gb(result[f"{key}_optimizer_bytes"]),
        )
    return [table, f"reduction [bold]{100 * result['reduction']:.1f}%[/] of LoRA trainable parameters"]


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"
