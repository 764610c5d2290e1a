"""Checks for sharded (FSDP) training that would otherwise fail silently."""

from __future__ import annotations

from typing import Any

FSDP_ON_CPU = (
    "--fsdp on CPU: accelerate (1.15) turns a gloo/CPU process group into FSDP only for GPU-type devices "
    "(AcceleratorState keeps DistributedType.MULTI_CPU and drops the FSDP plugin), so Trainer would silently "
    "train plain DDP; run FSDP on GPUs (scripts/fsdp_gpu.sh) or drop --fsdp for DDP on CPU"
)


def check_fsdp(config: Any, device: Any) -> None:
    """Refuse ``--fsdp`` where it would not shard, and with options that change the parameter set mid-run."""
    if not config.fsdp:
        return
    if device.type == "cpu":
        raise ValueError(FSDP_ON_CPU)
    if config.reselect != "off":
        raise ValueError("--reselect grow cannot run under --fsdp: FSDP shards the parameter set once, at wrap time")
