"""Sieve LoRA: adapters on attention, routers, shared experts and the selected routed experts only.

``config`` (``SieveLoraConfig``), ``layer`` (``LoraLinear``/``LoraWeightDelta``), ``experts`` (the fused experts
kernel and ``ExpertLoRA``), ``model`` (attach, ``SieveState``), ``memory`` (memory accounting) and ``plan``."""

from .config import SieveLoraConfig
from .experts import ExpertLoRA, sieve_lora_experts_forward
from .layer import LoraLinear, LoraWeightDelta
from .model import AdapterMissingError, SieveState, apply_sieve_lora, trainable_parameters, verify_adapters
from .plan import plan_adapters

__all__ = [
    "AdapterMissingError",
    "ExpertLoRA",
    "LoraLinear",
    "LoraWeightDelta",
    "SieveLoraConfig",
    "SieveState",
    "apply_sieve_lora",
    "plan_adapters",
    "sieve_lora_experts_forward",
    "trainable_parameters",
    "verify_adapters",
]
