"""The LoRA options every adapter method shares, declared once (``LoraOptions``), and the module groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ModuleGroup = Literal["attention", "router", "shared", "experts"]
ALL_GROUPS: tuple[str, ...] = ("attention", "router", "shared", "experts")
ExpertsMode = Literal["selected", "all", "none"]


@dataclass(frozen=True)
class LoraOptions:
    """Rank, alpha and dropout, declared once for every adapter method and every place that exposes them
    (``SieveLoraConfig``, ``RoutedAdapterConfig``, ``TrainConfig``, the PEFT method configs, ``plan``/``attach``):
    they take their defaults and help from :func:`lora_field` and their checks from here, so a command and the
    config behind it cannot disagree (``train --method routed`` used to get r=32 where ``RoutedAdapterConfig()``
    said r=8). One default for both methods: the paper's r=32, alpha=2r."""

    r: int = field(default=32, metadata={"help": "LoRA rank."})
    alpha: float = field(default=64.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (on the adapter's input)."})

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"--r must be a positive integer, got {self.r!r}")
        if not 0 < self.alpha < float("inf"):  # also refuses NaN
            raise ValueError(f"--alpha must be a finite number > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout!r}")


LORA = LoraOptions()


def lora_field(name: str, help: str | None = None) -> Any:
    """A dataclass field for the shared LoRA option ``name`` (r, alpha or dropout): its one default, and its
    help unless ``help`` words it for that config."""
    shared = LoraOptions.__dataclass_fields__[name]
    return field(default=shared.default, metadata={"help": help or shared.metadata["help"]})
