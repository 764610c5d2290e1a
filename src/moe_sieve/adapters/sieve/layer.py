"""LoRA for ordinary linear layers and for bare weight parameters (routers)."""

from __future__ import annotations

import math

import torch
from torch import nn


def init_lora_pair(lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """PEFT's default: A like an nn.Linear weight (kaiming uniform, a=sqrt(5)), B zero, so a fresh
    adapter leaves the model unchanged."""
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    nn.init.zeros_(lora_B)


class LoraLinear(nn.Module):
    """``base(x) + scaling * B(A(dropout(x)))`` around a frozen ``nn.Linear``.

    Attribute names follow PEFT (``base_layer``, ``lora_A``, ``lora_B``) so exported keys map one to one.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.scaling = alpha / r
        weight = base_layer.weight
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if weight.device.type != "meta":
            init_lora_pair(self.lora_A.weight, self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + (update * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def merged(self) -> nn.Linear:
        """The base layer with the update folded in (the wrapper is not used afterwards)."""
        with torch.no_grad():
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
        return self.base_layer


class LoraWeightDelta(nn.Module):
    """Parametrization ``W -> W + scaling * B @ A`` for a weight read directly by its module
    (transformers v5 routers call ``F.linear(x, self.weight)``). No dropout: it acts on the weight."""

    def __init__(self, out_features: int, in_features: int, r: int, alpha: float, *, device=None, dtype=None):
        super().__init__()
        self.r = r
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        if self.lora_A.device.type != "meta":
            init_lora_pair(self.lora_A, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight().to(weight.dtype)
