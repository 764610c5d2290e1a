"""PEFT configs of the moe-sieve adapters: ``SieveConfig`` (Sieve LoRA) and ``RoutedConfig`` (Routed-PEFT).

The selection is resolved when the config is made (from a selection file, a ``{layer: [experts]}`` mapping, a
:class:`~moe_sieve.selection.Selection`, or ``profile=`` plus ``k=``) and kept in the config itself as a
``{layer: [experts]}`` mapping, so the saved ``adapter_config.json`` rebuilds the adapter with no other file.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from peft import PeftConfig

from ...selection import STRATEGIES
from ..config import ALL_GROUPS, lora_field
from ..routed.config import RoutedAdapterConfig
from ..sieve.config import SieveLoraConfig
from ._registry import SIEVE, SIEVE_ROUTED


def _f(default: Any, text: str, *, factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, bytes)) or hasattr(value, "__fspath__")


def _mapping(experts: Any) -> dict[str, list[int]]:
    """``{layer: [experts]}`` with string keys (JSON) and sorted int ids, through Selection's own checks."""
    from ...selection import Selection

    if not isinstance(experts, dict):
        raise ValueError(f"selection must be a path, a Selection or a {{layer: [experts]}} mapping, got {experts!r}")
    ids = [int(e) for v in experts.values() for e in v]
    normal = Selection(experts=dict(experts), num_experts=max(ids, default=0) + 1, strategy="given").experts
    return {str(layer): list(v) for layer, v in normal.items()}


def resolve_selection(selection: Any, profile: Any, k: Any, strategy: str, rank_by: str) -> tuple[dict, dict]:
    """The ``{layer: [experts]}`` mapping and what it came from (for the saved config and the model card)."""
    from ...profiling import Profile
    from ...selection import Selection, make_selection
    from ..card import profile_summary

    info: dict[str, Any] = {}
    prof = None
    if profile is not None:
        prof = profile if isinstance(profile, Profile) else Profile.load(os.fspath(profile))
    sel = None
    if isinstance(selection, Selection):
        sel = selection
        info["source"] = "Selection object"
    elif selection is not None and _is_path(selection):
        sel = Selection.load(os.fspath(selection))
        info["source"] = os.fspath(selection)
    elif isinstance(selection, dict):
        mapping = _mapping(selection)
        info["source"] = "inline mapping"
    elif selection is None and prof is not None:
        if k is None:
            raise ValueError("SieveConfig: profile= needs k= (e.g. k='25%' or k=4 experts per layer)")
        sel = make_selection(
            prof.counts_LE,
            prof.mass_LE,
            strategy=strategy,
            k=k,
            rank_by=rank_by,
            layer_ids=prof.layer_ids,
            top_k=prof.top_k,
            source={"profile_fingerprint": prof.fingerprint, "data": (prof.metadata.get("data") or {}).get("data")},
        )
        info["source"] = "profile + k"
    elif selection is not None:
        raise ValueError(
            f"SieveConfig: selection must be a selection.json path, a Selection or a {{layer: [experts]}} mapping, "
            f"got {type(selection).__name__}"
        )
    if sel is not None:
        mapping = {str(layer): list(ids) for layer, ids in sel.experts.items()}
        info.update(strategy=sel.strategy, params=sel.params, num_experts=sel.num_experts, origin=sel.source)
    if prof is not None:
        info["profile"], info["coverage"] = profile_summary(prof, mapping)
        info["profile"]["path"] = None if isinstance(profile, Profile) else os.fspath(profile)
    return mapping, info


