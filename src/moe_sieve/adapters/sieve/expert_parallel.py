"""Sieve LoRA on experts that transformers' expert-parallel (EP) engine shards: each hot expert's factors live
on the rank that owns the expert, and only there.

``from_pretrained(distributed_config=DistributedConfig(ep_size=N, fsdp_size=M))`` keeps each experts module's
weights as DTensors on the ``(efsdp, ep)`` mesh, EP rank ``p`` holding the contiguous block of experts
``[p * E/ep, (p + 1) * E/ep)`` and ``num_experts = E/ep``; inside the EP forward the experts see *local* ids
(``transformers/distributed/expert_parallel.py`` ``MoEParamShard``, ``AllToAllEP._dispatch_tokens``).

So a layer's factors are built once for all hot experts (the same random draws as one process, so an EP run
starts from the one-process adapter), then each rank keeps the slots of the hot experts in its block, renumbered
to local ids, as plain tensors tagged with :class:`~moe_sieve.adapters.factors.ExpertSlots` (ranks own
different numbers of hot experts, which DTensor's even sharding cannot describe). Their gradient is reduced as
the engine reduces the base experts' (``distributed/fsdp.py``: summed over the ``efsdp`` copies and divided by
the data-parallel size, since the all-to-all already sums every rank's tokens into the owner's gradient):
:func:`reduce_expert_gradient`; checkpoints gather them by slot into the one-process tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..factors import EP_SLOTS, ExpertSlots, ep_slots
from .experts import ExpertLoRA

__all__ = ["ExpertShard", "expert_shard", "is_expert_parallel", "reduce_expert_gradient", "shard_expert_lora"]


@dataclass(frozen=True)
class ExpertShard:
    """Where one experts module's block lives: the experts' mesh, this rank's EP coordinate and block."""

    mesh: Any  # DeviceMesh with an "ep" dimension
    ep_rank: int
    num_local: int

    @property
    def first_expert(self) -> int:
        return self.ep_rank * self.num_local

    def groups(self) -> tuple[Any, Any]:
        """The EP process group and, when the experts have FSDP copies, the efsdp group."""
        names = self.mesh.mesh_dim_names or ()
        efsdp = self.mesh["efsdp"] if "efsdp" in names and self.mesh["efsdp"].size() > 1 else None
        return self.mesh["ep"].get_group(), None if efsdp is None else efsdp.get_group()


def expert_shard(experts: nn.Module) -> ExpertShard | None:
    """The EP layout of a fused experts module, or None when it is not expert-parallel."""
    if not getattr(experts, "_is_expert_parallel", False):
        return None
    weight = getattr(experts, "down_proj", None)
    if not isinstance(weight, DTensor):
        return None
    mesh = weight.device_mesh
    names = mesh.mesh_dim_names or ()
    if "ep" not in names:
        raise ValueError(f"{type(experts).__name__}: expert weights on a mesh without an 'ep' dimension ({names})")
    return ExpertShard(mesh, mesh["ep"].get_local_rank(), int(experts.num_experts))


def is_expert_parallel(model: nn.Module) -> bool:
    return any(expert_shard(m) is not None for m in model.modules() if hasattr(m, "_is_expert_parallel"))


def shard_expert_lora(full: ExpertLoRA, shard: ExpertShard) -> ExpertLoRA:
    """The factors of ``full`` (all hot experts, global ids) that this rank owns, as a local-id ExpertLoRA."""
    ids = full.selected_experts
    lo, hi = shard.first_expert, shard.first_expert + shard.num_local
    slots = [i for i, e in enumerate(ids) if lo <= e < hi]
    first, stop = (slots[0], slots[-1] + 1) if slots else (sum(e < lo for e in ids),) * 2
    with torch.random.fork_rng(devices=[]):  # its own init is overwritten: draw nothing from the run's stream
        local = full.with_experts([ids[i] - lo for i in slots], shard.num_local)
    ep_group, efsdp_group = shard.groups()
    for name, param in full.named_parameters():
        new = nn.Parameter(param.detach()[first:stop].clone(), requires_grad=param.requires_grad)
        setattr(new, EP_SLOTS, ExpertSlots(first, stop, tuple(param.shape), ep_group, efsdp_group))
        setattr(local, name, new)
    local.first_expert = lo
    return local


def reduce_expert_gradient(param: nn.Parameter, dp_size: int) -> None:
    """Sum an EP factor's gradient over its efsdp copies and divide by the data-parallel size, as transformers'
    engine reduces the base experts' gradients (``set_gradient_divide_factor(dp_size)``)."""
    import torch.distributed as dist

    slots = ep_slots(param)
    if param.grad is None or slots is None:
        return
    if slots.efsdp_group is not None:
        dist.all_reduce(param.grad, group=slots.efsdp_group)
    param.grad.div_(dp_size)
