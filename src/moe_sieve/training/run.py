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

from .._io import (
    atomic_write_json,
    ensure_writable,
    run_lock,
    swap_in,
)
from .._version import __version__
from ..adapters import get_adapter_method, save_sieve_adapter
from ..adapters.io import gather_factors
from ..adapters.tokens import train_token_rows
from ..arch import MoEShape, config_fingerprint, find_moe_layers
from ..modeling import ModelSpec, load_model, load_tokenizer, resolve_device
from ..profiling import Profile
from ..profiling.profiler import profile_examples
from ..selection import Selection, get_strategy, make_selection
from .config import TrainConfig
from .convergence import convergence, loss_curve
from .distributed import broadcast_object, dist_state, profile_distributed
from .fused_loss import FusedLinearCrossEntropy, choose_fused_ce
from .monitor import routing_monitor
from .packing import check_packing, packing_collator
from .rundir import (
    RunDir,
    is_finished_run,
    keep_foreign_files,
    prepare_run_dir,
    run_record,
)
from .sharding import check_expert_parallel, check_experts_sharded, check_fsdp, reshard
from .tracking import check_report_to, install_tracking


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]
    selection: Selection | None
    already_finished: bool = False  # --resume of a finished run: nothing was trained, metrics.json is as it was


def _given_inputs(config: TrainConfig, model: Any) -> tuple[Selection | None, Profile | None]:
    """Load and check a given --selection or --profile and --k against the model, before any work."""
    from ..routing_stats import resolve_k

    shape = MoEShape.of(find_moe_layers(model))
    if config.experts_mode != "selected":
        return None, None
    if get_strategy(config.strategy).uses_k:
        try:
            resolve_k(config.k, shape.num_experts)
        except (TypeError, ValueError) as err:
            raise ValueError(f"--k {config.k!r}: {err}") from None
    selection = profile = None
    if config.selection:
        selection = Selection.load(config.selection)
        if sorted(selection.experts) != list(shape.layer_ids) or selection.num_experts != shape.num_experts:
            from ..profiling import ProfileMismatchError

            raise ProfileMismatchError(
                f"{config.selection}: selection for layers {sorted(selection.experts)} x {selection.num_experts} "
                f"experts does not fit {config.model} ({list(shape.layer_ids)} x {shape.num_experts})"
            )
        from ..profiling.artifact import warn_other_model

        made_on = (selection.source or {}).get("model_config_fingerprint")
        warn_other_model(f"the selection {config.selection}", made_on, config_fingerprint(model.config))
    elif config.profile:
        profile = Profile.load(config.profile)
        profile.check_fits(shape, config_fingerprint(model.config))
    return selection, profile


def _selection_for(
    config: TrainConfig,
    model: Any,
    examples: list,
    tokenizer: Any,
    work: Path,
    state: Any,
    given: tuple[Selection | None, Profile | None] = (None, None),
    resume: bool = False,
):
    """The selection of this run: given, reused from the run being resumed, or profiled now."""
    layers = find_moe_layers(model)
    shape = MoEShape.of(layers)
    selection_path = work / "selection.json"
    if config.experts_mode != "selected":
        return None
    selection, profile = given
    if selection is None and resume and selection_path.exists():
        selection = Selection.load(selection_path)
    if selection is None:
        if profile is None and get_strategy(config.strategy).uses_scores:
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
                profile.save(work / "profile", overwrite=True)
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
    """Run the whole recipe. Works unchanged under ``accelerate launch`` / ``torchrun`` (DDP, FSDP).

    The run directory is locked for the whole run; its ``config.json`` records the settings, and with
    ``overwrite`` the new run is built in a staging directory that replaces the old one only on success.
    """
    import contextlib

    check_report_to(config.report_to)
    state = dist_state()
    with contextlib.ExitStack() as stack:
        run = None
        if state.is_main_process:
            out = Path(config.out)
            if out.exists() and not out.is_dir():
                raise NotADirectoryError(f"--out {out} is a file, not a directory")
            ensure_writable(out, overwrite=True, directory=True)
            if resume and not out.is_dir():
                raise FileNotFoundError(f"--resume: {out} does not exist")
            stack.enter_context(run_lock(out))
            run = prepare_run_dir(config, overwrite, resume)
            if run.staged:
                stack.enter_context(run_lock(run.work))  # becomes RUN/.lock once swapped in
        run = broadcast_object(run, state)
        try:
            return _train_locked(config, run, resume, model, tokenizer, callbacks, state)
        except BaseException:
            if run.staged and state.is_main_process:  # the old run was never touched; drop the new attempt
                import shutil

                shutil.rmtree(run.work, ignore_errors=True)
            raise


