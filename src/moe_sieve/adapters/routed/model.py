"""Attach, save, load and plan Routed-PEFT adapters; the R router's auxiliary loss and load statistics.

The attached adapters are described by a :class:`RoutedState` kept as ``model.moe_sieve`` (the same slot as
Sieve LoRA), so the adapter artifact, trainer checkpoints and ``eval --adapter`` treat both families alike.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...arch import MoELayer, config_fingerprint, find_moe_layers, topk_weights_of
from ..factors import ADAPTER_WEIGHTS, load_factors
from ..methods import AdaptedModule, AdapterState, attach_target
from ..sieve.experts import restore_experts_implementation, use_sieve_experts
from ..sieve.model import resolve_experts, seeded
from .config import RoutedAdapterConfig
from .layer import RoutedBlockAdapter, RoutedExpertAdapter

NOT_MERGEABLE = (
    "Routed-PEFT adapters cannot be folded into the base weights: every variant adds a function of the FFN "
    "input x to the FFN output (S/D: s B A x; R: router-weighted; E: G_i(x) s B_i A_i x inside expert i), and no "
    "existing weight matrix maps x linearly to the FFN output (an expert's down projection reads "
    "act(W_g x) * (W_u x), not x). Serve the model with the adapter attached (load_sieve_adapter / eval --adapter)."
)


@dataclass
class RoutedState(AdapterState):
    """What was attached (``model.moe_sieve``), plus R's auxiliary-loss and router-load bookkeeping."""

    GROUPS = ("adapters", "adapter_router")
    method = "routed"

    config: RoutedAdapterConfig
    hidden_size: int = 0
    handles: list[Any] = field(default_factory=list, repr=False)
    adapters: dict[int, nn.Module] = field(default_factory=dict, repr=False)
    mask_T: torch.Tensor | None = field(default=None, repr=False)
    last_aux_loss: torch.Tensor | None = field(default=None, repr=False)
    aux_sum: float = 0.0
    aux_count: int = 0
    aux_log: list[dict[str, float]] = field(default_factory=list)
    load_LN: torch.Tensor | None = field(default=None, repr=False)
    disabled: bool = False  # PEFT's disable_adapter(): the hooks add nothing

    def aux_loss(self) -> torch.Tensor | None:
        """R's Switch loss of the last forward, pooled over layers: ``N * sum_j f_j P_j`` (unweighted)."""
        terms = [a.last_terms for a in self.adapters.values() if getattr(a, "last_terms", None) is not None]
        if not terms:
            return None
        probs_N = sum(t[0] for t in terms)
        assigned_N = sum(t[1] for t in terms)
        tokens = sum(t[2] for t in terms).clamp(min=1.0)
        return self.config.num_adapters * torch.sum((assigned_N / tokens) * (probs_N / tokens))

    def router_load(self) -> dict[str, Any] | None:
        """Share of top-K assignments per adapter and layer over all training forwards (R only)."""
        if self.load_LN is None:
            return None
        share_LN = self.load_LN / self.load_LN.sum(-1, keepdim=True).clamp(min=1)
        mean = 1.0 / self.config.num_adapters
        return {
            "layers": list(self.adapters),
            "assignments_LN": self.load_LN.tolist(),
            "share_LN": share_LN.tolist(),
            "max_share_over_uniform": float(share_LN.max() / mean),
            "min_share_over_uniform": float(share_LN.min() / mean),
        }

    def table(self):
        """Trainable parameters per module; ``print(state.table())`` prints it as text."""
        from ...tables import TextTable

        cfg = self.config
        table = TextTable(
            title=f"Routed-PEFT {cfg.variant} ({cfg.adapter_type}, r={cfg.r}, N={cfg.num_adapters}, K={cfg.top_k})"
        )
        for column in ("layer", "module", "adapted experts", "params"):
            table.add_column(column, justify="right")
        for m in self.modules:
            table.add_row(str(m.layer), m.name, str(len(m.experts)) if m.experts else "-", f"{m.params:,}")
        table.caption = f"trainable {self.trainable_params:,}"
        return table


def _renormalizes(layer: MoELayer, spec: Any, hidden_size: int) -> bool:
    """Whether the model renormalises its own top-k: the kept weights sum to the same value for every token."""
    if layer.router.weight.is_meta if hasattr(layer.router, "weight") else False:
        return False
    captured: list[torch.Tensor] = []
    handle = _tap_base_routing(layer, spec, captured.append)
    param = next(layer.block.parameters())
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            layer.block(torch.randn(1, 16, hidden_size, dtype=param.dtype, device=param.device))
    finally:
        handle.remove()
    sums_T = captured[-1].float().sum(-1)
    return bool((sums_T.max() - sums_T.min()).abs() <= 1e-3 * sums_T.abs().max().clamp(min=1e-6))


