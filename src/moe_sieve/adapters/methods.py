"""Adapter methods, registered one folder each (``adapters/sieve/``, ``adapters/routed/``), in the shape PEFT
registers its tuners: each method describes itself once in an :class:`AdapterMethod` record, and ``io``,
training, the fused loss, ``plan``, export, sweep gathering and the report look the record up by name instead of
branching on it. A new method is its own folder plus one ``register_adapter_method(...)`` line."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..arch import ArchSpec, MoELayer, MoEShape, find_moe_layers, get_arch


@dataclass
class AdaptedModule:
    """One attached piece: its group (a key of ``params_by_group``), MoE layer (None: not in one), module path,
    trainable parameters, and the routed experts it adapts."""

    group: str
    layer: int | None
    name: str
    params: int
    experts: list[int] = field(default_factory=list)


@dataclass
class AdapterState:
    """What a method attached, kept on the model as ``model.moe_sieve`` (the one slot every method uses), so the
    adapter artifact, trainer checkpoints and ``eval --adapter`` treat every method alike. ``modules`` are the
    attached pieces (each with ``group`` and ``params``); ``GROUPS`` names the groups, in the order
    ``params_by_group`` reports them."""

    GROUPS: ClassVar[tuple[str, ...]] = ()
    method: ClassVar[str] = ""

    config: Any
    experts: dict[int, list[int]]
    shape: MoEShape
    base_config_fingerprint: str
    modules: list[AdaptedModule] = field(default_factory=list)
    previous_experts_implementation: Any = None

    def group_names(self) -> tuple[str, ...]:
        return self.GROUPS

    def params_by_group(self) -> dict[str, int]:
        totals = dict.fromkeys(self.group_names(), 0)
        for module in self.modules:
            totals[module.group] += module.params
        return totals

    @property
    def trainable_params(self) -> int:
        return sum(module.params for module in self.modules)

    def table(self) -> Any:  # pragma: no cover - every method draws its own
        raise NotImplementedError

    def __str__(self) -> str:
        return str(self.table())


def attach_target(model: nn.Module, refusal: str) -> tuple[ArchSpec, list[MoELayer], MoEShape]:
    """The family spec, MoE layers and shape of the base model a method attaches to; a model that already
    carries adapters (``model.moe_sieve``) is refused with ``refusal``."""
    if getattr(model, "moe_sieve", None) is not None:
        raise ValueError(refusal)
    spec = get_arch(model)
    layers = find_moe_layers(model, spec)
    return spec, layers, MoEShape.of(layers)


def _no_train_checks(train: Any) -> None:
    return None


def _no_columns(train: Mapping[str, Any]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class AdapterMethod:
    """One adapter method, as the rest of the library sees it.

    ``attach(model, selection, config)`` and ``load(model, adapter_dir, adapter_config)`` return the method's
    :class:`AdapterState`; ``config_cls`` is what adapter_config.json's ``lora`` object holds (``to_json`` /
    ``from_json``; the JSON names the method under ``lora.method``, sieve's by its absence)."""

    name: str
    label: str  # the words tables and docs use ("Sieve LoRA", "Routed-PEFT")
    config_cls: type
    state_cls: type
    attach: Callable[..., AdapterState]
    load: Callable[..., AdapterState]
    plan: Callable[..., dict[str, Any]]  # (model, k, plan's options, trust_remote_code): sizes from the config
    plan_table: Callable[[dict[str, Any], dict[str, Any]], list[Any]]  # (plan, options): what ``plan`` prints
    from_train: Callable[[Any], Any]  # TrainConfig -> this method's adapter config (``selection`` aside)
    merge: Callable[[nn.Module], nn.Module] | None = None  # None: cannot be folded into the base weights
    not_mergeable: str = ""  # why, when ``merge`` is None (merge, export --format merged)
    lora_export: bool = True  # peft, vllm and sglang (LoRA on existing weights) can express it
    no_lora_export: str = ""  # why not, with ``{target}`` for the format; when ``lora_export`` is False
    train_checks: Callable[[Any], None] = _no_train_checks  # TrainConfig checks of this method's options
    experts_mode: Callable[[Any], str | None] = lambda train: None  # overrides the strategy's; None: keep it
    token_rows: bool = True  # ``--train-tokens`` (embedding/head rows) can ride along
    adds_loss: bool = False  # adds its own loss to the model's: no fused cross-entropy kernel
    expert_guard: bool = True  # the trainer checks every selected expert gets a gradient
    routing_monitor: bool = True  # train's routing monitor (and --reselect) watch it
    train_callbacks: Callable[[AdapterState], list[Any]] = lambda state: []
    metrics: Callable[[AdapterState], dict[str, Any]] | None = None  # metrics.json[name], None: no entry
    adapts_experts: Callable[[Mapping[str, Any]], bool] = lambda train: True  # sweep ``k``: from train config
    sweep_columns: Callable[[Mapping[str, Any]], dict[str, Any]] = _no_columns  # defining options for results.csv
    # the report's strategy label of a run, from its strategy and ``option(name)`` (its train config, then row)
    report_strategy: Callable[[str | None, Callable[[str], Any]], str | None] = lambda strategy, option: strategy


_METHODS: dict[str, AdapterMethod] = {}
BUILTIN_PACKAGE = "moe_sieve.adapters"  # importing it registers the built-in methods


def register_adapter_method(method: AdapterMethod) -> AdapterMethod:
    """Make ``method.name`` an adapter method (``train --method``, adapter_config.json's ``lora.method``)."""
    known = _METHODS.get(method.name)
    if known is not None and known is not method:
        raise ValueError(f"adapter method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def adapter_methods() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    importlib.import_module(BUILTIN_PACKAGE)
    return tuple(_METHODS)


def method_help() -> str:
    """The registered methods as an option's help lists them: ``sieve (Sieve LoRA), routed (Routed-PEFT)``."""
    return ", ".join(f"{name} ({get_adapter_method(name).label})" for name in adapter_methods())


def get_adapter_method(name: str | None) -> AdapterMethod:
    """The method called ``name`` (None: sieve, what an adapter_config.json without ``lora.method`` holds)."""
    importlib.import_module(BUILTIN_PACKAGE)
    name = "sieve" if name is None else name
    if name not in _METHODS:
        raise ValueError(f"--method must be {' or '.join(_METHODS)}, got {name!r}")
    return _METHODS[name]


def find_adapter_method(name: str | None) -> AdapterMethod | None:
    """Like :func:`get_adapter_method`, but None for a name no method has (a results row of another version)."""
    importlib.import_module(BUILTIN_PACKAGE)
    return _METHODS.get(name or "sieve")


def method_of(state: Any) -> AdapterMethod:
    """The method whose state ``state`` (a model's ``moe_sieve``) is."""
    return get_adapter_method(getattr(state, "method", None) or None)
