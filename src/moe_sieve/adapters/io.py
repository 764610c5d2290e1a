"""Adapter artifact (``adapter.safetensors`` + ``adapter_config.json``), loading and merging."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._io import atomic_dir, atomic_write_safetensors, read_safetensors
from .._version import __version__
from ..arch import MoEShape, config_fingerprint, find_moe_layers
from ..modeling import ModelSpec, load_model
from ..profiling.artifact import ProfileMismatchError, warn_other_model
from .sieve.config import SieveLoraConfig
from .sieve.experts import restore_experts_implementation
from .sieve.layer import LoraLinear, LoraWeightDelta
from .sieve.model import SieveState, apply_sieve_lora, trainable_parameters
from .tokens import merge_token_rows

ADAPTER_FORMAT_VERSION = 1
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_REQUIRED_ADAPTER_KEYS = ("base_model", "lora", "experts", "shape")


def _state(model: nn.Module) -> SieveState:
    state = getattr(model, "moe_sieve", None)
    if state is None:
        raise ValueError("this model has no Sieve LoRA adapters (call apply_sieve_lora or load_sieve_adapter)")
    return state


class UnsupportedExportError(NotImplementedError):
    """The adapter has no exact form in the requested export format (one ``Error:`` line in the CLI)."""


def lora_state(model: nn.Module, target: str) -> SieveState:
    """The Sieve LoRA state of ``model`` for an export to ``target`` (PEFT, vllm, sglang); adapters that are
    no LoRA (Routed-PEFT, routers trained in full) are refused here, by every LoRA export alike."""
    state = _state(model)
    if not isinstance(state, SieveState):
        raise UnsupportedExportError(
            f"a Routed-PEFT adapter (method routed) has no {target} form: its adapters are functions of the FFN "
            "input that a LoRA on existing weights cannot express; serve it with moe-sieve (eval --adapter)"
        )
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


def load_sieve_adapter(model: nn.Module, path: str | os.PathLike) -> SieveState:
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
    if config["lora"].get("method") == "routed":
        from .routed.model import load_routed_adapter

        return load_routed_adapter(model, path, config)
    lora_config = SieveLoraConfig.from_json(config["lora"])
    experts = {int(layer): ids for layer, ids in config["experts"].items()}
    state = apply_sieve_lora(model, experts, lora_config)
    load_factors(model, path / ADAPTER_WEIGHTS)
    return state


def merge_sieve_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update (and any trained token rows) into the base weights and remove the adapters, in place.

    The result is a plain transformers model: ``save_pretrained`` writes a checkpoint that loads with
    ``AutoModelForCausalLM.from_pretrained`` without moe-sieve.
    """
    state = _state(model)
    if not isinstance(state, SieveState):
        from .routed.model import NOT_MERGEABLE

        raise ValueError(NOT_MERGEABLE)
    bad = [name for name, p in trainable_parameters(model).items() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(
            f"the adapter has non-finite (NaN/inf) values in {len(bad)} tensors (e.g. {bad[0]}); refusing to merge "
            "it into the base weights"
        )
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLinear):
                parent_name, _, leaf = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, leaf, module.merged())
        merge_token_rows(model)
        for module in list(model.modules()):
            if parametrize.is_parametrized(module, "weight") and any(
                isinstance(p, LoraWeightDelta) for p in module.parametrizations.weight
            ):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        for layer in find_moe_layers(model):
            lora = getattr(layer.experts, "sieve_lora", None)
            if lora is None:
                continue
            ids = lora.expert_ids
            for param_name, delta in lora.delta_weights().items():
                weight = getattr(layer.experts, param_name)
                acc = torch.promote_types(weight.dtype, torch.float32)  # float64 stays float64
                weight[ids] = (weight[ids].to(acc) + delta.to(acc)).to(weight.dtype)
            del layer.experts.sieve_lora
    if state.previous_experts_implementation is not None:
        restore_experts_implementation(model, state.previous_experts_implementation)
    for param in model.parameters():
        param.requires_grad_(False)
    del model.moe_sieve
    return model


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