@dataclass
class SieveConfig(PeftConfig):
    """Sieve LoRA as a PEFT method: LoRA on attention, routers, shared experts and the selected routed experts.

    ``get_peft_model(model, SieveConfig(...))`` attaches exactly what ``apply_sieve_lora`` attaches (same modules,
    same initial values for the same ``seed``, the same fused ``sieve_lora`` experts forward).
    """

    task_type: str | None = _f("CAUSAL_LM", "PEFT task type (CAUSAL_LM wraps the model in PeftModelForCausalLM).")
    selection: Any = _f(
        None,
        "Experts to adapt: a selection.json path, a Selection, or {layer: [expert ids]}; stored resolved as a mapping.",
    )
    profile: Any = _f(None, "A profile directory (or Profile): select with k= from it, and/or report coverage.")
    k: Any = _f(None, "Experts per layer to select from profile= (an int, or a share such as '25%').")
    strategy: str = _f("topk", f"Selection strategy with profile= ({', '.join(STRATEGIES)}).")
    rank_by: str = _f("count", "Rank experts by routing count or mass (profile= only).")
    r: int = lora_field("r")
    lora_alpha: float = lora_field("alpha", "LoRA alpha; the update is scaled by lora_alpha / r.")
    lora_dropout: float = lora_field(
        "dropout", "Dropout on the LoRA input (routers get none: their update acts on the weight)."
    )
    targets: list[str] = _f(
        None, "Module groups: attention, router, shared, experts.", factory=lambda: list(ALL_GROUPS)
    )
    experts: str = _f("selected", "Routed experts to adapt: selected (MoE-Sieve), all (full LoRA), none.")
    router: str = _f("lora", "Router training when 'router' is a target: lora or freeze.")
    seed: int | None = _f(None, "Seed of the LoRA A initialisation (same seed: same factors as apply_sieve_lora).")
    router_aux_loss_coef: float | None = _f(
        0.0,
        "Router load-balancing loss: 0.0 off (moe-sieve's default), > 0 on with this coefficient, None: leave the "
        "model config (and the trainer) to decide.",
    )
    guard_steps: int = _f(2, "Check the first N optimizer steps: every selected expert with tokens gets a gradient.")
    selection_info: dict | None = _f(None, "Where the selection came from (filled in; shown in the model card).")
    modules_to_save: list[str] | None = _f(None, "Not supported by Sieve adapters (kept for trainer compatibility).")
    trainable_token_indices: Any = _f(None, "Not supported by Sieve adapters (kept for trainer compatibility).")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SIEVE
        self.targets = list(self.targets)
        if self.router == "full":
            raise ValueError(
                "SieveConfig: router='full' trains the base router weights, which a PEFT adapter cannot hold per "
                "adapter; use router='lora' (default) or 'freeze', or `moe-sieve train --router full`"
            )
        self.to_lora_config()  # every value checked once, with SieveLoraConfig's messages
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise ValueError(f"SieveConfig: router_aux_loss_coef must be >= 0 or None, got {self.router_aux_loss_coef}")
        if self.guard_steps < 0:
            raise ValueError(f"SieveConfig: guard_steps must be >= 0, got {self.guard_steps}")
        needs_selection = self.experts == "selected" and "experts" in self.targets
        resolved = isinstance(self.selection, dict) and self.selection_info is not None
        if needs_selection and not resolved:
            if self.selection is None and self.profile is None:
                raise ValueError(
                    "SieveConfig: experts='selected' needs selection= (a selection.json, a Selection or "
                    "{layer: [experts]}) or profile= with k="
                )
            self.selection, self.selection_info = resolve_selection(
                self.selection, self.profile, self.k, self.strategy, self.rank_by
            )
        elif isinstance(self.selection, dict):
            self.selection = _mapping(self.selection)
        if self.profile is not None and not _is_path(self.profile):
            self.profile = (self.selection_info or {}).get("profile", {}).get("path")
        elif self.profile is not None:
            self.profile = os.fspath(self.profile)
        if self.selection is not None and not isinstance(self.selection, dict):
            self.selection = None  # experts='all'/'none': nothing to keep

    def to_lora_config(self) -> SieveLoraConfig:
        return SieveLoraConfig(
            r=self.r,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            targets=tuple(self.targets),
            experts=self.experts,
            seed=self.seed,
            router=self.router,
        )

    @property
    def experts_by_layer(self) -> dict[int, list[int]] | None:
        return None if self.selection is None else {int(layer): ids for layer, ids in self.selection.items()}

    def __getstate__(self) -> dict[str, Any]:
        """Pickles without the tuner's card callback (set by ``get_peft_model``; not part of the config)."""
        return {key: value for key, value in self.__dict__.items() if key != "_card_context"}

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """``adapter_config.json`` (PEFT's writer) and the model card ``README.md`` next to it."""
        super().save_pretrained(save_directory, **kwargs)
        context = getattr(self, "_card_context", None)
        if context is not None:
            from ..card import write_peft_card

            write_peft_card(save_directory, self, context())


