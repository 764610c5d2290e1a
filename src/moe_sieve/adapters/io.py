"""Adapter artifact (``adapter.safetensors`` + ``adapter_config.json``), loading and merging."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_dir
from .._version import __version__
from ..arch import MoEShape, config_fingerprint, find_moe_layers
from ..modeling import ModelSpec, load_model
from ..profiling.artifact import ProfileMismatchError, warn_other_model
from .factors import ADAPTER_CONFIG, ADAPTER_WEIGHTS, gather_factors, load_factors, save_factors, trainable_parameters
from .methods import AdapterState, adapter_methods, find_adapter_method, method_of

ADAPTER_FORMAT_VERSION = 1
_REQUIRED_ADAPTER_KEYS = ("base_model", "lora", "experts", "shape")


__all__ = [  # the factor helpers live in factors.py (every method's); io re-exports them for its callers
    "ADAPTER_CONFIG",
    "ADAPTER_FORMAT_VERSION",
    "ADAPTER_WEIGHTS",
    "UnsupportedExportError",
    "adapter_config",
    "gather_factors",
    "load_adapted_model",
    "load_factors",
    "load_sieve_adapter",
    "lora_state",
    "merge_sieve_lora",
    "read_adapter_config",
    "save_factors",
    "save_sieve_adapter",
    "trainable_parameters",
]


def _state(model: nn.Module) -> AdapterState:
    state = getattr(model, "moe_sieve", None)
    if state is None:
        raise ValueError("this model has no Sieve LoRA adapters (call apply_sieve_lora or load_sieve_adapter)")
    return state


class UnsupportedExportError(NotImplementedError):
    """The adapter has no exact form in the requested export format (one ``Error:`` line in the CLI)."""


def lora_state(model: nn.Module, target: str) -> Any:
    """The Sieve LoRA state of ``model`` for an export to ``target`` (PEFT, vllm, sglang); adapters that are
    no LoRA (Routed-PEFT, routers trained in full) are refused here, by every LoRA export alike."""
    state = _state(model)
    method = method_of(state)
    if not method.lora_export:
        raise UnsupportedExportError(method.no_lora_export.format(target=target))
    if state.config.router == "full":
        raise UnsupportedExportError(
            f"the routers were fully fine-tuned (--router full), which is no LoRA, so there is no {target} form; "
            "export --format merged instead"
        )
    return state


def adapter_config(model: nn.Module, base_model: str | None = None, extra: dict | None = None) -> dict[str, Any]:
    state = _state(model)
    return {
        "format": "moe-sieve-adapter",
        "format_version": ADAPTER_FORMAT_VERSION,
        "tool_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": {
            "id": base_model or getattr(model.config, "_name_or_path", None),
            "class": type(model).__name__,
            "model_type": getattr(model.config, "model_type", None),
            "config_fingerprint": state.base_config_fingerprint,
        },
        "lora": state.config.to_json(),
        "experts": {str(layer): ids for layer, ids in sorted(state.experts.items())},
        "shape": {
            "layer_ids": list(state.shape.layer_ids),
            "num_experts": state.shape.num_experts,
            "top_k": state.shape.top_k,
        },
        "trainable_params": state.trainable_params,
        "params_by_group": state.params_by_group(),
        **(extra or {}),
    }


def save_sieve_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    base_model: str | None = None,
    extra: dict | None = None,
    factors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write only the LoRA factors (fp32 on disk if trained in fp32) and the config needed to rebuild them
    (``factors``: gathered by :func:`gather_factors` from an FSDP-sharded model)."""
    config = adapter_config(model, base_model, extra)
    with atomic_dir(path, overwrite) as tmp:
        save_factors(model, tmp / ADAPTER_WEIGHTS, factors)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(path)


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    config_path = path / ADAPTER_CONFIG
    if not config_path.exists() or not (path / ADAPTER_WEIGHTS).exists():
        raise FileNotFoundError(f"{path} is not a moe-sieve adapter directory ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: invalid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    if config.get("format") != "moe-sieve-adapter" or config.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise ValueError(f"{config_path}: not a moe-sieve adapter of format version {ADAPTER_FORMAT_VERSION}")
    missing = [key for key in _REQUIRED_ADAPTER_KEYS if key not in config]
    shape = config.get("shape")
    missing += [
        f"shape.{key}"
        for key in ("layer_ids", "num_experts", "top_k")
        if not isinstance(shape, dict) or key not in shape
    ]
    base = config.get("base_model")
    if not isinstance(base, dict) or "config_fingerprint" not in base:
        missing.append("base_model.config_fingerprint")
    if missing:
        raise ValueError(f"{config_path}: missing keys {sorted(set(missing))}")
    if not isinstance(config["experts"], dict) or not isinstance(config["lora"], dict):
        raise ValueError(f"{config_path}: 'experts' and 'lora' must be JSON objects")
    return config


def load_sieve_adapter(model: nn.Module, path: str | os.PathLike) -> AdapterState:
    """Attach the saved adapter to a fresh base ``model`` and restore its factors exactly."""
    path = Path(path)
    config = read_adapter_config(path)
    shape = MoEShape.of(find_moe_layers(model))
    saved = config["shape"]
    if (list(shape.layer_ids), shape.num_experts, shape.top_k) != (
        saved["layer_ids"],
        saved["num_experts"],
        saved["top_k"],
    ):
        raise ProfileMismatchError(
            f"{path}: adapter made for MoE layers {saved['layer_ids']} x {saved['num_experts']} experts "
            f"(top-{saved['top_k']}), the model has {list(shape.layer_ids)} x {shape.num_experts} (top-{shape.top_k})"
        )
    trained_on = config["base_model"]["config_fingerprint"]
    warn_other_model(f"the adapter {path}", trained_on, config_fingerprint(model.config))
    method = find_adapter_method(config["lora"].get("method"))
    if method is None:
        raise ValueError(
            f"{path / ADAPTER_CONFIG}: lora.method {config['lora']['method']!r} is no adapter method this moe-sieve "
            f"knows ({', '.join(adapter_methods())})"
        )
    return method.load(model, path, config)


def merge_sieve_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update (and any trained token rows) into the base weights and remove the adapters, in place.

    The result is a plain transformers model: ``save_pretrained`` writes a checkpoint that loads with
    ``AutoModelForCausalLM.from_pretrained`` without moe-sieve.
    """
    state = _state(model)
    method = method_of(state)
    if method.merge is None:
        raise ValueError(method.not_mergeable)
    return method.merge(model)


def load_adapted_model(
    adapter: str | os.PathLike,
    model: str | None = None,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    device: str = "cpu",
) -> tuple[nn.Module, ModelSpec]:
    """The base model named by ``model`` or else by the adapter's config, with the adapter loaded; on CPU by
    default (merging and exporting need no accelerator). Returns the model and the spec it was loaded with."""
    base = model or read_adapter_config(adapter)["base_model"]["id"]
    if not base:
        raise ValueError(f"{adapter}: the adapter names no base model; pass --model")
    spec = ModelSpec(model=base, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    net = load_model(spec)
    load_sieve_adapter(net, adapter)
    return net, spec
