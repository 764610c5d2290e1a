"""Loading Hugging Face MoE causal LMs the way every moe-sieve stage does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA and fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


@dataclass
class ModelSpec:
    """How to load a model: the same options for every command."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False
    experts_implementation: str | None = None
    revision: str | None = None


def resolve_model_path(model: str) -> str:
    """Built-in aliases become local paths; anything else is a hub id or a directory."""
    from .demo import DEFAULT_MODEL_ALIAS, default_model_path
    from .tiny import TINY_MODEL_ALIASES, ensure_tiny_model

    if model in TINY_MODEL_ALIASES:
        return str(ensure_tiny_model(model))
    if model == DEFAULT_MODEL_ALIAS:
        path = default_model_path()
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"the embedded model is missing from {path}; rebuild it with scripts/pretrain_default.py"
            )
        return str(path)
    return model


def load_model(spec: ModelSpec) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` with dtype/device handling; remote code only on request."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(spec.device)
    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(spec.dtype, device),
        "trust_remote_code": spec.trust_remote_code,
    }
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.experts_implementation:
        kwargs["experts_implementation"] = spec.experts_implementation
    if spec.device_map:
        kwargs["device_map"] = spec.device_map
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(spec.model), **kwargs)
    if not spec.device_map:
        model.to(device)
    return model


def load_tokenizer(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        resolve_model_path(spec.model), trust_remote_code=spec.trust_remote_code, revision=spec.revision
    )


def input_device(model: Any) -> torch.device:
    """Where the token ids must go (the embedding's device under ``device_map``)."""
    embeddings = model.get_input_embeddings()
    return embeddings.weight.device if embeddings is not None else next(model.parameters()).device
