"""Sharded (FSDP2) training, on GPUs and on CPU processes over gloo, and the checks that keep it from
silently running something else.

accelerate 1.15 turns a process group into FSDP only for GPU-type devices: ``AcceleratorState.__init__``
(accelerate/state.py, the ``elif self.distributed_type in [DistributedType.MULTI_GPU, ...]`` branch, lines
~986-1015) sets ``distributed_type = FSDP`` and keeps the plugin, while a gloo/CPU group stays ``MULTI_CPU``
and the plugin is dropped, so transformers' Trainer would train plain DDP. torch's ``fully_shard`` itself
works on a CPU device mesh, and accelerate's FSDP2 path (``fsdp2_prepare_model``) makes no CUDA call when
mixed precision, CPU offload and ``cpu_ram_efficient_loading`` are off, so :func:`enable_cpu_fsdp` hands the
plugin to the state after the Accelerator is built; :func:`check_sharded` then proves that the model really is
sharded (every trainable parameter a DTensor), and fails loudly otherwise.
"""

from __future__ import annotations

import os
from typing import Any

FSDP_NEEDS_PROCESSES = (
    "--fsdp on CPU needs two or more processes over gloo (accelerate launch --num_processes N, or torchrun "
    "--nproc_per_node N); a single process has nothing to shard over"
)
RAM_EFFICIENT_ON_CPU = (
    "accelerate launch --use_fsdp on CPU: add --fsdp_cpu_ram_efficient_loading false (its default, true, moves "
    "the model to 'meta' and broadcasts it, not supported here), or pass --fsdp to train"
)
FSDP1_REFUSED = (
    "FSDP1 (fsdp_version 1) is not supported: moe-sieve shards with FSDP2 (torch fully_shard), whose DTensor "
    "shards it gathers into adapter-only checkpoints; use accelerate launch --fsdp_version 2 (or --fsdp alone)"
)


def check_fsdp(config: Any, device: Any) -> None:
    """Refuse ``--fsdp`` (or ``accelerate launch --use_fsdp``) where it cannot shard, and with options that
    change the parameter set mid-run."""
    if not (config.fsdp or _fsdp_env()):
        return
    if config.reselect != "off":
        raise ValueError("--reselect grow cannot run under --fsdp: FSDP shards the parameter set once, at wrap time")
    if device.type == "cpu":
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            raise ValueError(FSDP_NEEDS_PROCESSES)
        if "offload" in (config.fsdp or "").split():
            raise ValueError("--fsdp offload on CPU: the parameters already live in CPU memory; drop 'offload'")
        if not config.fsdp and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
            raise ValueError(RAM_EFFICIENT_ON_CPU)


def _fsdp_env() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_requested(args: Any) -> bool:
    """FSDP asked for by ``--fsdp`` (TrainingArguments) or by ``accelerate launch --use_fsdp`` (environment)."""
    return args.fsdp_plugin_args is not None or _fsdp_env()


def enable_cpu_fsdp(trainer: Any) -> None:
    """Make a gloo/CPU Trainer shard with FSDP2, where accelerate would keep ``MULTI_CPU`` (see the module doc),
    and refuse FSDP1 everywhere (its flat shards are not DTensors, so adapter-only checkpoints could not gather them).

    Called right after ``Trainer.create_accelerator_and_postprocess``; a no-op unless FSDP was requested.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import OffloadPolicy

    if not fsdp_requested(trainer.args):
        return
    state = trainer.accelerator.state
    if state.distributed_type == DistributedType.FSDP:  # GPUs: accelerate already did it
        if state.fsdp_plugin.fsdp_version != 2:
            raise ValueError(FSDP1_REFUSED)
        return
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ValueError(
            f"FSDP was requested but accelerate runs {state.distributed_type.value}; {FSDP_NEEDS_PROCESSES}"
        )
    plugin = getattr(state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin(
        **(trainer.args.fsdp_plugin_args or {})  # empty: read from accelerate launch's FSDP_* environment
    )
    if plugin.fsdp_version != 2:
        raise ValueError(FSDP1_REFUSED)
    if type(plugin.cpu_offload) is not OffloadPolicy:  # a CPUOffloadPolicy
        raise ValueError("--fsdp offload on CPU: the parameters already live in CPU memory; drop 'offload'")
    if plugin.cpu_ram_efficient_loading:
        raise ValueError(RAM_EFFICIENT_ON_CPU)
    if state.mixed_precision != "no":
        raise ValueError(f"--fsdp on CPU trains in the model's dtype: no mixed precision ({state.mixed_precision})")
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def check_sharded(model: Any) -> int:
    """Fail unless FSDP2 sharded ``model``: every trainable parameter must be a DTensor. Returns their count."""
    from torch.distributed.tensor import DTensor

    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    plain = [name for name, p in trainable if not isinstance(p, DTensor)]
    if not trainable or plain:
        raise RuntimeError(
            f"FSDP was requested but {len(plain)} of {len(trainable)} trainable parameters are not sharded "
            f"(e.g. {plain[:3]}); refusing to train unsharded"
        )
    return len(trainable)


def check_expert_parallel(config: Any, state: Any) -> None:
    """Refuse ``--ep-size`` where transformers' engine or moe-sieve's EP adapters cannot run it."""
    if config.method != "sieve":
        raise ValueError(
            f"--ep-size {config.ep_size}: only --method sieve places its expert adapters on the owning ranks; "
            f"--method {config.method} would need its own expert-parallel layout"
        )
    if "router" in config.targets and config.router == "lora":
        raise ValueError(
            f"--ep-size {config.ep_size}: router LoRA is a parametrization of the router weight, which the engine "
            "has already FSDP-sharded; pass --router full (train the router weight, reduced by FSDP2) or "
            "--router freeze"
        )
    if config.train_tokens != "none":
        raise ValueError(
            f"--ep-size {config.ep_size}: --train-tokens adds rows to the embedding and output head, which the "
            "engine has already FSDP-sharded; train them without --ep-size"
        )
    if state.num_processes < 2 or state.num_processes % config.ep_size:
        raise ValueError(
            f"--ep-size {config.ep_size}: launch a multiple of {config.ep_size} processes (torchrun "
            f"--nproc_per_node {config.ep_size}); this run has {state.num_processes}"
        )


def reshard(model: Any) -> None:
    """Put FSDP2's sharded parameters back on every module. The last layers keep their gathered parameters after a
    forward (``reshard_after_forward=False``, e.g. the profiling pass), and freezing those instead of the shards
    would leave the shards trainable (transformers' Trainer reshards before it builds the optimizer)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def check_experts_sharded(model: Any, ep_size: int) -> None:
    """After ``from_pretrained(distributed_config=...)``: the engine shards experts only where the model declares
    a ``base_model_ep_plan``; without one it would run FSDP alone, silently not expert-parallel."""
    from ..adapters.sieve.expert_parallel import is_expert_parallel

    if not is_expert_parallel(model):
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise ValueError(
            f"--ep-size {ep_size}: transformers' engine did not shard the experts of {kind} (its config declares "
            "no base_model_ep_plan for fused experts); train it with --fsdp instead"
        )
