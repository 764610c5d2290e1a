"""Sieve LoRA as a registered adapter method."""

from __future__ import annotations

from typing import Any

from ..methods import AdapterMethod
from .config import SieveLoraConfig
from .model import SieveState, apply_sieve_lora, load_sieve, merge_sieve
from .plan import plan_options, plan_table


def from_train(train: Any) -> SieveLoraConfig:
    """The LoRA ``train --method sieve`` attaches."""
    return SieveLoraConfig(
        r=train.r,
        alpha=train.alpha,
        dropout=train.dropout,
        targets=train.targets,
        experts=train.experts_mode,
        seed=train.seed,
        router=train.router,
    )


SIEVE = AdapterMethod(
    name="sieve",
    label="Sieve LoRA",
    config_cls=SieveLoraConfig,
    state_cls=SieveState,
    attach=apply_sieve_lora,
    load=load_sieve,
    plan=plan_options,
    plan_table=plan_table,
    from_train=from_train,
    merge=merge_sieve,
)