@dataclass
class RoutedConfig(PeftConfig):
    """Routed-PEFT (PERFT) adapters as a PEFT method; the fields are :class:`RoutedAdapterConfig`'s."""

    task_type: str | None = _f("CAUSAL_LM", "PEFT task type (CAUSAL_LM wraps the model in PeftModelForCausalLM).")
    variant: str = _f("E", "S (shared), D (N dense), R (N routed by a new router), E (one per routed expert).")
    adapter_type: str = _f("lora", "lora: s B A x; parallel: W2 SiLU(W1 x).")
    r: int = lora_field("r", "LoRA rank, or the bottleneck width of the parallel adapter (shared default).")
    lora_alpha: float = lora_field("alpha", "LoRA alpha (lora type only).")
    lora_dropout: float = lora_field("dropout", "Dropout on the adapter input (lora) or bottleneck (parallel).")
    num_adapters: int = _f(4, "N: adapters per MoE layer for D and R.")
    top_k: int = _f(2, "K: adapters per token for R.")
    aux_loss_coef: float = _f(0.01, "Weight of R's load-balancing loss added to the LM loss.")
    init: str = _f("zero", "zero: PEFT init (exact no-op); perft: the released code's.")
    experts: str = _f("all", "E only: all routed experts, or the selected ones (needs selection=).")
    renormalize: str = _f("auto", "R: renormalise the top-K weights: auto, yes, no.")
    base_router_weights: bool = _f(False, "R: the released OLMoE code's quirk (scale by the base router's weights).")
    seed: int | None = _f(0, "Seed of the adapter and router initialisation.")
    selection: Any = _f(None, "E with experts='selected': a selection.json path, a Selection or {layer: [experts]}.")
    profile: Any = _f(None, "A profile directory to select from with k=.")
    k: Any = _f(None, "Experts per layer to select from profile=.")
    selection_info: dict | None = _f(None, "Where the selection came from (filled in).")
    modules_to_save: list[str] | None = _f(None, "Not supported by Routed-PEFT adapters.")
    trainable_token_indices: Any = _f(None, "Not supported by Routed-PEFT adapters.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SIEVE_ROUTED
        self.to_routed_config()
        if self.variant.upper() == "E" and self.experts == "selected":
            if not (isinstance(self.selection, dict) and self.selection_info is not None):
                if self.selection is None and self.profile is None:
                    raise ValueError("RoutedConfig: experts='selected' needs selection= or profile= with k=")
                self.selection, self.selection_info = resolve_selection(
                    self.selection, self.profile, self.k, "topk", "count"
                )
        else:
            self.selection = None
        if self.profile is not None and not _is_path(self.profile):
            self.profile = None

    def to_routed_config(self) -> RoutedAdapterConfig:
        names = {f.name for f in dataclasses.fields(RoutedAdapterConfig)}
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in names}
        values.update(alpha=self.lora_alpha, dropout=self.lora_dropout)
        return RoutedAdapterConfig(**values)

    @property
    def experts_by_layer(self) -> dict[int, list[int]] | None:
        return None if self.selection is None else {int(layer): ids for layer, ids in self.selection.items()}
