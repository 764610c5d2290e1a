"""Sieve LoRA: adapters on attention, routers, shared experts and the selected routed experts only."""

from .export import (
    ExportFormat,
    ExportResult,
    TokenizerNotSavedWarning,
    export_adapter,
    export_formats,
    merge_adapter,
    register_export_format,
)
from .io import load_adapted_model, load_sieve_adapter, merge_sieve_lora, read_adapter_config, save_sieve_adapter
from .peft_export import export_peft_adapter
from .serving import export_serving_adapter
from .sieve.config import SieveLoraConfig
from .sieve.experts import ExpertLoRA, sieve_lora_experts_forward
from .sieve.layer import LoraLinear, LoraWeightDelta
from .sieve.model import AdapterMissingError, SieveState, apply_sieve_lora, trainable_parameters, verify_adapters
from .sieve.plan import plan_adapters

__all__ = [
    "AdapterMissingError",
    "ExpertLoRA",
    "ExportFormat",
    "ExportResult",
    "LoraLinear",
    "LoraWeightDelta",
    "SieveLoraConfig",
    "SieveState",
    "TokenizerNotSavedWarning",
    "apply_sieve_lora",
    "export_adapter",
    "export_formats",
    "export_peft_adapter",
    "export_serving_adapter",
    "load_adapted_model",
    "load_sieve_adapter",
    "merge_adapter",
    "merge_sieve_lora",
    "plan_adapters",
    "read_adapter_config",
    "register_export_format",
    "save_sieve_adapter",
    "sieve_lora_experts_forward",
    "trainable_parameters",
    "verify_adapters",
]

from . import routed, sieve  # noqa: E402  (one folder per adapter method)
from .methods import (  # noqa: E402
    AdapterMethod,
    AdapterState,
    adapter_methods,
    get_adapter_method,
    register_adapter_method,
)
from .routed.method import ROUTED  # noqa: E402
from .sieve.method import SIEVE  # noqa: E402

register_adapter_method(SIEVE)  # adapters/sieve/
register_adapter_method(ROUTED)  # adapters/routed/

__all__ += [
    "AdapterMethod",
    "AdapterState",
    "adapter_methods",
    "get_adapter_method",
    "register_adapter_method",
    "routed",
    "sieve",
]
