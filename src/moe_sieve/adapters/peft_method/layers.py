"""PEFT tuner layers holding Sieve LoRA factors per adapter name.

Each layer computes exactly what its single-adapter counterpart computes (``LoraLinear``, ``LoraWeightDelta``,
``ExpertLoRA``) for the active adapter, and names its parameters so that a saved PEFT checkpoint key, with
PEFT's ``base_model.model.`` prefix removed, is the key of moe-sieve's own ``adapter.safetensors``
(``q_proj.lora_A.weight``, ``gate.parametrizations.weight.0.lora_A``), except the fused experts'
``experts.sieve_lora.lora_experts.up_A`` (``experts.sieve_lora.up_A`` there).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..sieve.experts import ExpertLoRA
from ..sieve.layer import init_lora_pair

ONE_ACTIVE = "moe-sieve adapters run one active adapter at a time"


class SieveTunerLayer(BaseTunerLayer):
    """Common state: the active adapter, the disabled flag and what is merged, per layer (PEFT's conventions)."""

    def _init_tuner_state(self) -> None:
        self._disable_adapters = False
        self._active_adapter = "default"
        self.merged_adapters = []

    def _active(self) -> list[str]:
        """Adapters whose update this layer adds in the forward: active, present here, not merged, not disabled."""
        if self._disable_adapters or self.merged:
            return []
        names = self._get_available_adapters()
        return [name for name in self.active_adapters if name in names]

    def enable_adapters(self, enabled: bool) -> None:
        if not enabled and self.merged:
            self.unmerge()
        super().enable_adapters(enabled)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Factors are created on the base weights' device; nothing to move."""


class SieveLinear(nn.Module, SieveTunerLayer):
    """``base(x) + sum over active adapters of s * B(A(dropout(x)))`` around a frozen ``nn.Linear``."""

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self._init_tuner_state()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, dropout: float) -> None:
        """Same construction order as ``LoraLinear`` (two ``nn.Linear`` then PEFT's init): same RNG draws."""
        weight = self.base_layer.weight
        kw = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, **kw)
        self.lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_dropout[adapter_name].train(self.training)  # a later adapter follows the model's mode
        if weight.device.type != "meta":
            init_lora_pair(self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.scaling[adapter_name] * (self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        weight = self.base_layer.weight
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            with torch.no_grad():
                merged = weight + self.get_delta_weight(name).to(weight.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"adapter {name!r}: merging gives non-finite weights in {self.base_layer}")
                weight.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                weight -= self.get_delta_weight(name).to(weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for name in self._active():
            lora_A = self.lora_A[name]
            update = self.lora_B[name](lora_A(self.lora_dropout[name](x.to(lora_A.weight.dtype))))
            out = out + (update * self.scaling[name]).to(out.dtype)
        return out

    def __repr__(self) -> str:
        return "sieve." + super().__repr__()


class SieveWeightDelta(nn.Module, SieveTunerLayer):
    """Parametrization ``W -> W + s B A`` of a weight its module reads directly (transformers v5 routers call
    ``F.linear(x, self.weight)``), per adapter; no dropout since it acts on the weight."""

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling")

    def __init__(self, owner: nn.Module, out_features: int, in_features: int) -> None:
        super().__init__()
        self._init_tuner_state()
        self.out_features = out_features
        self.in_features = in_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        object.__setattr__(self, "_owner", weakref.ref(owner))  # not a submodule: no cycle in the module tree

    def get_base_layer(self) -> nn.Module:
        return self._owner()

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, device: Any, dtype: torch.dtype) -> None:
        """Same draws as ``LoraWeightDelta``: two ``torch.empty`` then PEFT's init."""
        self.lora_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))
        if self.lora_A[adapter_name].device.type != "meta":
            init_lora_pair(self.lora_A[adapter_name], self.lora_B[adapter_name])
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.scaling[adapter_name] * (self.lora_B[adapter_name] @ self.lora_A[adapter_name])

    def _original(self) -> torch.Tensor:
        return self._owner().parametrizations.weight.original

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        original = self._original()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            with torch.no_grad():
                merged = original + self.get_delta_weight(name).to(original.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"adapter {name!r}: merging gives non-finite router weights")
                original.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        original = self._original()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                original -= self.get_delta_weight(name).to(original.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        for name in self._active():
            weight = weight + self.get_delta_weight(name).to(weight.dtype)
        return weight


class SieveExpertsLayer(nn.Module, SieveTunerLayer):
    """One :class:`ExpertLoRA` per adapter, kept as ``experts.sieve_lora``.

    The ``sieve_lora`` experts forward reads ``num_selected``, ``expert_ids``, ``slot_of_expert``,
    ``gate_up_update`` and ``down_update`` from ``experts.sieve_lora``; this layer answers them for the active
    adapter, and reports no selected expert when adapters are disabled, merged or absent here.
    """

    adapter_layer_names = ("lora_experts",)

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self._init_tuner_state()
        self.lora_experts = nn.ModuleDict()
        object.__setattr__(self, "_experts", weakref.ref(experts))

    def get_base_layer(self) -> nn.Module:
        return self._experts()

    def update_layer(self, adapter_name: str, expert_ids: list[int], r: int, lora_alpha: float, dropout: float) -> None:
        self.lora_experts[adapter_name] = ExpertLoRA.for_experts(self._experts(), expert_ids, r, lora_alpha, dropout)
        self.lora_experts[adapter_name].train(self.training)

    def current(self) -> ExpertLoRA | None:
        active = self._active()
        if len(active) > 1:
            raise ValueError(f"{ONE_ACTIVE}; active: {active}")
        return self.lora_experts[active[0]] if active else None

    @property
    def num_selected(self) -> int:
        lora = self.current()
        return 0 if lora is None else lora.num_selected

    @property
    def expert_ids(self) -> torch.Tensor:
        return self.current().expert_ids

    @property
    def slot_of_expert(self) -> torch.Tensor:
        return self.current().slot_of_expert

    @property
    def selected_experts(self) -> tuple[int, ...]:
        lora = self.current()
        return () if lora is None else lora.selected_experts

    def gate_up_update(self, x_R: torch.Tensor, offsets_n: torch.Tensor) -> torch.Tensor:
        return self.current().gate_up_update(x_R, offsets_n)

    def down_update(self, h_R: torch.Tensor, offsets_n: torch.Tensor) -> torch.Tensor:
        return self.current().down_update(h_R, offsets_n)

    def _apply_delta(self, name: str, sign: float, safe_merge: bool = False) -> None:
        """``experts.<param>[ids] += sign * delta`` with merge_sieve_lora's fp32 (or wider) accumulation."""
        experts = self._experts()
        lora = self.lora_experts[name]
        ids = lora.expert_ids
        with torch.no_grad():
            for param_name, delta in lora.delta_weights().items():
                weight = getattr(experts, param_name)
                acc = torch.promote_types(weight.dtype, torch.float32)
                merged = (weight[ids].to(acc) + sign * delta.to(acc)).to(weight.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"adapter {name!r}: merging gives non-finite {param_name} weights")
                weight[ids] = merged

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for name in check_adapters_to_merge(self, adapter_names):
            if name in self.lora_experts:
                self._apply_delta(name, 1.0, safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._apply_delta(self.merged_adapters.pop(), -1.0)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("SieveExpertsLayer is read by the sieve_lora experts forward, not called")
