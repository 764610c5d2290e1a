"""``RoutedModel``: Routed-PEFT adapters through PEFT (``get_peft_model(model, RoutedConfig(...))``).

The adapters are attached by ``apply_routed_adapters`` itself (same modules, hooks, initial values and R's
load-balancing loss); each attached module is then held in a PEFT layer under the adapter's name so PEFT saves,
loads, disables and unloads it. Routed-PEFT adds a function of the FFN input to the FFN output, which no base
weight can absorb: ``merge_and_unload`` is refused, and one Routed-PEFT adapter fits one model.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..routed.model import NOT_MERGEABLE, RoutedState, apply_routed_adapters, remove_routed_adapters
from .config import RoutedConfig
from .layers import SieveTunerLayer
from .tuner import refuse_foreign

ONE_ROUTED = "RoutedConfig: one Routed-PEFT adapter per model (its hooks wrap the MoE blocks); load another base model"


class RoutedAdapterLayer(nn.Module, SieveTunerLayer):
    """Holds the attached routed adapter under its adapter name; fused experts call :meth:`expert_update`."""

    adapter_layer_names = ("routed",)

    def __init__(self) -> None:
        super().__init__()
        self._init_tuner_state()
        self.routed = nn.ModuleDict()

    def expert_update(self, out_SD: torch.Tensor, *args: Any) -> torch.Tensor:
        active = self._active()
        return self.routed[active[0]].expert_update(out_SD, *args) if active else out_SD

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(NOT_MERGEABLE)

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("RoutedAdapterLayer is read by hooks and the experts forward, not called")


class RoutedModel(BaseTuner):
    prefix: str = "routed"
    tuner_layer_cls = SieveTunerLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _pre_injection_hook(self, model: nn.Module, config: RoutedConfig, adapter_name: str) -> None:
        if not hasattr(self, "routed_state"):
            refuse_foreign(model)
            self.routed_state: RoutedState | None = None

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("RoutedModel places adapters through inject_adapter")

    @staticmethod
    def _check_target_module_exists(peft_config: Any, key: str) -> bool:
        return False

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        config: RoutedConfig = self.peft_config[adapter_name]
        if self.routed_state is not None:
            raise ValueError(ONE_ROUTED)
        if config.modules_to_save or config.trainable_token_indices:
            raise ValueError("RoutedConfig: modules_to_save/trainable_token_indices are not supported")
        state = apply_routed_adapters(model, config.experts_by_layer, config.to_routed_config())
        del model.moe_sieve  # the PEFT model owns the adapters now
        for module in list(model.modules()):
            inner = module._modules.get("routed_adapter")
            if inner is not None:
                layer = RoutedAdapterLayer()
                layer.routed[adapter_name] = inner
                module._modules["routed_adapter"] = layer
        self.routed_state = state
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        if self.routed_state is not None:
            self.routed_state.disabled = not enabled

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise ValueError(ONE_ROUTED)
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def _check_merge_allowed(self) -> None:
        raise ValueError(NOT_MERGEABLE)

    def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any) -> nn.Module:
        if merge:
            raise ValueError(NOT_MERGEABLE)
        model = self.model
        if self.routed_state is not None:
            model.moe_sieve = self.routed_state
            remove_routed_adapters(model)
            self.routed_state = None
        for param in model.parameters():
            param.requires_grad_(False)
        if hasattr(model, "peft_config"):
            del model.peft_config
        return model
