"""Step 3 of the recipe: attach LoRA to attention, routers, shared experts and the selected routed experts."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...arch import ArchSpec, MoELayer, UnsupportedModelError, config_fingerprint, find_moe_layers
from ...arch.layers import LAYER_INDEX
from ...profiling.artifact import ProfileMismatchError
from ...tables import TextTable
from ..factors import ADAPTER_WEIGHTS, full_numel, load_factors, trainable_parameters
from ..methods import AdaptedModule, AdapterState, attach_target
from ..tokens import attach_token_rows, merge_token_rows
from .config import SieveLoraConfig
from .expert_parallel import expert_shard, shard_expert_lora
from .experts import (
    ExpertLoRA,
    register_sieve_experts_implementation,
    restore_experts_implementation,
    use_sieve_experts,
)
from .layer import LoraLinear, LoraWeightDelta


class AdapterMissingError(RuntimeError):
    """A selected expert ended up without an adapter: refuse to train silently without it."""


@dataclass
class SkippedModule:
    """A module of a requested group that was deliberately left without LoRA, and why."""

    group: str
    layer: int | None
    name: str
    reason: str

    @property
    def label(self) -> str:
        leaf = self.name.rpartition(".")[2]
        return self.group if leaf.isdigit() else leaf

    def __str__(self) -> str:
        where = f"layer {self.layer} " if self.layer is not None else ""
        return f"{where}{self.label}: {self.reason}"


@dataclass
class SieveState(AdapterState):
    """What was attached, kept on the model as ``model.moe_sieve`` for saving, merging and reporting."""

    GROUPS = ("attention", "router", "shared", "experts")
    method = "sieve"

    config: SieveLoraConfig
    skipped: list[SkippedModule] = field(default_factory=list)

    def group_names(self) -> tuple[str, ...]:
        return (*self.GROUPS, "tokens") if self.config.tokens else self.GROUPS

    def table(self) -> TextTable:
        """Trainable parameters per layer and group; ``print(state.table())`` prints it as text."""
        cfg = self.config
        table = TextTable(title=f"Sieve LoRA (r={cfg.r}, alpha={cfg.alpha}, experts={cfg.experts})")
        for column in ("layer", "attention", "router", "shared", "adapted experts", "expert params"):
            table.add_column(column, justify="right")
        table.add_column("not adapted (why)", justify="left")
        layers = sorted({m.layer for m in self.modules + self.skipped if m.layer is not None})
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
                "\n".join(f"{s.label}: {s.reason}" for s in self.skipped if s.layer == layer),
            )
        groups = self.params_by_group()
        table.caption = (
            f"trainable {self.trainable_params:,} = attention {groups['attention']:,} + router {groups['router']:,}"
            f" + shared {groups['shared']:,} + experts {groups['experts']:,}"
        )
        if "tokens" in groups:
            table.caption += f" + token rows {groups['tokens']:,} ({len(self.config.tokens)} tokens)"
        unplaced = [str(s) for s in self.skipped if s.layer is None]
        if unplaced:
            table.caption += "\nnot adapted: " + "; ".join(unplaced)
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
        from ...selection import Selection

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
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def _wrap_linear(model: nn.Module, name: str, config: SieveLoraConfig, dropout: float) -> LoraLinear:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    base = getattr(parent, leaf)
    wrapper = LoraLinear(base, config.r, config.alpha, dropout)
    setattr(parent, leaf, wrapper)
    return wrapper


def _linear_children(module: nn.Module, prefix: str, leaf_names: Sequence[str] | None) -> list[str]:
    return _linears(module, prefix, leaf_names)[0]


def _linears(module: nn.Module, prefix: str, leaf_names: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Plain ``nn.Linear`` modules under ``module`` (wrappable), and ``nn.Linear`` subclasses, whose own
    forward may compute something other than ``x W^T + b`` (PhiMoE's router returns a tuple), kept apart."""
    plain, subclassed = [], []
    for sub_name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and not isinstance(sub, LoraLinear):
            leaf = sub_name.rpartition(".")[2] if sub_name else prefix.rpartition(".")[2]
            name = f"{prefix}.{sub_name}" if sub_name else prefix
            if (leaf_names is None or leaf in leaf_names) and ".lora_" not in name and ".base_layer" not in name:
                (plain if type(sub) is nn.Linear else subclassed).append(name)
    return plain, subclassed


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
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
    spec, layers, shape = attach_target(model, "this model already has Sieve LoRA adapters; load a fresh base model")
    experts = resolve_experts(layers, selection, config.experts)
    state = SieveState(config, experts, shape, config_fingerprint(model.config))
    for param in model.parameters():
        param.requires_grad_(False)

    def add(group: str, name: str, params: list[nn.Parameter], layer: int | None, expert_ids=()) -> None:
        for p in params:
            p.requires_grad_(True)
        state.modules.append(AdaptedModule(group, layer, name, sum(full_numel(p) for p in params), list(expert_ids)))

    def skip(group: str, layer: int | None, name: str, reason: str) -> None:
        state.skipped.append(SkippedModule(group, layer, name, reason))

    with seeded(config.seed):
        if "attention" in config.targets:
            _attach_attention(model, spec, layers, config, add, skip)
        if "shared" in config.targets and not any(layer.shared for layer in layers):
            skip("shared", None, "shared", f"the model has no shared experts ({'/'.join(spec.shared_attrs)})")
        for layer in layers:
            if "router" in config.targets and config.router == "full":
                _train_router_weights(model, layer, add)
            elif "router" in config.targets and config.router == "lora":
                _attach_router(model, layer, config, add)
            elif "router" in config.targets:
                skip("router", layer.layer_id, layer.router_name, "router frozen (--router freeze)")
            if "shared" in config.targets and not layer.shared and any(other.shared for other in layers):
                skip("shared", layer.layer_id, layer.name, "this MoE block has no shared expert")
            if "shared" in config.targets:
                for attr, shared in layer.shared.items():
                    prefix = f"{layer.name}.{attr}"
                    names, subclassed = _linears(shared, prefix, None)
                    for name in subclassed:
                        kind = type(model.get_submodule(name)).__name__
                        skip("shared", layer.layer_id, name, f"{kind} subclasses nn.Linear; not adapted")
                    if not names:
                        skip("shared", layer.layer_id, prefix, f"{type(shared).__name__} holds no nn.Linear")
                    for name in names:
                        if model.get_submodule(name).out_features == 1:
                            skip("shared", layer.layer_id, name, "scalar gate, not adapted by design")
                            continue
                        wrapper = _wrap_linear(model, name, config, config.dropout)
                        add("shared", name, _lora_params(wrapper), layer.layer_id)
            for attr, module in layer.unrecognised.items():
                skip(
                    "other",
                    layer.layer_id,
                    f"{layer.name}.{attr}",
                    f"{type(module).__name__} is neither router, experts nor a known shared module "
                    f"({'/'.join(spec.shared_attrs)}); not adapted",
                )
            ids = experts[layer.layer_id]
            if "experts" in config.targets and ids:
                if layer.layout.storage == "fused" and not layer.layout.dispatched:
                    why = spec.experts_lora_unsupported or (
                        f"{type(layer.experts).__name__} is not a transformers experts-interface module "
                        "(its forward never receives the routing)"
                    )
                    raise UnsupportedModelError(
                        f"layer {layer.layer_id} {layer.experts_name}: LoRA on routed experts is not supported: "
                        f"{why}; train without the experts target (--targets attention,router,shared)"
                    )
                if layer.layout.storage == "fused":
                    lora = fused_expert_lora(layer, ids, config)
                    layer.experts.sieve_lora = lora
                    add(
                        "experts",
                        f"{layer.experts_name}.sieve_lora",
                        list(lora.parameters()),
                        layer.layer_id,
                        ids,
                    )
                else:
                    add(
                        "experts",
                        layer.experts_name,
                        wrap_listed_experts(model, layer, ids, spec, config),
                        layer.layer_id,
                        ids,
                    )
    if any(
        "experts" in config.targets and experts[layer.layer_id] and layer.layout.storage == "fused" for layer in layers
    ):
        register_sieve_experts_implementation()
        state.previous_experts_implementation = use_sieve_experts(model)
    if config.tokens:
        attach_token_rows(model, state, config.tokens)
    model.moe_sieve = state
    verify_adapters(model)
    return state