def _tap_base_routing(layer: MoELayer, spec: Any, sink) -> Any:
    """Hook that hands the frozen router's top-k weights ``[T, K]`` of each forward to ``sink``."""
    if layer.layout.storage == "fused":

        def pre_hook(module, args, kwargs):
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
            index = index.reshape(-1, index.shape[-1])
            sink(topk_weights_of(index, weights.reshape(index.shape[0], -1), layer.num_experts))

        return layer.experts.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(module, args, output):
        index, weights = spec.routing_from_router(output, layer.num_experts)
        sink(topk_weights_of(index, weights, layer.num_experts))

    return layer.router.register_forward_hook(hook)


def _block_hook(state: RoutedState, adapter: RoutedBlockAdapter):
    def hook(module, args, kwargs, output):
        if state.disabled:
            return output
        x = args[0] if args else kwargs["hidden_states"]
        x_TD = x.reshape(-1, x.shape[-1])
        mask_T = state.mask_T if state.mask_T is not None and state.mask_T.numel() == x_TD.shape[0] else None
        delta = adapter(x_TD, mask_T).reshape(x.shape)
        if isinstance(output, tuple):
            return (output[0] + delta.to(output[0].dtype), *output[1:])
        return output + delta.to(output.dtype)

    return hook


def _expert_hook(bank: nn.Module, slot: int, state: RoutedState):
    def hook(module, args, output):
        if state.disabled:
            return output
        return output + bank.single(slot, args[0]).to(output.dtype)

    return hook


def _model_pre_hook(state: RoutedState):
    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        state.mask_T = mask.reshape(-1).bool() if torch.is_tensor(mask) and mask.dim() == 2 else None
        for adapter in state.adapters.values():
            if isinstance(adapter, RoutedBlockAdapter):
                adapter.last_terms = None

    return hook


def _model_post_hook(state: RoutedState):
    """In training, add ``aux_loss_coef`` times R's load-balancing loss to ``output.loss`` and count the load."""

    def hook(module, args, kwargs, output):
        state.mask_T = None
        if state.config.variant != "R" or not module.training or state.disabled:
            return output
        aux = state.aux_loss()
        if aux is None:
            return output
        state.last_aux_loss = aux.detach()
        state.aux_sum += float(aux.detach())
        state.aux_count += 1
        with torch.no_grad():
            load_LN = torch.stack([a.last_terms[1].detach().double().cpu() for a in state.adapters.values()])
            state.load_LN = load_LN if state.load_LN is None else state.load_LN + load_LN
        loss = getattr(output, "loss", None)
        if loss is not None and state.config.aux_loss_coef > 0:
            output.loss = loss + state.config.aux_loss_coef * aux.to(loss.dtype)
        return output

    return hook


def apply_routed_adapters(
    model: nn.Module, selection: Any = None, config: RoutedAdapterConfig | None = None
) -> RoutedState:
    """Freeze ``model`` and attach Routed-PEFT adapters in place; only adapters (+ R's router) train.

    ``selection`` (a Selection, its JSON path or ``{layer: [experts]}``) is read for ``E`` with
    ``experts="selected"`` only. Fused experts run E inside the ``sieve_lora`` grouped experts forward.
    """
    config = config or RoutedAdapterConfig()
    spec, layers, shape = attach_target(model, "this model already has adapters attached; load a fresh base model")
    hidden_size = int(getattr(model.config, "hidden_size", 0) or 0)
    if hidden_size <= 0:
        raise ValueError("model config has no hidden_size")
    experts: dict[int, list[int]] = {}
    if config.variant == "E":
        experts = resolve_experts(layers, selection, config.experts)
        empty = [layer for layer, ids in experts.items() if not ids]
        if empty:
            raise ValueError(f"variant E: the selection leaves MoE layers {empty} without experts")
    state = RoutedState(config, experts, shape, config_fingerprint(model.config), hidden_size=hidden_size)
    for param in model.parameters():
        param.requires_grad_(False)
    fused_e = False
    with seeded(config.seed):
        for layer in layers:
            ref = next(layer.block.parameters())
            kw = {"dtype": ref.dtype, "device": ref.device}
            if config.variant == "E":
                ids = experts[layer.layer_id]
                adapter = RoutedExpertAdapter(ids, layer.num_experts, hidden_size, config, **kw)
                if layer.layout.storage == "fused":
                    layer.experts.routed_adapter = adapter
                    name = f"{layer.experts_name}.routed_adapter"
                    fused_e = True
                else:
                    layer.block.routed_adapter = adapter
                    name = f"{layer.name}.routed_adapter"
                    for slot, expert_id in enumerate(adapter.selected_experts):
                        state.handles.append(
                            layer.experts[expert_id].register_forward_hook(_expert_hook(adapter.bank, slot, state))
                        )
                state.modules.append(AdaptedModule("adapters", layer.layer_id, name, _count(adapter), list(ids)))
            else:
                renorm = {"yes": True, "no": False}.get(config.renormalize)
                if renorm is None:
                    renorm = (
                        config.variant == "R"
                        and config.top_k < config.num_adapters
                        and not ref.is_meta
                        and (_renormalizes(layer, spec, hidden_size))
                    )
                adapter = RoutedBlockAdapter(hidden_size, config, renormalize=bool(renorm), **kw)
                layer.block.routed_adapter = adapter
                name = f"{layer.name}.routed_adapter"
                state.modules.append(AdaptedModule("adapters", layer.layer_id, name + ".bank", _count(adapter.bank)))
                if adapter.router is not None:
                    state.modules.append(
                        AdaptedModule("adapter_router", layer.layer_id, name + ".router", adapter.router.weight.numel())
                    )
                if config.base_router_weights:

                    def sink(w, adapter=adapter):
                        adapter.base_weights_TK = w

                    state.handles.append(_tap_base_routing(layer, spec, sink))
                state.handles.append(layer.block.register_forward_hook(_block_hook(state, adapter), with_kwargs=True))
            adapter.train(model.training)  # new modules start in training mode; follow the model's
            for p in adapter.parameters():
                p.requires_grad_(True)
            state.adapters[layer.layer_id] = adapter
    if fused_e:
        state.previous_experts_implementation = use_sieve_experts(model)
    state.handles.append(model.register_forward_pre_hook(_model_pre_hook(state), with_kwargs=True))
    state.handles.append(model.register_forward_hook(_model_post_hook(state), with_kwargs=True))
    model.moe_sieve = state
    return state


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def remove_routed_adapters(model: nn.Module) -> nn.Module:
    """Detach every routed adapter and hook, leaving the base model as it was loaded."""
    state = model.moe_sieve
    for handle in state.handles:
        handle.remove()
    for layer in find_moe_layers(model):
        for owner in (layer.block, layer.experts):
            if "routed_adapter" in owner._modules:
                del owner._modules["routed_adapter"]
    if state.previous_experts_implementation is not None:
        restore_experts_implementation(model, state.previous_experts_implementation)
    del model.moe_sieve
    return model


