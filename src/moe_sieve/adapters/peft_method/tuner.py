"""``SieveModel``: the PEFT tuner behind ``get_peft_model(model, SieveConfig(...))``.

Which modules get LoRA is decided by ``apply_sieve_lora`` itself, run on a weightless (meta) copy of the model
(the *skeleton*): the tuner then builds its multi-adapter layers at exactly the modules that call attached, in
the same order and from the same seeded RNG draws, so ``get_peft_model`` and ``apply_sieve_lora`` give the same
trainable parameters with the same initial values, and the fused experts run the same ``sieve_lora`` forward.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import weakref
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ...arch import UnsupportedModelError, find_moe_layers
from ..sieve.experts import ExpertLoRA, restore_experts_implementation, use_sieve_experts
from ..sieve.layer import LoraLinear, LoraWeightDelta
from ..sieve.model import AdapterMissingError, SieveState, apply_sieve_lora, enable_router_aux_loss, seeded
from .config import SieveConfig
from .layers import ONE_ACTIVE, SieveExpertsLayer, SieveLinear, SieveTunerLayer, SieveWeightDelta

_AUX_KEYS = ("output_router_logits", "router_aux_loss_coef")


def skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device (no weight memory)."""
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


def refuse_foreign(model: nn.Module) -> None:
    """Mixing with other adapter methods cannot keep PEFT's semantics (merge, unload, disable): refuse it."""
    if getattr(model, "moe_sieve", None) is not None:
        raise ValueError(
            "this model already carries moe-sieve adapters (apply_sieve_lora/load_sieve_adapter); load a fresh base "
            "model for get_peft_model"
        )
    foreign = next(
        (
            type(m).__name__
            for m in model.modules()
            if isinstance(m, BaseTunerLayer) and not isinstance(m, SieveTunerLayer)
        ),
        None,
    )
    if foreign is not None:
        raise ValueError(
            f"the model already has {foreign} adapters of another PEFT method; moe-sieve adapters cannot be mixed "
            "with them (merge_and_unload() the other adapter first)"
        )