def fused_expert_lora(layer: MoELayer, ids: Sequence[int], config: SieveLoraConfig) -> ExpertLoRA:
    """The activation-space LoRA of experts ``ids`` of a fused (3D) experts module (not yet attached); under
    expert parallelism, the part this rank owns (adapters/sieve/expert_parallel.py)."""
    lora = ExpertLoRA.for_experts(layer.experts, ids, config.r, config.alpha, config.dropout)
    shard = expert_shard(layer.experts)
    return lora if shard is None else shard_expert_lora(lora, shard)


def wrap_listed_experts(
    model: nn.Module, layer: MoELayer, ids: Sequence[int], spec: ArchSpec, config: SieveLoraConfig
) -> list[nn.Parameter]:
    """LoRA on every projection of experts ``ids`` of a ModuleList experts layer, in place; returns the new
    factors (attach and ``--reselect grow`` both add experts this way)."""
    params: list[nn.Parameter] = []
    for expert_id in ids:
        prefix = f"{layer.experts_name}.{expert_id}"
        for name in _linear_children(layer.experts[expert_id], prefix, spec.mlp_projections):
            params += _lora_params(_wrap_linear(model, name, config, config.dropout))
    return params


def _is_attention(name: str, module: nn.Module, spec: ArchSpec) -> bool:
    """Attention by structure: transformers names every attention class ``*Attention`` (NemotronH keeps it
    under ``mixer``, JetMoE under ``self_attention``); the spec's names add family-specific ones."""
    if _layer_of(name) is None or isinstance(module, nn.Linear):
        return False
    return name.rpartition(".")[2] in spec.attention_attrs or type(module).__name__.endswith("Attention")