def load_routed_adapter(model: nn.Module, path: str | os.PathLike, saved: dict[str, Any]) -> RoutedState:
    """Attach the adapter described by ``saved`` (its adapter_config.json) and copy its weights exactly."""
    config = RoutedAdapterConfig.from_json(saved["lora"])
    experts = {int(layer): ids for layer, ids in saved.get("experts", {}).items()} or None
    state = apply_routed_adapters(
        model, experts, dataclasses.replace(config, experts="selected") if experts else config
    )
    state.config = config
    load_factors(model, Path(path) / ADAPTER_WEIGHTS)
    return state


def plan_routed(model: str | Any, config: RoutedAdapterConfig, k: str | int = "25%", trust_remote_code: bool = False):
    """Trainable parameters from the config alone (meta device), as counted and as the documented formula,
    and their share of the total and of the activated (per-token) parameters."""
    from ...routing_stats import resolve_k
    from ..plan import ADAMW_STATE_BYTES, load_config, meta_model

    hf_config = load_config(model, trust_remote_code) if isinstance(model, (str, Path)) else model
    net = meta_model(hf_config, trust_remote_code)
    layers = find_moe_layers(net)
    total = sum(p.numel() for p in net.parameters())
    inactive = 0
    for layer in layers:
        routed = sum(p.numel() for p in layer.experts.parameters())
        inactive += routed * (layer.num_experts - layer.top_k) // layer.num_experts
    activated = total - inactive
    num_experts = layers[0].num_experts
    selected = None
    if config.variant == "E" and config.experts == "selected":
        k_int = resolve_k(k, num_experts)
        selected = {layer.layer_id: list(range(k_int)) for layer in layers}
    state = apply_routed_adapters(net, selected, dataclasses.replace(config, renormalize="no"))
    hidden = state.hidden_size
    adapted = {layer: len(ids) for layer, ids in state.experts.items()}
    formula = sum(config.params_per_layer(hidden, adapted.get(layer.layer_id, 0)) for layer in layers)
    trainable = state.trainable_params
    return {
        "model": str(model) if isinstance(model, (str, Path)) else type(model).__name__,
        "model_type": getattr(hf_config, "model_type", None),
        "method": "routed",
        **{k_: v for k_, v in config.to_json().items() if k_ != "method"},
        "hidden_size": hidden,
        "moe_layers": len(layers),
        "num_experts": num_experts,
        "adapted_experts_per_layer": None if config.variant != "E" else max(adapted.values()),
        "base_params": total,
        "activated_params": activated,
        "trainable_params": trainable,
        "formula_params": formula,
        "trainable_pct_of_total": 100.0 * trainable / total,
        "trainable_pct_of_activated": 100.0 * trainable / activated,
        "trainable_by_group": state.params_by_group(),
        "checkpoint_bytes": 4 * trainable,
        "optimizer_bytes": ADAMW_STATE_BYTES * trainable,
    }


class RoutedLogCallback:
    """Adds R's mean auxiliary loss since the last log line to the printed logs and to ``state.aux_log``."""

    def __new__(cls, state: RoutedState):
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):
            def on_log(self, args, trainer_state, control, logs=None, **kwargs):
                if logs is not None and state.aux_count:
                    logs["aux_loss"] = round(state.aux_sum / state.aux_count, 6)
                    state.aux_log.append({"step": trainer_state.global_step, "aux_loss": logs["aux_loss"]})
                    state.aux_sum, state.aux_count = 0.0, 0

        return _Callback()
