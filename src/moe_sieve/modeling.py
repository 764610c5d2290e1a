"""Loading Hugging Face MoE causal LMs the way every moe-sieve stage does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL_ALIAS = "moe-sieve-default"


def default_model_path() -> Path:
    """The pretrained checkpoint shipped inside the package (see scripts/pretrain_default.py)."""
    return Path(__file__).resolve().parent / "default_model"


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
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {device!r}: not a device ({err}); use auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"--device {device!r}: unsupported device type; use auto, cpu, cuda or cuda:N")
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
    ep_size: int = 1  # > 1: transformers' expert-parallel engine over every process (docs/distributed.md)


def resolve_model_path(model: str) -> str:
    """Built-in aliases become local paths; anything else is a hub id or a directory."""
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
    local = Path(model).expanduser()
    if local.exists():
        if not local.is_dir():
            raise NotADirectoryError(f"--model {model}: is a file, expected a model directory (or a hub id)")
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"--model {model}: {local / 'config.json'} not found; not a model directory")
        return str(local)
    if model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1 or model.endswith("/"):
        raise FileNotFoundError(f"--model {model}: no such model directory")
    return model


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What from_pretrained raises for a missing, offline or broken checkpoint."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def distributed_config(ep_size: int) -> Any:
    """``DistributedConfig(ep_size=N, fsdp_size=world)``: experts in blocks of E/N per rank, FSDP2 over every
    process. transformers releases without the EP engine (5.17 has no ``ep_size``) are refused by name."""
    import torch.distributed as dist
    import transformers

    try:
        from transformers.distributed import DistributedConfig

        DistributedConfig(ep_size=1)
    except (ImportError, TypeError) as err:
        raise ValueError(
            f"--ep-size {ep_size}: transformers {transformers.__version__} has no expert-parallel engine "
            "(DistributedConfig(ep_size=...), transformers >= 5.2x); upgrade transformers or train with --fsdp"
        ) from err
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return DistributedConfig(ep_size=ep_size, fsdp_size=world)  # the process count: training/sharding.py checks it


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
    if spec.ep_size > 1:
        kwargs["distributed_config"] = distributed_config(spec.ep_size)
    path = resolve_model_path(spec.model)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except _hub_errors() as err:
        raise ValueError(f"--model {spec.model}: cannot load the model ({type(err).__name__}: {err})") from err
    if spec.ep_size > 1:
        return model  # placed and sharded by the engine; `.to()` on its DTensors would fail
    if not spec.device_map:
        model.to(device)
    return model


class TokenizerMissingError(ValueError):
    """The model directory has no usable tokenizer."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tekken.json")
MIN_VOCAB = 4  # special tokens alone: an empty tokenizer that transformers built from nothing


def load_tokenizer(spec: ModelSpec) -> Any:
    """``AutoTokenizer.from_pretrained``; a missing or empty tokenizer is an error naming the model directory
    (transformers would otherwise build an empty one, and every example would "tokenize to no tokens")."""
    from transformers import AutoTokenizer

    path = resolve_model_path(spec.model)
    local = Path(path)
    if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise TokenizerMissingError(
            f"{local}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the model's tokenizer there "
            "(tokenizer.save_pretrained)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=spec.trust_remote_code, revision=spec.revision
        )
    except _hub_errors() as err:
        raise TokenizerMissingError(f"{path}: cannot load the tokenizer ({type(err).__name__}: {err})") from err
    if len(tokenizer) < MIN_VOCAB or not tokenizer("a b", add_special_tokens=False)["input_ids"]:
        raise TokenizerMissingError(
            f"{path}: the tokenizer is empty ({len(tokenizer)} tokens, and text tokenizes to nothing); "
            "save the model's real tokenizer there"
        )
    return tokenizer


def input_device(model: Any) -> torch.device:
    """Where the token ids must go (the embedding's device under ``device_map``)."""
    embeddings = model.get_input_embeddings()
    return embeddings.weight.device if embeddings is not None else next(model.parameters()).device
