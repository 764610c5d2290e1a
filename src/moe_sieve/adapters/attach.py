"""Step 3 of the recipe: attach LoRA to attention, routers, shared experts and the selected routed experts."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.table import Table
from torch import nn
from torch.nn.utils import parametrize

from ..arch import MoELayer, MoEShape, config_fingerprint, find_moe_layers, get_arch
from ..profiling.artifact import ProfileMismatchError
from .config import SieveLoraConfig
from .experts import ExpertLoRA, register_sieve_experts_implementation, use_sieve_experts
from .lora import LoraLinear, LoraWeightDelta

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


class AdapterMissingError(RuntimeError):
    """A selected expert ended up without an adapter: refuse to train silently without it."""


@dataclass
class AdaptedModule:
    group: str
    layer: int | None
    name: str
    params: int
    experts: list[int] = field(default_factory=list)


@dataclass
class SieveState:
    """What was attached, kept on the model as ``model.moe_sieve`` for saving, merging and reporting."""

    config: SieveLoraConfig
    experts: dict[int, list[int]]
    shape: MoEShape
    base_config_fingerprint: str
    modules: list[AdaptedModule] = field(default_factory=list)
    previous_experts_implementation: Any = None

    def params_by_group(self) -> dict[str, int]:
        totals = {"attention": 0, "router": 0, "shared": 0, "experts": 0}
        for module in self.modules:
            totals[module.group] += module.params
        return totals

    @property
    def trainable_params(self) -> int:
        return sum(module.params for module in self.modules)

    def table(self) -> Table:
        table = Table(title=f"Sieve LoRA (r={self.config.r}, alpha={self.config.alpha}, experts={self.config.experts})")
        for column in ("layer", "attention", "router", "shared", "adapted experts", "expert params"):
            table.add_column(column, justify="right")
        layers = sorted({m.layer for m in self.modules if m.layer is not None})
        for layer in layers:
            rows = [m for m in self.modules if m.layer == layer]

            def total(group: str, rows=rows) -> int:
                return sum(m.params for m in rows if m.group == group)

            n_experts = len(self.experts.get(layer, [])) if "experts" in self.config.targets else 0
            table.add_row(
                str(layer),
                f"{total('attention'):,}",
                f"{total('router'):,}",
                f"{total('shared'):,}",
                f"{n_experts}/{self.shape.num_experts}" if layer in self.experts else "-",
                f"{total('experts'):,}",
            )
        groups = self.params_by_group()
        table.caption = (
            f"trainable {self.trainable_params:,} = attention {groups['attention']:,} + router {groups['router']:,}"
            f" + shared {groups['shared']:,} + experts {groups['experts']:,}"
        )
        return table


def resolve_experts(layers: Sequence[MoELayer], selection: Any, mode: str) -> dict[int, list[int]]:
    """Per MoE layer, the routed experts that get adapters, checked against the model."""
    if mode == "all":
        return {layer.layer_id: list(range(layer.num_experts)) for layer in layers}
    if mode == "none":
        return {layer.layer_id: [] for layer in layers}
    if selection is None:
        raise ValueError("experts='selected' needs a selection (a Selection, its JSON path, or a dict)")
    if isinstance(selection, (str, bytes)) or hasattr(selection, "__fspath__"):
        from ..selection import Selection

        selection = Selection.load(selection)
    experts: Mapping[int, Sequence[int]] = getattr(selection, "experts", selection)
    experts = {int(layer): sorted(int(e) for e in ids) for layer, ids in experts.items()}
    model_layers = [layer.layer_id for layer in layers]
    if sorted(experts) != model_layers:
        raise ProfileMismatchError(
            f"selection covers MoE layers {sorted(experts)} but the model has MoE layers {model_layers}"
        )
    num_experts = getattr(selection, "num_experts", None)
    if num_experts is not None and num_experts != layers[0].num_experts:
        raise ProfileMismatchError(
            f"selection was made for {num_experts} experts per layer, the model has {layers[0].num_experts}"
        )
    for layer in layers:
        bad = [e for e in experts[layer.layer_id] if not 0 <= e < layer.num_experts]
        if bad:
            raise ProfileMismatchError(
                f"layer {layer.layer_id}: expert ids {bad} out of range 0..{layer.num_experts - 1}"
            )
    return experts


def _layer_of(name: str) -> int | None:
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def _wrap_linear(model: nn.Module, name: str, config: SieveLoraConfig, dropout: float) -> LoraLinear:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    base = getattr(parent, leaf)
    wrapper = LoraLinear(base, config.r, config.alpha, dropout)
    setattr(parent, leaf, wrapper)
    return wrapper


def _linear_children(module: nn.Module, prefix: str, leaf_names: Sequence[str] | None) -> list[str]:
    found = []
    for sub_name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and not isinstance(sub, LoraLinear):
            leaf = sub_name.rpartition(".")[2] if sub_name else prefix.rpartition(".")[2]
            if leaf_names is None or leaf in leaf_names:
                found.append(f"{prefix}.{sub_name}" if sub_name else prefix)
    return [name for name in found if ".lora_" not in name and ".base_layer" not in name]


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def apply_sieve_lora(model: nn.Module, selection: Any = None, config: SieveLoraConfig | None = None) -> SieveState:
    """Freeze ``model`` and add LoRA where ``config`` says, in place; returns what was attached.

    ``selection`` is a :class:`~moe_sieve.selection.Selection`, its JSON path or a ``{layer: [experts]}``
    dict (not needed for ``experts="all"``/``"none"``). Fused experts get activation-space LoRA through
    the ``sieve_lora`` experts implementation; ModuleList experts get per-projection LoRA.
    """
    config = config or SieveLoraConfig()
    if getattr(model, "moe_sieve", None) is not None:
        raise ValueError("this model already has Sieve LoRA adapters; load a fresh base model")
    spec = get_arch(model)
    layers = find_moe_layers(model, spec)
    shape = MoEShape.of(layers)
    experts = resolve_experts(layers, selection, config.experts)
    state = SieveState(config, experts, shape, config_fingerprint(model.config))
    for param in model.parameters():
        param.requires_grad_(False)

    def add(group: str, name: str, params: list[nn.Parameter], layer: int | None, expert_ids=()) -> None:
        for p in params:
            p.requires_grad_(True)
        state.modules.append(AdaptedModule(group, layer, name, sum(p.numel() for p in params), list(expert_ids)))

    with _seeded(config.seed):
        if "attention" in config.targets:
            attention_names = [
                name
                for name, _ in model.named_modules()
                if name.rpartition(".")[2] in spec.attention_attrs and _layer_of(name) is not None
            ]
            for attn_name in attention_names:
                attn = model.get_submodule(attn_name)
                for name in _linear_children(attn, attn_name, None):
                    wrapper = _wrap_linear(model, name, config, config.dropout)
                    add("attention", name, _lora_params(wrapper), _layer_of(name))
        for layer in layers:
            if "router" in config.targets and config.router == "full":
                # Full fine-tuning of the router: its own weights train and are saved with the adapter.
                add("router", layer.router_name, list(layer.router.parameters(recurse=False)), layer.layer_id)
            elif "router" in config.targets and config.router == "lora":
                if isinstance(layer.router, nn.Linear):
                    wrapper = _wrap_linear(model, layer.router_name, config, 0.0)
                    add("router", layer.router_name, _lora_params(wrapper), layer.layer_id)
                else:
                    weight = layer.router.weight
                    delta = LoraWeightDelta(
                        weight.shape[0],
                        weight.shape[1],
                        config.r,
                        config.alpha,
                        device=weight.device,
                        dtype=weight.dtype,
                    )
                    parametrize.register_parametrization(layer.router, "weight", delta)
                    layer.router.parametrizations.weight.original.requires_grad_(False)
                    add("router", layer.router_name, [delta.lora_A, delta.lora_B], layer.layer_id)
            if "shared" in config.targets:
                for attr, shared in layer.shared.items():
                    prefix = f"{layer.name}.{attr}"
                    for name in _linear_children(shared, prefix, spec.mlp_projections):
                        wrapper = _wrap_linear(model, name, config, config.dropout)
                        add("shared", name, _lora_params(wrapper), layer.layer_id)
            ids = experts[layer.layer_id]
            if "experts" in config.targets and ids:
                if layer.layout.storage == "fused":
                    lora = ExpertLoRA.for_experts(layer.experts, ids, config.r, config.alpha, config.dropout)
                    layer.experts.sieve_lora = lora
                    add(
                        "experts",
                        f"{layer.experts_name}.sieve_lora",
                        list(lora.parameters()),
                        layer.layer_id,
                        ids,
                    )
                else:
                    params = []
                    for expert_id in ids:
                        prefix = f"{layer.experts_name}.{expert_id}"
                        for name in _linear_children(layer.experts[expert_id], prefix, spec.mlp_projections):
                            params += _lora_params(_wrap_linear(model, name, config, config.dropout))
                    add("experts", layer.experts_name, params, layer.layer_id, ids)
    if any(
        "experts" in config.targets and experts[layer.layer_id] and layer.layout.storage == "fused" for layer in layers
    ):
        register_sieve_experts_implementation()
        state.previous_experts_implementation = use_sieve_experts(model)
    model.moe_sieve = state
    verify_adapters(model)
    return state


def enable_router_aux_loss(model: nn.Module, coef: float) -> None:
    """Make the model's forward add its own load-balancing loss, ``coef * aux_loss``, to the LM loss.

    transformers computes it only with ``output_router_logits=True`` and scales it by the model attribute
    ``router_aux_loss_coef`` (copied from the config at init), so both are set. Families without one
    (e.g. DeepSeek-V3's bias-balanced routing) are refused rather than silently trained without it.
    """
    import inspect

    if "output_router_logits" not in inspect.signature(model.forward).parameters or not hasattr(
        model, "router_aux_loss_coef"
    ):
        raise ValueError(f"--router-aux-loss: {type(model).__name__} computes no load-balancing loss in transformers")
    model.config.output_router_logits = coef > 0
    model.config.router_aux_loss_coef = float(coef)
    model.router_aux_loss_coef = float(coef)


def _lora_params(wrapper: LoraLinear) -> list[nn.Parameter]:
    return [wrapper.lora_A.weight, wrapper.lora_B.weight]


def verify_adapters(model: nn.Module) -> None:
    """Fail loudly when a selected routed expert has no adapter (a frequent silent failure elsewhere)."""
    state: SieveState = model.moe_sieve
    if "experts" not in state.config.targets:
        return
    for layer in find_moe_layers(model):
        wanted = state.experts.get(layer.layer_id, [])
        if layer.layout.storage == "fused":
            lora = getattr(layer.experts, "sieve_lora", None)
            have = set() if lora is None else set(lora.selected_experts)
        else:
            have = {
                i
                for i, expert in enumerate(layer.experts)
                if all(isinstance(getattr(expert, p, None), LoraLinear) for p in ("up_proj", "down_proj"))
            }
        missing = sorted(set(wanted) - have)
        if missing:
            raise AdapterMissingError(f"layer {layer.layer_id}: selected experts {missing} have no LoRA adapter")
        extra = sorted(have - set(wanted))
        if extra:
            raise AdapterMissingError(f"layer {layer.layer_id}: unselected experts {extra} carry adapters")


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
