"""Step 1 of the recipe: one gradient-free forward pass that counts routed tokens per layer and expert."""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..arch import MoEShape, config_fingerprint, find_moe_layers, get_arch
from ..modeling import ModelSpec, input_device, load_model, load_tokenizer
from .artifact import Profile
from .recorder import RoutingRecorder


@dataclass
class ProfileConfig:
    """Options of ``moe-sieve profile`` (also usable from Python)."""

    model: str
    data: str
    split: str | None = None
    max_examples: int | None = None
    subsample: float | None = None
    seed: int = 0
    batch_size: int = 8
    max_length: int = 1024
    count_tokens: str = "all"
    spider_dir: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False
    experts_implementation: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_length < 1:
            raise ValueError(f"--max-length must be >= 1, got {self.max_length}")
        if self.count_tokens not in ("all", "prompt", "completion"):
            raise ValueError(f"--count-tokens must be all, prompt or completion, got {self.count_tokens!r}")

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec(
            model=self.model,
            dtype=self.dtype,
            device=self.device,
            device_map=self.device_map,
            trust_remote_code=self.trust_remote_code,
            experts_implementation=self.experts_implementation,
        )


def _forward_kwargs(model: Any) -> dict[str, Any]:
    """Skip work the counts do not need: the KV cache and all but one position of the LM head."""
    params = inspect.signature(model.forward).parameters
    # Forwards that take ``use_cache`` only through ``**kwargs`` (GraniteMoeHybrid) still honour it.
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {"use_cache": False} if "use_cache" in params or takes_kwargs else {}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return kwargs


def _shared_equivalents(layers: Sequence[Any]) -> float:
    """Always-on shared capacity per layer in units of one routed expert (Qwen1.5-MoE: 4, DeepSeek-MoE: 2),
    from parameter counts, so coverage can count shared experts alongside routed ones (paper Fig. 2)."""
    ratios = []
    for layer in layers:
        shared = sum(p.numel() for module in layer.shared.values() for p in module.parameters())
        per_expert = sum(p.numel() for p in layer.experts.parameters()) / max(layer.num_experts, 1)
        ratios.append(shared / per_expert if per_expert else 0.0)
    return round(float(np.mean(ratios)), 1) if ratios else 0.0


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]profiling"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("batches"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def profile_model(
    model: Any,
    batches: Sequence[Any],
    num_examples: int,
    *,
    progress: bool = True,
) -> Profile:
    """Run ``model`` over ``batches`` (objects with ``input_ids``, ``attention_mask``, ``count_mask``
    ``[B, T]`` and ``example_index [B]``) and return the routing profile (without data metadata).

    Only tokens whose ``count_mask`` is set are counted, so padding never counts and batching does not
    change the result.
    """
    spec = get_arch(model)
    layers = find_moe_layers(model, spec)
    shape = MoEShape.of(layers)
    num_layers, num_experts = len(layers), shape.num_experts
    example_counts = np.zeros((num_examples, num_layers, num_experts), dtype=np.int32)
    example_mass = np.zeros((num_examples, num_layers, num_experts), dtype=np.float32)
    example_tokens = np.zeros(num_examples, dtype=np.int64)
    device = input_device(model)
    forward_kwargs = _forward_kwargs(model)
    was_training = model.training
    model.eval()
    counted = seen = 0
    start = time.perf_counter()
    try:
        # FSDP2 gathers parameters into buffers it reuses in training; made under inference_mode they become
        # inference tensors that training cannot write, so a sharded model (the drift monitor) uses no_grad.
        from torch.distributed.fsdp import FSDPModule

        grad_off = torch.no_grad() if isinstance(model, FSDPModule) else torch.inference_mode()
        with RoutingRecorder(layers, spec) as recorder, grad_off, _progress(progress) as bar:
            task = bar.add_task("profile", total=len(batches), rate="")
            for batch in batches:
                count_mask = batch.count_mask.bool()
                recorder.begin_batch(count_mask)
                model(
                    input_ids=batch.input_ids.to(device, non_blocking=True),
                    attention_mask=batch.attention_mask.to(device, non_blocking=True),
                    **forward_kwargs,
                )
                counts_LBE, mass_LBE = recorder.end_batch()
                index = batch.example_index.numpy()
                example_counts[index] += counts_LBE.permute(1, 0, 2).numpy().astype(np.int32)
                example_mass[index] += mass_LBE.permute(1, 0, 2).numpy()
                example_tokens[index] += count_mask.sum(1).numpy()
                counted += int(count_mask.sum())
                seen += int(batch.attention_mask.sum())
                elapsed = time.perf_counter() - start
                bar.update(task, advance=1, rate=f"{seen / max(elapsed, 1e-9):,.0f} tok/s")
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - start
    counts_LE = example_counts.sum(0, dtype=np.int64)
    metadata = {
        "model": {
            "id": getattr(model.config, "_name_or_path", None) or type(model).__name__,
            "class": type(model).__name__,
            "model_type": getattr(model.config, "model_type", None),
            "arch": spec.name,
            "config_fingerprint": config_fingerprint(model.config),
            "shared_experts": sorted({name for layer in layers for name in layer.shared}),
            "shared_expert_equivalents": _shared_equivalents(layers),
            "layers": [layer.describe() for layer in layers],
        },
        "run": {
            "tokens_seen": seen,
            "tokens_counted": counted,
            "elapsed_s": round(elapsed, 3),
            "tokens_per_s": round(seen / max(elapsed, 1e-9), 1),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "device": str(device),
            "experts_implementation": getattr(model.config, "_experts_implementation", None),
        },
    }
    return Profile(
        counts_LE=counts_LE,
        mass_LE=example_mass.sum(0, dtype=np.float64).astype(np.float32),
        example_counts_NLE=example_counts,
        example_mass_NLE=example_mass,
        example_tokens_N=example_tokens,
        layer_ids=list(shape.layer_ids),
        num_experts=num_experts,
        top_k=shape.top_k,
        metadata=metadata,
    )


