"""The adapter's trainable factors on disk: one safetensors file by module path, written and read the same way
by every adapter method (imports nothing of any method, so each can use it)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .._io import atomic_write_safetensors, read_safetensors

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
EP_SLOTS = "_moe_sieve_ep_slots"  # on an expert-parallel factor: the (first, stop) slots of its full tensor it holds


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@dataclass(frozen=True)
class ExpertSlots:
    """On an expert-parallel factor (a plain tensor of this rank's hot experts): which slots of the full
    one-process tensor it holds, that tensor's shape, and the process groups it is gathered and reduced over."""

    first: int
    stop: int
    full_shape: tuple[int, ...]
    ep_group: Any
    efsdp_group: Any = None


def ep_slots(param: Any) -> ExpertSlots | None:
    return getattr(param, EP_SLOTS, None)


def full_numel(param: torch.Tensor) -> int:
    """Elements of the one-process tensor: an expert-parallel factor counts all ranks' experts."""
    slots = ep_slots(param)
    return math.prod(slots.full_shape) if slots is not None else param.numel()


def _gather_ep_factor(tensor: torch.Tensor, slots: ExpertSlots) -> torch.Tensor:
    """Every EP rank's slots in rank order: a collective over the EP group (the efsdp copies are identical, each
    gathers in its own group)."""
    import torch.distributed as dist

    pieces: list[Any] = [None] * dist.get_world_size(slots.ep_group)
    dist.all_gather_object(pieces, tensor.detach().cpu(), group=slots.ep_group)
    full = torch.cat(pieces, dim=0)
    if tuple(full.shape) != slots.full_shape:
        raise RuntimeError(f"expert-parallel factor gathered to {tuple(full.shape)}, expected {slots.full_shape}")
    return full


def full_tensor(tensor: torch.Tensor, param: Any) -> torch.Tensor:
    """``tensor`` (``param`` itself, or a state tensor shaped like it such as an AdamW moment) as the full
    one-process tensor: expert-parallel slots and FSDP2 shards are gathered (a collective: every process calls
    it), anything else is returned as it is."""
    slots = ep_slots(param)
    if slots is not None:
        return _gather_ep_factor(tensor, slots)
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_part(full: torch.Tensor, param: Any) -> torch.Tensor:
    """The inverse of :func:`full_tensor`: this process's part of a saved full tensor for ``param`` (its
    expert-parallel slots, its FSDP2 shard, or the whole tensor), on ``param``'s device."""
    slots = ep_slots(param)
    if slots is not None:
        return full[slots.first : slots.stop].to(param.device).contiguous()
    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return full.to(param.device)


def gather_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable factors as full CPU tensors. FSDP2 shards them (DTensor) and expert parallelism spreads the
    expert factors over ranks: gathering them is a collective, so there every process must call this, and the main
    one writes the result."""
    return {name: full_tensor(p, p).detach().cpu().contiguous() for name, p in trainable_parameters(model).items()}


def save_factors(model: nn.Module, path: str | os.PathLike, factors: dict[str, torch.Tensor] | None = None) -> None:
    """Write the trainable LoRA factors (by module path) to one safetensors file, atomically; ``factors`` are
    the ones :func:`gather_factors` gathered from a sharded model."""
    tensors = gather_factors(model) if factors is None else factors
    atomic_write_safetensors(path, tensors, {"format": "moe-sieve-adapter"})


def load_factors(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy saved factors into an adapted model (sharded by FSDP2 or not); every trainable tensor must be
    present with its shape."""
    tensors = read_safetensors(path)
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # eval, export and merge alike: such an adapter never loads
        raise ValueError(
            f"{path}: non-finite (NaN/inf) values in {len(bad)} tensors (e.g. {bad[0]}); the adapter is damaged "
            "or its training diverged"
        )
    params = trainable_parameters(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            slots = ep_slots(param)
            shape = slots.full_shape if slots is not None else tuple(param.shape)
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
            param.copy_(local_part(tensors[name], param))  # EP: this rank's slots; FSDP2: this process's shard
