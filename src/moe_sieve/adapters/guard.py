"""The expert guard: no targeted routed expert is silently left untrained.

Other tools' users keep finding experts that never trained (PEFT #3009, NeMo Automodel #1151, unsloth-zoo #1242,
axolotl #3515). For the first ``steps`` optimizer steps the guard counts, per MoE layer, the tokens each expert
receives in training forwards (at positions whose prediction is supervised, see :func:`_contributing_mask`), and
just before each step checks that every selected expert that received tokens has a non-zero gradient on its
adapter, and that no unselected expert has a trainable parameter. A violation raises
:class:`UntrainedExpertError`, one line naming the layer, the experts and the likely cause.

It hooks the model (forward hooks) and every optimizer (``torch.optim``'s global step pre-hook), so it runs the
same under moe-sieve's ``train``, transformers' ``Trainer``, TRL's ``SFTTrainer`` or a hand-written loop. After the
checked steps its hooks are removed (one global optimizer hook stays, returning at once): later steps cost nothing.
"""

from __future__ import annotations

import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..arch import MoELayer, find_moe_layers, get_arch, read_routing
from ..profiling.recorder import fused_routing
from .sieve.model import AdapterMissingError

__all__ = ["ExpertGroup", "ExpertGuard", "UntrainedExpertError", "install_expert_guard", "sieve_groups"]

IGNORE_INDEX = -100


class UntrainedExpertError(AdapterMissingError, ValueError):
    """A selected expert received tokens but no gradient, or an unselected expert is trainable."""


@dataclass
class ExpertGroup:
    """Adapter parameters of some selected experts of one layer. With ``per_expert_dim`` each parameter's first
    dimension runs over ``experts`` in order (fused ``ExpertLoRA``); otherwise all belong to the one expert."""

    experts: list[int]
    params: list[nn.Parameter]
    per_expert_dim: bool = False


Collect = Callable[[], dict[int, list[ExpertGroup]]]


def sieve_groups(model: nn.Module, layers: Sequence[MoELayer] | None = None) -> dict[int, list[ExpertGroup]]:
    """The adapter parameters of each selected expert, as attached now: moe-sieve's own ``ExpertLoRA``/
    ``LoraLinear`` or the active adapter of a moe-sieve PEFT model."""
    from .sieve.experts import ExpertLoRA
    from .sieve.layer import LoraLinear

    groups: dict[int, list[ExpertGroup]] = {}
    for layer in layers or find_moe_layers(model):
        found: list[ExpertGroup] = []
        if layer.layout.storage == "fused":
            lora = getattr(layer.experts, "sieve_lora", None)
            current = lora.current() if hasattr(lora, "current") else lora
            # a grown adapter (--reselect grow) holds its factors in parts, each over its own experts
            for part in getattr(current, "parts", None) or [current]:
                if isinstance(part, ExpertLoRA) and part.num_selected:
                    found.append(ExpertGroup(list(part.selected_experts), list(part.parameters()), True))
        else:
            for expert_id, expert in enumerate(layer.experts):
                params = []
                for module in expert.modules():
                    if isinstance(module, LoraLinear):
                        params += [module.lora_A.weight, module.lora_B.weight]
                    elif hasattr(module, "lora_A") and hasattr(module, "_active"):  # moe-sieve PEFT SieveLinear
                        params += [p for name in module._active() for p in module.lora_A[name].parameters()]
                        params += [p for name in module._active() for p in module.lora_B[name].parameters()]
                if params:
                    found.append(ExpertGroup([expert_id], params))
        groups[layer.layer_id] = found
    return groups