def _train_locked(
    config: TrainConfig, run: RunDir, resume: bool, model: Any, tokenizer: Any, callbacks: list | None, state: Any
) -> TrainResult:
    from transformers import TrainingArguments

    from ..data.sft import SFTCollator, build_sft_dataset, load_sft_examples
    from .trainer import SegmentClock, SieveTrainer, ThroughputCallback, last_complete_checkpoint

    run_dir, work = run.path, run.work
    checkpoints = work / "checkpoints"
    resume_from = None
    if resume and is_finished_run(run_dir, config):
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        if state.is_main_process:
            print(
                f"moe-sieve: {run_dir} is already finished ({metrics.get('steps')} steps); nothing to resume, "
                "its metrics.json is kept as it is",
                file=sys.stderr,
            )
        selection = Selection.load(run_dir / "selection.json") if (run_dir / "selection.json").exists() else None
        return TrainResult(run_dir, metrics, selection, already_finished=True)
    for folder in (checkpoints, work / "tensorboard"):  # written into in place, not by rename
        if folder.is_symlink():
            from .._io import UnsafePathError

            raise UnsafePathError(f"{folder} is a symbolic link; moe-sieve writes into its own run directory only")
    if resume:
        found = last_complete_checkpoint(checkpoints, clean=state.is_main_process)
        if found is None:
            raise FileNotFoundError(
                f"--resume: no complete checkpoint under {checkpoints}: the run stopped before its first one, so "
                "there is nothing to resume; pass --overwrite to start it again"
            )
        resume_from = str(found)
        if state.is_main_process:
            print(f"moe-sieve: resuming from {resume_from}", file=sys.stderr)
    state.wait_for_everyone()

    spec = ModelSpec(
        model=config.model,
        dtype=config.dtype,
        device=(str(state.device) if state.device.type == "cuda" else "cpu")
        if state.num_processes > 1
        else config.device,
        trust_remote_code=config.trust_remote_code,
        experts_implementation=config.experts_implementation,
        ep_size=config.ep_size,
    )
    check_fsdp(config, resolve_device(spec.device))
    if config.ep_size > 1:
        check_expert_parallel(config, state)
    # Cheap inputs first: a typo in --data fails before a large model is loaded.
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    examples = load_sft_examples(
        config.data,
        split=config.split,
        max_examples=config.max_examples,
        seed=config.seed,
        spider_dir=config.spider_dir,
        tokenizer=tokenizer,
    )
    model = model if model is not None else load_model(spec)
    if config.ep_size > 1:
        check_experts_sharded(model, config.ep_size)
    if config.packing:
        check_packing(model)
    loss_choice = choose_fused_ce(  # before any work: an unusable --fused-ce kernel fails here
        config.fused_ce,
        model,
        next(model.parameters()).device,
        fsdp=bool(config.fsdp) or config.ep_size > 1,
        method=config.method,
        router_aux_loss=config.router_aux_loss,
    )
    given = _given_inputs(config, model)
    if state.is_main_process:  # every input is valid: from here on this directory is this run's
        atomic_write_json(work / "config.json", run_record(config))
    selection = _selection_for(config, model, examples, tokenizer, work, state, given, resume)
    method = get_adapter_method(config.method)
    if config.ep_size > 1:
        reshard(model)
    sieve = method.attach(model, selection, method.from_train(config))
    callbacks = [*method.train_callbacks(sieve), *(callbacks or [])]
    monitor = None
    if method.routing_monitor:
        monitor = routing_monitor(config, model, tokenizer, examples, sieve, work, state, resume_from)
    if state.is_main_process:
        from rich.console import Console

        Console(stderr=True).print(sieve.table())
    dataset, report = build_sft_dataset(examples, tokenizer, config.max_length, overflow=config.overflow)
    labels = dataset["labels"]  # untrained completion tokens: warn, and attach their rows under --train-tokens
    train_token_rows(model, tokenizer, labels, config.train_tokens, method=config.method, log=state.is_main_process)
    if state.is_main_process:
        atomic_write_json(work / "data_report.json", report.to_json())
        print(report.summary(), file=sys.stderr)

    world = max(1, state.num_processes)
    if config.batch_size % (config.micro_batch_size * world):
        raise ValueError(
            f"--batch-size {config.batch_size} is not a multiple of --micro-batch-size {config.micro_batch_size} "
            f"x {world} processes"
        )
    device = next(p for p in model.parameters()).device
    use_bf16 = device.type == "cuda" and next(model.parameters()).dtype == torch.bfloat16
    if state.is_main_process:
        print(loss_choice.line, file=sys.stderr)
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
        # transformers refuses checkpoints with optimizer state for a model sharded at load time; SieveTrainer
        # writes the adapter's own (gathered) optimizer state and RNG next to the adapter (training/trainer.py)
        save_only_model=config.ep_size > 1,
        save_steps=config.save_steps,
        save_total_limit=None,  # SieveTrainer rotates, and only after a checkpoint is complete
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
        fsdp_config={"version": 2, "state_dict_type": "FULL_STATE_DICT"} if config.fsdp else None,
        remove_unused_columns=False,
        # packed rows hold no padding (and EOS may share the pad id, which "non_padding" would then skip)
        include_num_input_tokens_seen="all" if config.packing else "non_padding",
        dataloader_num_workers=0,
        disable_tqdm=not state.is_main_process,
    )
    trainer = SieveTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=packing_collator(model) if config.packing else SFTCollator(tokenizer),
        processing_class=tokenizer,
        callbacks=[ThroughputCallback(), *(monitor.callbacks() if monitor else []), *(callbacks or [])],
        base_model_id=config.model,
        keep_checkpoints=config.save_total_limit,
        fused_ce=loss_choice.backend and FusedLinearCrossEntropy.for_backend(loss_choice.backend).install(model),
        segments=(clock := SegmentClock(resume_from)),
    )
    if monitor is not None:
        monitor.bind(trainer)
    install_tracking(trainer, report_to=config.report_to, run_dir=work, selection=selection, profile=config.profile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    clock.start()
    output = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - start
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    curve = loss_curve(trainer.state.log_history)
    metrics = {
        "tool_version": __version__,
        "strategy": config.strategy,
        "trainable_params": sieve.trainable_params,
        "trainable_params_by_group": sieve.params_by_group(),
        "adapted_experts": sum(len(v) for v in sieve.experts.values()) if "experts" in config.targets else 0,
        "method": config.method,
        **({method.name: method.metrics(sieve)} if method.metrics is not None else {}),
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        **clock.totals(trainer.state, wall),  # wall_time_s, tokens_seen, tokens_per_s, segments: all segments
        "train_runtime_s": output.metrics.get("train_runtime"),
        "peak_memory_bytes": _peak_memory_bytes(device),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else output.training_loss,
        "train_loss": output.training_loss,
        "loss_curve": curve,
        "convergence": convergence(curve["loss"]),
        "processes": world,
        "packing": config.packing,
        "loss_kernel": loss_choice.backend or "plain",
        "resumed_from": resume_from,
        "data": report.to_json(),
    }
    if monitor is not None:
        metrics["routing_drift"] = monitor.summary(wall)
        if state.is_main_process:
            print(monitor.overhead_line(wall), file=sys.stderr)
    factors = gather_factors(model)  # every process: under FSDP the factors are shards, gathered collectively
    if state.is_main_process:
        save_sieve_adapter(
            model,
            work / "adapter",
            overwrite=True,
            factors=factors,
            base_model=config.model,
            extra={
                "selection": None if selection is None else str(run_dir / "selection.json"),
                **(monitor.adapter_record() if monitor else {}),
            },
        )
        atomic_write_json(work / "metrics.json", metrics)
        trainer.write_model_card(work)
        if run.staged:  # the old run stays until the new one is complete
            keep_foreign_files(run_dir, work, config)
            swap_in(work, run_dir)
    state.wait_for_everyone()
    return TrainResult(run_dir, metrics, selection)