class SieveModel(BaseTuner):
    """Sieve LoRA adapters, one or more per model, one active at a time (see :class:`SieveConfig`)."""

    prefix: str = "lora_"
    tuner_layer_cls = SieveTunerLayer
    target_module_mapping: dict[str, list[str]] = {}

    # construction ---------------------------------------------------------------------------------------------
    def _pre_injection_hook(self, model: nn.Module, config: SieveConfig, adapter_name: str) -> None:
        if not hasattr(self, "_skeleton"):
            refuse_foreign(model)
            object.__setattr__(self, "_skeleton", skeleton(model))  # not a submodule: never trained or saved
            self.sieve_states: dict[str, SieveState] = {}
            self.full_lora_params: dict[str, int] = {}
            self._previous_experts_implementation: dict | None = None
            self._previous_aux: dict[str, Any] | None = None
            self.guard = None
            self.training_record: dict[str, Any] = {"optimizer_steps": 0, "tokens": None}
            self._aux_reported = False
            self._handles: list[Any] = []

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("SieveModel places adapters through inject_adapter")

    @staticmethod
    def _check_target_module_exists(peft_config: Any, key: str) -> bool:
        return False

    def _plan(self, config: SieveConfig, experts_mode: str | None = None) -> tuple[nn.Module, SieveState]:
        """``apply_sieve_lora`` on a fresh copy of the skeleton: what to attach, and where."""
        probe = copy.deepcopy(self._skeleton)
        lora = config.to_lora_config()
        if experts_mode is not None:
            lora = dataclasses.replace(lora, experts=experts_mode)
        selection = config.experts_by_layer if lora.experts == "selected" else None
        return probe, apply_sieve_lora(probe, selection, lora)

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        config: SieveConfig = self.peft_config[adapter_name]
        if config.modules_to_save or config.trainable_token_indices:
            raise ValueError(
                "SieveConfig: modules_to_save/trainable_token_indices are not supported by moe-sieve adapters "
                "(they train whole modules or embedding rows outside the sieve)"
            )
        if not isinstance(config, SieveConfig):
            raise ValueError(f"SieveModel takes SieveConfig adapters, got {type(config).__name__}")
        probe, state = self._plan(config)
        fused = False
        with seeded(config.seed):
            for entry in state.modules:
                target = probe.get_submodule(entry.name)
                if isinstance(target, LoraLinear):
                    self._add_linear(model, entry.name, adapter_name, target)
                elif isinstance(target, ExpertLoRA):
                    experts = model.get_submodule(entry.name.rpartition(".")[0])
                    layer = experts._modules.get("sieve_lora")
                    if layer is None:
                        layer = experts.sieve_lora = SieveExpertsLayer(experts)
                    layer.update_layer(
                        adapter_name, list(target.selected_experts), target.r, target.alpha, target.dropout.p
                    )
                    fused = True
                elif entry.group == "router" and parametrize.is_parametrized(target, "weight"):
                    self._add_router_delta(model, entry.name, adapter_name, target)
                elif entry.group == "experts":  # nn.ModuleList experts: one LoraLinear per projection
                    for sub_name, sub in target.named_modules():
                        if isinstance(sub, LoraLinear):
                            self._add_linear(model, f"{entry.name}.{sub_name}", adapter_name, sub)
                else:
                    raise UnsupportedModelError(f"{entry.name}: no PEFT layer for {type(target).__name__}")
        built = sum(p.numel() for n, p in model.named_parameters() if f".{adapter_name}." in f"{n}." and _is_adapter(n))
        if built != state.trainable_params:
            raise AdapterMissingError(
                f"adapter {adapter_name!r}: built {built:,} parameters where apply_sieve_lora attaches "
                f"{state.trainable_params:,}"
            )
        if fused and self._previous_experts_implementation is None:
            self._previous_experts_implementation = use_sieve_experts(model)
        self.sieve_states[adapter_name] = state
        self.full_lora_params[adapter_name] = (
            self._plan(config, "all")[1].trainable_params
            if "experts" in state.config.targets
            else state.trainable_params
        )
        owner = weakref.ref(self)
        config._card_context = lambda name=adapter_name: owner().card_context(name) if owner() else {}
        if len(self.sieve_states) == 1:
            self._setup_training_hooks(model, config)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)

    def _add_linear(self, model: nn.Module, name: str, adapter_name: str, planned: LoraLinear) -> None:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        current = getattr(parent, leaf)
        if not isinstance(current, SieveLinear):
            if type(current) is not nn.Linear:
                raise UnsupportedModelError(f"{name}: expected an nn.Linear, found {type(current).__name__}")
            current = SieveLinear(current)
            setattr(parent, leaf, current)
        dropout = planned.lora_dropout.p if isinstance(planned.lora_dropout, nn.Dropout) else 0.0
        current.update_layer(adapter_name, planned.r, planned.scaling * planned.r, dropout)

    def _add_router_delta(self, model: nn.Module, name: str, adapter_name: str, planned: nn.Module) -> None:
        owner = model.get_submodule(name)
        plan = next(p for p in planned.parametrizations.weight if isinstance(p, LoraWeightDelta))
        if not parametrize.is_parametrized(owner, "weight"):
            weight = owner.weight
            delta = SieveWeightDelta(owner, weight.shape[0], weight.shape[1])
            parametrize.register_parametrization(owner, "weight", delta)
            owner.parametrizations.weight.original.requires_grad_(False)
        delta = next((p for p in owner.parametrizations.weight if isinstance(p, SieveWeightDelta)), None)
        if delta is None:
            raise UnsupportedModelError(f"{name}.weight already carries a parametrization that is not moe-sieve's")
        original = owner.parametrizations.weight.original
        delta.update_layer(adapter_name, plan.r, plan.scaling * plan.r, original.device, original.dtype)

    # adapters -------------------------------------------------------------------------------------------------
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise ValueError(f"{ONE_ACTIVE}; got {names}")
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.sieve_states.pop(adapter_name, None)
        self.full_lora_params.pop(adapter_name, None)

    def _check_merge_allowed(self) -> None:
        bad = [n for n, p in self.model.named_parameters() if _is_adapter(n) and not torch.isfinite(p).all()]
        if bad:
            raise ValueError(
                f"the adapter has non-finite (NaN/inf) values in {len(bad)} tensors (e.g. {bad[0]}); refusing to merge "
                "it into the base weights"
            )

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """Fold the adapters into the base weights (``merge``) or drop them, and give back the plain model:
        the same weights as ``merge_sieve_lora`` for the same factors."""
        if merge:
            self._check_merge_allowed()
        model = self.model
        for module in list(model.modules()):
            if isinstance(module, SieveTunerLayer) and merge:
                module.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        for name, module in list(model.named_modules()):
            if isinstance(module, SieveLinear):
                parent_name, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module.base_layer)
        for module in list(model.modules()):
            if parametrize.is_parametrized(module, "weight") and any(
                isinstance(p, SieveWeightDelta) for p in module.parametrizations.weight
            ):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        for module in list(model.modules()):
            if isinstance(module._modules.get("sieve_lora"), SieveExpertsLayer):
                del module._modules["sieve_lora"]
        if self._previous_experts_implementation is not None:
            restore_experts_implementation(model, self._previous_experts_implementation)
            self._previous_experts_implementation = None
        self._remove_training_hooks(model)
        for param in model.parameters():
            param.requires_grad_(False)
        if hasattr(model, "peft_config"):
            del model.peft_config
        return model

    # training: router aux loss, guard, record for the model card -------------------------------------------------
    def _setup_training_hooks(self, model: nn.Module, config: SieveConfig) -> None:
        self._apply_aux_choice(model, config)
        self._handles.append(model.register_forward_pre_hook(self._training_forward, with_kwargs=True))
        if config.guard_steps > 0:
            from ..guard import install_expert_guard

            self.guard = install_expert_guard(model, config.guard_steps)
        ref = weakref.ref(self)

        def count_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            tuner = ref()
            if tuner is not None:
                tuner._count_step(optimizer)

        self._handles.append(register_optimizer_step_pre_hook(count_step))

    def _apply_aux_choice(self, model: nn.Module, config: SieveConfig) -> None:
        """The router load-balancing loss follows ``config.router_aux_loss_coef`` (0.0: off, moe-sieve's default).

        Trainers that read the model config (TRL's ``SFTConfig(router_aux_loss_coef=None)``, its default) then see
        the same choice; the previous values come back on ``unload``/``merge_and_unload``.
        """
        coef = config.router_aux_loss_coef
        hf_config = getattr(model, "config", None)
        if coef is None or hf_config is None or not hasattr(hf_config, "router_aux_loss_coef"):
            if coef:
                enable_router_aux_loss(model, coef)  # refuses families without a load-balancing loss
            return
        self._previous_aux = {key: getattr(hf_config, key, None) for key in _AUX_KEYS}
        self._previous_aux["model_attr"] = getattr(model, "router_aux_loss_coef", None)
        if coef > 0:
            enable_router_aux_loss(model, coef)
        else:
            hf_config.output_router_logits = False
            hf_config.router_aux_loss_coef = 0.0
            if hasattr(model, "router_aux_loss_coef"):
                model.router_aux_loss_coef = 0.0

    def _training_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(mask):
            tokens = mask.detach().sum()
            before = self.training_record["tokens"]
            self.training_record["tokens"] = tokens if before is None else before + tokens.to(before.device)
        if self._aux_reported:
            return
        self._aux_reported = True
        hf_config = getattr(module, "config", None)
        on = bool(kwargs.get("output_router_logits")) or bool(getattr(hf_config, "output_router_logits", False))
        asked = self.peft_config[self.active_adapters[0]].router_aux_loss_coef
        coef = getattr(hf_config, "router_aux_loss_coef", None)
        self.training_record["router_aux_loss_coef"] = (coef or 0.0) if on else 0.0
        if on and not asked:
            why = "leaves it to the trainer" if asked is None else "turns it off"
            print(
                f"moe-sieve: the trainer turned on the router load-balancing loss (coefficient {coef}) although "
                f"SieveConfig(router_aux_loss_coef={asked}) {why}; "
                "set SFTConfig(router_aux_loss_coef=0.0) for moe-sieve's default (off)",
                file=sys.stderr,
            )
        elif asked and not on:
            print(
                f"moe-sieve: SieveConfig(router_aux_loss_coef={asked}) asks for the router load-balancing loss but "
                "the trainer turned it off",
                file=sys.stderr,
            )

    def _count_step(self, optimizer: torch.optim.Optimizer) -> None:
        ids = getattr(self, "_optimizer_ids", None)
        if ids is None or ids[0]() is not optimizer:
            mine = {id(p) for p in self.model.parameters()}
            ours = any(id(p) in mine for group in optimizer.param_groups for p in group["params"])
            self._optimizer_ids = ids = (weakref.ref(optimizer), ours)
        if ids[1]:
            self.training_record["optimizer_steps"] += 1

    def _remove_training_hooks(self, model: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.guard is not None:
            self.guard.remove()
        if self._previous_aux is not None:
            attr = self._previous_aux.pop("model_attr")
            for key, value in self._previous_aux.items():
                setattr(model.config, key, value)
            if attr is not None:
                model.router_aux_loss_coef = attr
            self._previous_aux = None

    # the model card -----------------------------------------------------------------------------------------------
    def record_card(self, *, training: dict[str, Any] | None = None, eval_result: Any = None) -> None:
        """Add training facts (``{"data": ..., ...}``) and an evaluation result (an ``EvalResult`` or its JSON) to
        the model card the next ``save_pretrained``/``push_to_hub`` writes; steps and tokens are recorded already."""
        from ..card import eval_rows

        if training:
            self.card_training = {**getattr(self, "card_training", {}), **training}
        if eval_result is not None:
            record = eval_result.to_json() if hasattr(eval_result, "to_json") else dict(eval_result)
            self.card_eval = [*(getattr(self, "card_eval", None) or []), *eval_rows(record)]

    def card_context(self, adapter_name: str) -> dict[str, Any]:
        state = self.sieve_states.get(adapter_name)
        if state is None:
            return {}
        tokens = self.training_record["tokens"]
        model = self.model
        return {
            "state": state,
            "full_lora_params": self.full_lora_params.get(adapter_name),
            "base_model": {
                "id": getattr(model.config, "_name_or_path", None) or None,
                "class": type(model).__name__,
                "model_type": getattr(model.config, "model_type", None),
                "config_fingerprint": state.base_config_fingerprint,
            },
            "training": {
                **getattr(self, "card_training", {}),
                "optimizer_steps": self.training_record["optimizer_steps"],
                "tokens": None if tokens is None else int(tokens),
                "router_aux_loss_coef": self.training_record.get("router_aux_loss_coef"),
            },
            "eval": getattr(self, "card_eval", None),
            "moe_layers": len(find_moe_layers(self._skeleton)),
        }


def _is_adapter(name: str) -> bool:
    return any(part in name for part in (".lora_A.", ".lora_B.", ".lora_experts."))


__all__ = ["SieveModel", "refuse_foreign", "skeleton"]
