"""Adapter sizes without weights: the config and meta-device model every method's plan builds on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ADAMW_STATE_BYTES = 8  # exp_avg + exp_avg_sq in fp32


def load_config(model: str, trust_remote_code: bool = False) -> Any:
    """A config from a ``config.json`` path, a model directory or a hub id (offline: a ValueError naming
    ``--model CONFIG.json``)."""
    from transformers import AutoConfig

    from ..modeling import resolve_model_path

    path = Path(model)
    if path.is_file():
        try:
            return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (ValueError, KeyError, OSError) as err:
            raise ValueError(f"{path}: not a usable config.json ({err})") from err
    resolved = resolve_model_path(model)
    try:
        return AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except OSError as err:
        if Path(resolved).exists():
            raise
        # offline, or not on the hub: transformers' message names neither the argument nor the way around it
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"--model {model}: cannot load its config from the hub ({reason}); plan needs only the config: "
            f"download its config.json and pass --model CONFIG.json"
        ) from err


def meta_model(config: Any, trust_remote_code: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
