"""Sieve LoRA and Routed-PEFT as PEFT methods: ``get_peft_model(model, moe_sieve.SieveConfig(...))``.

Importing this package registers both methods with PEFT (``import moe_sieve`` does it as soon as ``peft`` is
imported), so ``PeftModel.from_pretrained`` and ``load_adapter`` rebuild saved adapters from their config alone.
See ``docs/trl.md`` for why this route was chosen over LoRA's ``_register_custom_module``.
"""

from ._registry import SIEVE, SIEVE_ROUTED, PeftMethodType, register
from .config import RoutedConfig, SieveConfig
from .layers import SieveExpertsLayer, SieveLinear, SieveTunerLayer, SieveWeightDelta
from .routed import RoutedAdapterLayer, RoutedModel
from .tuner import SieveModel

register()

__all__ = [
    "SIEVE",
    "SIEVE_ROUTED",
    "PeftMethodType",
    "RoutedAdapterLayer",
    "RoutedConfig",
    "RoutedModel",
    "SieveConfig",
    "SieveExpertsLayer",
    "SieveLinear",
    "SieveModel",
    "SieveTunerLayer",
    "SieveWeightDelta",
    "register",
]