def _decoder_layers(model: nn.Module, layers: Sequence[MoELayer]) -> tuple[str, nn.Module] | None:
    """The ModuleList of decoder layers that holds the MoE blocks (``model.layers``)."""
    match = LAYER_INDEX.search(layers[0].name)
    if match is None:
        return None
    prefix = layers[0].name[: match.start()]
    stack = model.get_submodule(prefix) if prefix else model
    return (prefix, stack) if isinstance(stack, nn.ModuleList) else None


def _attach_attention(model, spec, layers, config, add, skip) -> None:
    found: list[str] = []
    for name, module in model.named_modules():
        if _is_attention(name, module, spec) and not any(name.startswith(f"{outer}.") for outer in found):
            found.append(name)
    stack = _decoder_layers(model, layers)
    if not found and stack is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: attention LoRA requested but no attention module found (no module class named "
            f"*Attention, none named {'/'.join(spec.attention_attrs)}); add its name to ArchSpec.attention_attrs "
            "or train without the attention target"
        )
    for attn_name in found:
        names, subclassed = _linears(model.get_submodule(attn_name), attn_name, None)
        for name in subclassed:
            kind = type(model.get_submodule(name)).__name__
            skip("attention", _layer_of(name), name, f"{kind} subclasses nn.Linear with its own forward; not adapted")
        if not names:
            skip("attention", _layer_of(attn_name), attn_name, "holds no nn.Linear")
        for name in names:
            wrapper = _wrap_linear(model, name, config, config.dropout)
            add("attention", name, _lora_params(wrapper), _layer_of(name))
    if stack is not None:
        prefix, decoder = stack
        with_attention = {_layer_of(name) for name in found}
        for index, block in enumerate(decoder):
            if index not in with_attention:
                kinds = sorted({type(m).__name__ for m in block.children() if any(p.dim() > 1 for p in m.parameters())})
                skip("attention", index, f"{prefix}.{index}", f"no attention module in this layer ({', '.join(kinds)})")


def _train_router_weights(model: nn.Module, layer: MoELayer, add) -> None:
    """``--router full``: the router's own logit weight trains and is saved with the adapter."""
    owner = model.get_submodule(layer.router_weight_name) if layer.router_weight_name else layer.router
    params = list(owner.parameters(recurse=False))
    if not params:
        raise UnsupportedModelError(
            f"layer {layer.layer_id} {layer.router_name}: no router weight to train (--router full)"
        )
    add("router", layer.router_name, params, layer.layer_id)


