"""The adapter's trainable factors on disk: one safetensors file by module path, written and read the same way
by every adapter method (imports nothing of any method, so each can use it)."""

from __future__ import annotations

import os

import torch
from torch import nn

from .._io import atomic_write_safetensors, read_safetensors

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def gather_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable factors as full CPU tensors. FSDP2 shards them (DTensor): gathering them is a collective,
    so under FSDP every process must call this, and the main one writes the result."""
    from torch.distributed.tensor import DTensor

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().contiguous()
        for name, p in trainable_parameters(model).items()
    }


def save_factors(model: nn.Module, path: str | os.PathLike, factors: dict[str, torch.Tensor] | None = None) -> None:
    """Write the trainable LoRA factors (by module path) to one safetensors file, atomically; ``factors`` are
    the ones :func:`gather_factors` gathered from a sharded model."""
    tensors = gather_factors(model) if factors is None else factors
    atomic_write_safetensors(path, tensors, {"format": "moe-sieve-adapter"})


def load_factors(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy saved factors into an adapted model (sharded by FSDP2 or not); every trainable tensor must be
    present with its shape."""
    from torch.distributed.tensor import DTensor, distribute_tensor

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
            if tensors[name].shape != param.shape:
                raise ValueError(
                    f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(param.shape)}"
                )
            if isinstance(param, DTensor):  # FSDP2: each process keeps its own shard of the saved tensor
                param.copy_(distribute_tensor(tensors[name], param.device_mesh, param.placements, src_data_rank=None))
            else:
                param.copy_(tensors[name])
