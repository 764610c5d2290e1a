"""Typed LoRA configuration for Sieve adapters (defaults follow the paper, §5.1)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import ALL_GROUPS, LoraOptions, lora_field


@dataclass
class SieveLoraConfig:
    """Which modules get LoRA and how.

    ``experts="selected"`` is MoE-Sieve (adapters on the selection only), ``"all"`` is the full-LoRA
    baseline, ``"none"`` adapts no routed expert. Attention, router and shared experts are adapted in
    every condition unless removed from ``targets``, so conditions differ only in the routed experts.
    """

    r: int = lora_field("r")
    alpha: float = lora_field("alpha")
    dropout: float = lora_field(
        "dropout", "Dropout on the LoRA input (not on routers, whose update is applied to the weight)."
    )
    targets: tuple[str, ...] = field(
        default=ALL_GROUPS, metadata={"help": "Module groups to adapt: attention, router, shared, experts."}
    )
    experts: str = field(default="selected", metadata={"help": "Routed experts to adapt: selected, all, none."})
    seed: int | None = field(default=None, metadata={"help": "Seed for the LoRA A initialisation."})
    router: str = field(
        default="lora",
        metadata={"help": "Router training when 'router' is a target: lora, freeze, or full (its own weights)."},
    )
    tokens: tuple[int, ...] = field(
        default=(),
        metadata={
            "help": "Token ids whose input-embedding and output-head rows train (additive deltas; see tokens.py)."
        },
    )

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.tokens):
            raise ValueError(f"tokens must be non-negative token ids, got {list(self.tokens)!r}")
        self.tokens = tuple(sorted(set(self.tokens)))
        LoraOptions(self.r, self.alpha, self.dropout)  # the shared checks
        unknown = [t for t in self.targets if t not in ALL_GROUPS]
        if unknown or not self.targets:
            raise ValueError(f"targets {list(self.targets)!r}: choose from {', '.join(ALL_GROUPS)}")
        if self.router not in ("lora", "freeze", "full"):
            raise ValueError(f"router must be lora, freeze or full, got {self.router!r}")
        if self.experts not in ("selected", "all", "none"):
            raise ValueError(f"experts must be selected, all or none, got {self.experts!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = list(self.targets)
        data["tokens"] = list(self.tokens)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SieveLoraConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