def _attach_router(model: nn.Module, layer: MoELayer, config: SieveLoraConfig, add) -> None:
    """Router LoRA by what the router computes: the logits ``x W^T`` of its ``[E, hidden]`` weight.

    A plain ``nn.Linear`` is wrapped (PEFT-style keys); anything else (``nn.Linear`` subclasses returning a
    tuple such as PhiMoE's, v5 routers calling ``F.linear(x, self.weight)``, or a router holding an inner
    linear such as HunYuan's ``gate.wg``) gets the update as a parametrization of that weight, so its own
    forward runs unchanged.
    """
    if type(layer.router) is nn.Linear:
        wrapper = _wrap_linear(model, layer.router_name, config, 0.0)
        add("router", layer.router_name, _lora_params(wrapper), layer.layer_id)
        return
    if layer.router_weight_name is None:
        raise UnsupportedModelError(
            f"layer {layer.layer_id} {layer.router_name}: router LoRA not supported: {layer.router_weight_missing}; "
            "train without the router target (--targets attention,shared,experts)"
        )
    owner = model.get_submodule(layer.router_weight_name)
    if parametrize.is_parametrized(owner, "weight"):
        raise UnsupportedModelError(f"{layer.router_weight_name}.weight already carries a parametrization")
    weight = owner.weight
    delta = LoraWeightDelta(
        weight.shape[0], weight.shape[1], config.r, config.alpha, device=weight.device, dtype=weight.dtype
    )
    parametrize.register_parametrization(owner, "weight", delta)
    owner.parametrizations.weight.original.requires_grad_(False)
    add("router", layer.router_weight_name, [delta.lora_A, delta.lora_B], layer.layer_id)


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
            have = set() if lora is None else {lora.first_expert + e for e in lora.selected_experts}
            if lora is not None:  # expert parallelism: this rank owns experts [first, first + num_experts)
                wanted = [e for e in wanted if 0 <= e - lora.first_expert < lora.num_experts]
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


def load_sieve(model: nn.Module, path: str | os.PathLike, saved: dict[str, Any]) -> SieveState:
    """Attach the adapter described by ``saved`` (its adapter_config.json) and copy its factors exactly."""
    lora_config = SieveLoraConfig.from_json(saved["lora"])
    experts = {int(layer): ids for layer, ids in saved["experts"].items()}
    state = apply_sieve_lora(model, experts, lora_config)
    load_factors(model, Path(path) / ADAPTER_WEIGHTS)
    return state


def merge_sieve(model: nn.Module) -> nn.Module:
    """Fold every LoRA update (and any trained token rows) into the base weights and remove the adapters, in
    place (the sieve method's ``merge``; call it through :func:`~moe_sieve.adapters.io.merge_sieve_lora`)."""
    state = model.moe_sieve
    bad = [name for name, p in trainable_parameters(model).items() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(
            f"the adapter has non-finite (NaN/inf) values in {len(bad)} tensors (e.g. {bad[0]}); refusing to merge "
            "it into the base weights"
        )
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLinear):
                parent_name, _, leaf = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, leaf, module.merged())
        merge_token_rows(model)
        for module in list(model.modules()):
            if parametrize.is_parametrized(module, "weight") and any(
                isinstance(p, LoraWeightDelta) for p in module.parametrizations.weight
            ):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        for layer in find_moe_layers(model):
            lora = getattr(layer.experts, "sieve_lora", None)
            if lora is None:
                continue
            ids = lora.expert_ids
            for param_name, delta in lora.delta_weights().items():
                weight = getattr(layer.experts, param_name)
                acc = torch.promote_types(weight.dtype, torch.float32)  # float64 stays float64
                weight[ids] = (weight[ids].to(acc) + delta.to(acc)).to(weight.dtype)
            del layer.experts.sieve_lora
    if state.previous_experts_implementation is not None:
        restore_experts_implementation(model, state.previous_experts_implementation)
    for param in model.parameters():
        param.requires_grad_(False)
    del model.moe_sieve
    return model