def _contributing_mask(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """Tokens whose expert output certainly reaches the loss: positions whose own next-token prediction is
    supervised (``labels[p + 1] != -100``; HF causal-LM labels are unshifted), inside the attention mask.

    Earlier tokens usually reach the loss too, through later attention layers, but not from the last decoder layer
    (nothing mixes positions after it), so only these are judged: the guard never stops a correct run. Without
    labels, every attended token but the last of its row counts.
    """
    labels = kwargs.get("labels")
    mask = kwargs.get("attention_mask")
    mask = mask.bool() if torch.is_tensor(mask) and mask.dim() == 2 else None
    if torch.is_tensor(labels) and labels.dim() == 2:
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    elif mask is not None:
        positions_BS = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        keep = positions_BS < torch.where(mask, positions_BS, -1).amax(dim=1, keepdim=True)
    else:
        return None
    if mask is not None and mask.shape == keep.shape:
        keep = keep & mask
    return keep.reshape(-1)


class ExpertGuard:
    """Checks the first ``steps`` optimizer steps of ``model``; see the module docstring."""

    _active: weakref.WeakSet = weakref.WeakSet()
    _step_hook: Any = None

    def __init__(self, model: nn.Module, collect: Collect, steps: int = 2, *, label: str = "moe-sieve") -> None:
        self.model_ref = weakref.ref(model)
        self.collect = collect
        self.steps = steps
        self.label = label
        self.layers = find_moe_layers(model)
        self.spec = get_arch(model)
        self.checked = 0
        self.verified: set[tuple[int, int]] = set()
        self.silent: set[tuple[int, int]] = set()
        self.overhead_s = 0.0
        self.summary: str | None = None
        self._mask_T: torch.Tensor | None = None
        self._counts: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._optimizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        if steps > 0:
            self._install(model)

    # hooks -----------------------------------------------------------------------------------------------
    def _install(self, model: nn.Module) -> None:
        self._handles.append(model.register_forward_pre_hook(self._model_hook, with_kwargs=True))
        for layer in self.layers:
            if layer.routing_source == "experts":
                handle = layer.experts.register_forward_pre_hook(self._fused_hook(layer), with_kwargs=True)
            else:
                handle = layer.router.register_forward_hook(self._router_hook(layer))
            self._handles.append(handle)
        ExpertGuard._active.add(self)
        if ExpertGuard._step_hook is None:
            ExpertGuard._step_hook = register_optimizer_step_pre_hook(ExpertGuard._on_step)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._counts.clear()
        ExpertGuard._active.discard(self)  # the global step hook stays: with no active guard it only returns

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def _counting(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled()

    def _model_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._counting(module):
            start = time.perf_counter()
            self._mask_T = _contributing_mask(kwargs)
            self.overhead_s += time.perf_counter() - start

    def _count(self, layer: MoELayer, index_TK: torch.Tensor) -> None:
        start = time.perf_counter()
        index_TK = index_TK.reshape(index_TK.shape[0], -1).long()
        valid_TK = (index_TK >= 0) & (index_TK < layer.num_experts)
        mask_T = self._mask_T
        if mask_T is not None and mask_T.numel() == index_TK.shape[0]:
            valid_TK = valid_TK & mask_T.to(index_TK.device)[:, None]
        counts_E = torch.zeros(layer.num_experts, dtype=torch.long, device=index_TK.device)
        counts_E.scatter_add_(0, index_TK.clamp(0, layer.num_experts - 1).reshape(-1), valid_TK.reshape(-1).long())
        before = self._counts.get(layer.layer_id)
        self._counts[layer.layer_id] = counts_E if before is None else before + counts_E.to(before.device)
        self.overhead_s += time.perf_counter() - start

    def _fused_hook(self, layer: MoELayer):
        def hook(module, args, kwargs):
            if self._counting(module):
                index, _ = fused_routing(args, kwargs, module)
                self._count(layer, index)

        return hook

    def _router_hook(self, layer: MoELayer):
        def hook(module, args, output):
            if self._counting(module):
                index, _ = read_routing(self.spec, output, layer.num_experts, layer.top_k)
                self._count(layer, index)

        return hook

    @staticmethod
    def _on_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        for guard in list(ExpertGuard._active):
            guard.before_step(optimizer)

    # the check ---------------------------------------------------------------------------------------------
    def _owns(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> set[int] | None:
        """The ids of the optimizer's parameters when it trains this model (holds any of its parameters)."""
        cached = self._optimizers.get(optimizer)
        if cached is not None:
            return cached or None
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        mine = any(id(p) in ids for p in model.parameters())
        self._optimizers[optimizer] = ids if mine else set()
        return ids if mine else None

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        model = self.model_ref()
        if model is None or not self.active:
            self.remove()
            return
        in_optimizer = self._owns(optimizer, model)
        if in_optimizer is None:
            return
        start = time.perf_counter()
        try:
            self.check(in_optimizer)
        finally:
            self.overhead_s += time.perf_counter() - start
            self._counts.clear()
            self._mask_T = None
        self.checked += 1
        if self.checked >= self.steps:
            self.summary = self._summary()
            print(self.summary, file=sys.stderr)
            self.remove()

    def check(self, in_optimizer: set[int] | None = None) -> None:
        """Raise :class:`UntrainedExpertError` for the first layer that breaks the guarantee (see module doc)."""
        groups = self.collect()
        counts = {layer: c.tolist() for layer, c in self._counts.items()}
        problems: list[str] = []
        for layer in self.layers:
            problems += self._unselected_trainable(layer, groups.get(layer.layer_id, []))
        for layer in self.layers:
            tokens_E = counts.get(layer.layer_id)
            if tokens_E is None:
                continue
            failing: dict[str, tuple[list[int], int]] = {}
            for group in groups.get(layer.layer_id, []):
                nonzero = self._nonzero(group)
                for slot, expert in enumerate(group.experts):
                    if tokens_E[expert] <= 0:
                        self.silent.add((layer.layer_id, expert))
                        continue
                    if nonzero[slot]:
                        self.verified.add((layer.layer_id, expert))
                        self.silent.discard((layer.layer_id, expert))
                        continue
                    experts, tokens = failing.get(self._cause(layer, group, in_optimizer), ([], 0))
                    failing[self._cause(layer, group, in_optimizer)] = ([*experts, expert], tokens + tokens_E[expert])
            for cause, (experts, received) in failing.items():
                problems.append(
                    f"layer {layer.layer_id}: selected experts {experts} received {received} tokens but no gradient "
                    f"({cause})"
                )
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UntrainedExpertError(
                f"{self.label} expert guard, optimizer step {self.checked + 1}: {problems[0]}{more}; training stopped"
            )

    @staticmethod
    def _nonzero(group: ExpertGroup) -> list[bool]:
        n = len(group.experts)
        grads = [p.grad for p in group.params if p.grad is not None]
        if not grads:
            return [False] * n
        if group.per_expert_dim:
            flags = torch.stack([g.detach().reshape(n, -1).abs().amax(dim=1) > 0 for g in grads]).any(dim=0)
            return flags.tolist()
        return [bool(torch.stack([g.detach().abs().amax() for g in grads]).amax() > 0)]

    def _cause(self, layer: MoELayer, group: ExpertGroup, in_optimizer: set[int] | None) -> str:
        if layer.layout.storage == "fused":
            impl = getattr(getattr(layer.experts, "config", None), "_experts_implementation", None)
            if impl != "sieve_lora":
                return f"the experts run the {impl!r} implementation, which bypasses the 'sieve_lora' adapter"
        if not all(p.requires_grad for p in group.params):
            return "their adapter parameters are frozen (requires_grad=False)"
        if in_optimizer is not None and not all(id(p) in in_optimizer for p in group.params):
            return "their adapter parameters are not in the optimizer"
        if all(p.grad is None for p in group.params):
            return "their adapter is not in the autograd graph (grad is None)"
        return "their adapter gradient is exactly zero"

    @staticmethod
    def _unselected_trainable(layer: MoELayer, groups: list[ExpertGroup]) -> list[str]:
        """Trainable parameters under the experts module that belong to no selected expert's adapter."""
        allowed = {id(p) for group in groups for p in group.params}
        trainable = [n for n, p in layer.experts.named_parameters() if p.requires_grad and id(p) not in allowed]
        if not trainable:
            return []
        if layer.layout.storage == "module_list":
            experts = sorted({int(n.split(".")[0]) for n in trainable})
            cause = f"{len(trainable)} trainable tensors, e.g. {layer.experts_name}.{trainable[0]}"
            return [f"layer {layer.layer_id}: unselected experts {experts} have trainable parameters ({cause})"]
        return [
            f"layer {layer.layer_id}: {layer.experts_name}.{trainable[0]} is trainable, which trains every expert "
            f"of the layer, not only the selected ones"
        ]

    def _summary(self) -> str:
        selected = sum(len(g.experts) for gs in self.collect().values() for g in gs)
        silent = len(self.silent - self.verified)
        return (
            f"{self.label}: expert guard checked {self.checked} optimizer steps: {len(self.verified)} of {selected} "
            f"selected experts received tokens and gradients"
            + (f", {silent} received no tokens in those steps (not judged)" if silent else "")
            + f"; no unselected expert is trainable (guard time {self.overhead_s * 1e3:.1f} ms)"
        )


def install_expert_guard(model: nn.Module, steps: int = 2, collect: Collect | None = None) -> ExpertGuard:
    """Guard a model carrying Sieve LoRA (``apply_sieve_lora``, ``load_sieve_adapter`` or a moe-sieve PEFT model)
    for its first ``steps`` optimizer steps in whatever training loop runs it."""
    layers = find_moe_layers(model)
    return ExpertGuard(model, collect or (lambda: sieve_groups(model, layers)), steps)