def profile_examples(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    *,
    batch_size: int,
    max_length: int,
    count_tokens: str = "all",
    progress: bool = True,
    runner: Any = None,
) -> Profile:
    """Tokenise and batch ``examples`` as the profiler needs, then profile them.

    ``runner(model, batches, num_examples)`` replaces :func:`profile_model` (the trainer passes one that
    shards the batches over processes).
    """
    from ..data.calibration import make_batches, pad_token_id_for, tokenize_example

    tokenized = [tokenize_example(example, tokenizer, max_length) for example in examples]
    batches = make_batches(
        tokenized, batch_size=batch_size, pad_token_id=pad_token_id_for(tokenizer), count_tokens=count_tokens
    )
    if runner is None:
        return profile_model(model, batches, len(examples), progress=progress)
    return runner(model, batches, len(examples))


def run_profile(config: ProfileConfig, *, model: Any = None, tokenizer: Any = None, progress: bool = True) -> Profile:
    """Load model, tokenizer and calibration data as ``config`` says, then profile."""
    from ..data.tasks import load_examples

    examples = load_examples(
        config.data,
        split=config.split,
        max_examples=config.max_examples,
        subsample=config.subsample,
        seed=config.seed,
        spider_dir=config.spider_dir,
    )
    model = model if model is not None else load_model(config.model_spec)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model_spec)
    profile = profile_examples(
        model,
        tokenizer,
        examples,
        batch_size=config.batch_size,
        max_length=config.max_length,
        count_tokens=config.count_tokens,
        progress=progress,
    )
    profile.metadata["model"]["id"] = config.model
    profile.metadata["data"] = {
        "data": config.data,
        "split": config.split,
        "max_examples": config.max_examples,
        "subsample": config.subsample,
        "seed": config.seed,
        "count_tokens": config.count_tokens,
        "max_length": config.max_length,
        "sources": [examples[0].source, examples[-1].source],
    }
    profile.metadata["config"] = asdict(config)
    return profile
