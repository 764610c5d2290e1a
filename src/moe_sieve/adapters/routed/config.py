"""Typed configuration of Routed-PEFT adapters (PERFT, arXiv 2411.08212 / 2508.02587)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..config import LoraOptions, lora_field

Variant = Literal["S", "D", "R", "E"]
AdapterType = Literal["lora", "parallel"]
VARIANTS: tuple[str, ...] = ("S", "D", "R", "E")
ADAPTER_TYPES: tuple[str, ...] = ("lora", "parallel")
INITS: tuple[str, ...] = ("zero", "perft")
RENORMALIZE: tuple[str, ...] = ("auto", "yes", "no")


def _f(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class RoutedAdapterConfig:
    """One Routed-PEFT condition; every adapter reads the hidden state entering the MoE block (or an expert).

    ``S``: one always-on adapter beside the MoE block; ``D``: ``num_adapters`` always-on adapters, summed;
    ``R``: ``num_adapters`` adapters behind a new bias-free router (softmax, top-``top_k``, load-balancing loss);
    ``E``: one adapter inside each routed expert (or each selected one), scaled by the frozen router's weight.
    """

    variant: str = _f("E", "S (shared), D (N dense), R (N routed by a new router), E (one per routed expert).")
    adapter_type: str = _f("lora", "lora: s B A x (D -> r -> D, s = alpha / r); parallel: W2 SiLU(W1 x) (D -> r -> D).")
    r: int = lora_field(
        "r",
        "LoRA rank, or the bottleneck width of the parallel adapter. The shared LoRA default (LoraOptions: 32, as "
        "sieve LoRA and `train --method routed`); the PERFT papers' runs use 8 with alpha 16.",
    )
    alpha: float = lora_field("alpha", "LoRA alpha (lora type only; the shared default is 2r, as the paper's).")
    dropout: float = lora_field(
        "dropout", "Dropout on the adapter input (lora) or bottleneck (parallel), as the released code."
    )
    num_adapters: int = _f(4, "N: adapters per MoE layer for D and R (S has 1, E one per adapted expert).")
    top_k: int = _f(2, "K: adapters per token for R (K = N: dense soft mixture).")
    aux_loss_coef: float = _f(0.01, "Weight of R's Switch-style load-balancing loss added to the LM loss.")
    init: str = _f("zero", "zero: PEFT init (A kaiming-uniform, B = 0, exact no-op); perft: the released code's.")
    experts: str = _f("all", "E only: all routed experts, or the selected (hot) ones.")
    renormalize: str = _f("auto", "R: renormalise the top-K weights: auto (when the model does), yes, no.")
    base_router_weights: bool = _f(
        False, "R: reproduce the released OLMoE code's quirk (scale by the base router's top-k weights)."
    )
    seed: int | None = _f(0, "Seed of the adapter and router initialisation.")

    def __post_init__(self) -> None:
        self.variant = str(self.variant).upper()
        if self.variant not in VARIANTS:
            raise ValueError(f"--variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"--adapter-type {self.adapter_type!r}: choose one of {', '.join(ADAPTER_TYPES)}")
        LoraOptions(self.r, self.alpha, self.dropout)  # the shared checks
        if self.variant == "S":
            self.num_adapters = 1
        if not isinstance(self.num_adapters, int) or self.num_adapters < 1:
            raise ValueError(f"--num-adapters must be >= 1, got {self.num_adapters!r}")
        if self.variant == "R" and not 1 <= self.top_k <= self.num_adapters:
            raise ValueError(f"--top-k-adapters must be in 1..{self.num_adapters} (--num-adapters), got {self.top_k}")
        if self.aux_loss_coef < 0:
            raise ValueError(f"--aux-loss-coef must be >= 0, got {self.aux_loss_coef}")
        if self.init not in INITS:
            raise ValueError(f"init {self.init!r}: choose one of {', '.join(INITS)}")
        if self.experts not in ("all", "selected"):
            raise ValueError(f"experts must be all or selected, got {self.experts!r}")
        if self.renormalize not in RENORMALIZE:
            raise ValueError(f"renormalize {self.renormalize!r}: choose one of {', '.join(RENORMALIZE)}")
        if self.base_router_weights and self.variant != "R":
            raise ValueError("base_router_weights (the released code's quirk) only applies to variant R")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r if self.adapter_type == "lora" else 1.0

    def params_per_layer(self, hidden_size: int, num_adapted_experts: int = 0) -> int:
        """Trainable parameters of one MoE layer: S 2Dr, D N*2Dr, R N*2Dr + D*N, E |experts|*2Dr."""
        per_adapter = 2 * hidden_size * self.r
        if self.variant == "E":
            return num_adapted_experts * per_adapter
        return self.num_adapters * per_adapter + (hidden_size * self.num_adapters if self.variant == "R" else 0)

    def to_json(self) -> dict[str, Any]:
        return {"method": "routed", **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoutedAdapterConfig:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
