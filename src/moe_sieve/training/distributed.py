"""What ``train`` does differently under accelerate/torchrun: the process group, rank-0 decisions shared with all
ranks, and the profile summed across processes."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..profiling import Profile, profile_model


def dist_state():
    """Distributed state when launched by accelerate/torchrun (initialises the process group)."""
    from accelerate import PartialState

    # On a machine without CUDA, accelerate only forms a multi-process (gloo) group when asked for CPU.
    return PartialState(cpu=not torch.cuda.is_available())


def broadcast_object(value: Any, state: Any) -> Any:
    if state.num_processes <= 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def profile_distributed(model: Any, batches: list, num_examples: int, state: Any) -> Profile:
    """Each process profiles its shard of the batches; summing the per-example counts across processes
    gives exactly the single-process profile."""
    shard = batches[state.process_index :: state.num_processes]
    profile = profile_model(model, shard, num_examples, progress=state.is_main_process)
    if getattr(model, "is_distributed_loading_by_transformers", False):
        # sharded at load time (expert parallelism): every forward is a collective (FSDP all-gathers, the
        # all-to-all), so a process with one batch fewer runs one more forward, not counted
        for _ in range(-(-len(batches) // state.num_processes) - len(shard)):
            _uncounted_forward(model, batches[0])
    if state.num_processes > 1:
        import torch.distributed as dist

        for name in ("example_counts_NLE", "example_mass_NLE", "example_tokens_N"):
            tensor = torch.from_numpy(np.ascontiguousarray(getattr(profile, name)))
            tensor = tensor.to(torch.float64 if tensor.is_floating_point() else torch.int64)
            dist.all_reduce(tensor)
            setattr(profile, name, tensor.numpy().astype(getattr(profile, name).dtype))
        profile.counts_LE = profile.example_counts_NLE.sum(0, dtype=np.int64)
        profile.mass_LE = profile.example_mass_NLE.sum(0, dtype=np.float64).astype(np.float32)
    return profile


def _uncounted_forward(model: Any, batch: Any) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    finally:
        model.train(was_training)
