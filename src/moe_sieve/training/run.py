"""The one-line recipe: profile -> select -> LoRA fine-tune -> adapter + metrics, in one run directory."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import ArtifactExistsError, atomic_write_json
from .._version import __version__
from ..adapters import SieveLoraConfig, apply_sieve_lora, save_sieve_adapter
from ..arch import MoEShape, config_fingerprint, find_moe_layers
from ..modeling import ModelSpec, load_model, load_tokenizer
from ..profiling import Profile, profile_model
from ..profiling.profiler import profile_examples
from ..selection import Selection, make_selection
from .config import TrainConfig
from .tracking import check_report_to, install_tracking

RESULT_FILES = ("metrics.json", "adapter")
STAGE_OUTPUTS = ("metrics.json", "adapter", "selection.json", "profile", "checkpoints", "data_report.json")


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]
    selection: Selection | None


def _dist():
    """Distributed state when launched by accelerate/torchrun (initialises the process group)."""
    from accelerate import PartialState

    # On a machine without CUDA, accelerate only forms a multi-process (gloo) group when asked for CPU.
    return PartialState(cpu=not torch.cuda.is_available())


def _last_checkpoint(checkpoints: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None


def prepare_run_dir(config: TrainConfig, overwrite: bool, resume: bool) -> Path:
    """Refuse to replace finished results; with ``resume`` keep everything and continue."""
    run_dir = Path(config.out)
    finished = [name for name in RESULT_FILES if (run_dir / name).exists()]
    if finished and not (overwrite or resume):
        raise ArtifactExistsError(
            f"{run_dir} already holds results ({', '.join(finished)}); pass --overwrite to replace them "
            "or --resume to continue"
        )
    if resume and not run_dir.exists():
        raise FileNotFoundError(f"--resume: {run_dir} does not exist")
    saved = run_dir / "config.json"
    if resume and saved.exists():
        before = json.loads(saved.read_text())["train"]
        changed = {
            k: (before.get(k), v)
            for k, v in config.to_json().items()
            if k not in ("max_steps", "epochs", "save_steps", "logging_steps", "report_to") and before.get(k) != v
        }
        if changed:
            raise ValueError(f"--resume: {saved} was written with other settings: {changed}")
    if overwrite and not resume:
        import shutil

        for name in STAGE_OUTPUTS:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def profile_distributed(model: Any, batches: list, num_examples: int, state: Any) -> Profile:
    """Each process profiles its shard of the batches; summing the per-example counts across processes
    gives exactly the single-process profile."""
    shard = batches[state.process_index :: state.num_processes]
    profile = profile_model(model, shard, num_examples, progress=state.is_main_process)
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


def _selection_for(config: TrainConfig, model: Any, examples: list, tokenizer: Any, run_dir: Path, state: Any):
    """The selection of this run: given, reused from an earlier attempt, or profiled now."""
    layers = find_moe_layers(model)
    shape = MoEShape.of(layers)
    selection_path = run_dir / "selection.json"
    if config.experts_mode != "selected":
        return None
    if config.selection:
        selection = Selection.load(config.selection)
    elif selection_path.exists():
        selection = Selection.load(selection_path)
    else:
        profile = None
        if config.profile:
            profile = Profile.load(config.profile)
        elif config.strategy != "random":
            rng = np.random.default_rng(config.seed)
            count = max(1, math.floor(config.profile_subsample * len(examples) + 0.5))
            picked = sorted(rng.choice(len(examples), size=count, replace=False).tolist())
            profile = profile_examples(
                model,
                tokenizer,
                [examples[i] for i in picked],
                batch_size=config.micro_batch_size,
                max_length=config.max_length,
                runner=lambda m, batches, n: profile_distributed(m, batches, n, state),
            )
            profile.metadata["model"]["id"] = config.model
            profile.metadata["data"] = {
                "data": config.data,
                "split": config.split,
                "subsample": config.profile_subsample,
                "seed": config.seed,
                "count_tokens": "all",
                "max_length": config.max_length,
                "examples": picked[:50],
            }
            if state.is_main_process:
                profile.save(run_dir / "profile", overwrite=True)
        if profile is not None:
            profile.check_fits(shape, config_fingerprint(model.config))
        counts = profile.counts_LE if profile is not None else np.zeros((len(layers), shape.num_experts), np.int64)
        selection = make_selection(
            counts,
            profile.mass_LE if profile is not None else None,
            strategy=config.strategy,
            k=config.k,
            rank_by=config.rank_by,
            seed=config.seed,
            min_per_layer=config.min_per_layer,
            coverage=config.coverage,
            hot=config.hot,
            layer_ids=list(shape.layer_ids),
            top_k=shape.top_k,
            source={
                "model": config.model,
                "model_config_fingerprint": config_fingerprint(model.config),
                "profile_fingerprint": None if profile is None else profile.fingerprint,
                "data": config.data,
            },
        )
    if sorted(selection.experts) != list(shape.layer_ids) or selection.num_experts != shape.num_experts:
        from ..profiling import ProfileMismatchError

        raise ProfileMismatchError(
            f"selection for layers {sorted(selection.experts)} x {selection.num_experts} experts does not fit "
            f"{config.model} ({list(shape.layer_ids)} x {shape.num_experts})"
        )
    if state.is_main_process and not selection_path.exists():
        selection.save(selection_path)
    return selection


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss_kib * (1 if sys.platform == "darwin" else 1024))


def train(
    config: TrainConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    model: Any = None,
    tokenizer: Any = None,
    callbacks: list | None = None,
) -> TrainResult:
    """Run the whole recipe. Works unchanged under ``accelerate launch`` / ``torchrun`` (DDP, FSDP)."""
    from transformers import TrainingArguments

    from ..data.sft import SFTCollator, build_sft_dataset, load_sft_examples
    from .trainer import SieveTrainer, ThroughputCallback

    check_report_to(config.report_to)
    state = _dist()
    run_dir = prepare_run_dir(config, overwrite, resume)
    checkpoints = run_dir / "checkpoints"
    resume_from = _last_checkpoint(checkpoints) if resume else None
    if resume and resume_from is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {checkpoints}")
    if state.is_main_process:
        atomic_write_json(run_dir / "config.json", {"tool_version": __version__, "train": config.to_json()})

    spec = ModelSpec(
        model=config.model,
        dtype=config.dtype,
        device=(str(state.device) if state.device.type == "cuda" else "cpu")
        if state.num_processes > 1
        else config.device,
        trust_remote_code=config.trust_remote_code,
        experts_implementation=config.experts_implementation,
    )
    model = model if model is not None else load_model(spec)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    examples = load_sft_examples(
        config.data,
        split=config.split,
        max_examples=config.max_examples,
        seed=config.seed,
        spider_dir=config.spider_dir,
        tokenizer=tokenizer,
    )
    selection = _selection_for(config, model, examples, tokenizer, run_dir, state)
    lora = SieveLoraConfig(
        r=config.r,
        alpha=config.alpha,
        dropout=config.dropout,
        targets=config.targets,
        experts=config.experts_mode,
        seed=config.seed,
    )
    sieve = apply_sieve_lora(model, selection, lora)
    if state.is_main_process:
        from rich.console import Console

        Console(stderr=True).print(sieve.table())
    dataset, report = build_sft_dataset(examples, tokenizer, config.max_length, overflow=config.overflow)
    if state.is_main_process:
        atomic_write_json(run_dir / "data_report.json", report.to_json())
        print(report.summary(), file=sys.stderr)

    world = max(1, state.num_processes)
    if config.batch_size % (config.micro_batch_size * world):
        raise ValueError(
            f"--batch-size {config.batch_size} is not a multiple of --micro-batch-size {config.micro_batch_size} "
            f"x {world} processes"
        )
    device = next(p for p in model.parameters()).device
    use_bf16 = device.type == "cuda" and next(model.parameters()).dtype == torch.bfloat16
    args = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.batch_size // (config.micro_batch_size * world),
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        warmup_steps=config.warmup,
        lr_scheduler_type=config.scheduler,
        optim="adamw_torch",
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to=[] if config.report_to == "none" else [config.report_to],
        **(
            {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
            if config.gradient_checkpointing
            else {}
        ),
        bf16=use_bf16,
        use_cpu=device.type == "cpu",
        ddp_backend="gloo" if device.type == "cpu" and world > 1 else None,
        ddp_find_unused_parameters=False,
        fsdp=config.fsdp or "",
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=not state.is_main_process,
    )
    trainer = SieveTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=SFTCollator(tokenizer),
        processing_class=tokenizer,
        callbacks=[ThroughputCallback(), *(callbacks or [])],
        base_model_id=config.model,
    )
    install_tracking(trainer, report_to=config.report_to, run_dir=run_dir, selection=selection, profile=config.profile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - start
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    metrics = {
        "tool_version": __version__,
        "strategy": config.strategy,
        "trainable_params": sieve.trainable_params,
        "trainable_params_by_group": sieve.params_by_group(),
        "adapted_experts": sum(len(v) for v in sieve.experts.values()) if "experts" in lora.targets else 0,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "wall_time_s": round(wall, 3),
        "train_runtime_s": output.metrics.get("train_runtime"),
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "tokens_per_s": round(trainer.state.num_input_tokens_seen / max(wall, 1e-9), 1),
        "peak_memory_bytes": _peak_memory_bytes(device),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else output.training_loss,
        "train_loss": output.training_loss,
        "processes": world,
        "resumed_from": resume_from,
        "data": report.to_json(),
    }
    if state.is_main_process:
        save_sieve_adapter(
            model,
            run_dir / "adapter",
            overwrite=True,
            base_model=config.model,
            extra={"selection": None if selection is None else str(run_dir / "selection.json")},
        )
        atomic_write_json(run_dir / "metrics.json", metrics)
    state.wait_for_everyone()
    return TrainResult(run_dir, metrics, selection)
