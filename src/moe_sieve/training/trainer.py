"""transformers ``Trainer`` specialised for Sieve adapters: checkpoints hold the adapter (and the
optimizer state Trainer adds), non-finite losses stop the run, and tokens/s is logged."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .._io import atomic_write_json, fault_point
from ..adapters.factors import ep_slots, full_tensor, local_part
from ..adapters.io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, gather_factors, load_factors, save_factors
from ..adapters.sieve.expert_parallel import is_expert_parallel, reduce_expert_gradient
from .sharding import check_sharded, enable_cpu_fsdp


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


COMPLETE_MARKER = "moe_sieve_complete.json"
EP_OPTIMIZER = "optimizer_gathered.pt"  # expert parallelism: AdamW state by factor name, full tensors
SEGMENTS_FILE = "moe_sieve_segments.json"  # steps, wall time and tokens of each training segment up to here
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_complete(path: str | os.PathLike) -> bool:
    """A checkpoint counts once its marker (written last) exists and every file it lists has its size."""
    marker = Path(path) / COMPLETE_MARKER
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
        return all((Path(path) / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` directory, oldest first (complete or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def last_complete_checkpoint(directory: str | os.PathLike, *, clean: bool = False) -> Path | None:
    """The newest complete checkpoint; incomplete ones (a kill during a save) are reported on stderr,
    skipped and, with ``clean``, removed so that no later step can mistake them for complete."""
    newest = None
    for _step, path in reversed(list_checkpoints(directory)):
        if checkpoint_complete(path):
            newest = newest or path
            continue
        action = "removed" if clean else "ignored"
        print(f"moe-sieve: {path} is incomplete (interrupted while saving); {action}", file=sys.stderr)
        if clean:
            shutil.rmtree(path, ignore_errors=True)
    return newest


def damaged_checkpoint_message(checkpoint: Path, what: str, err: BaseException) -> str:
    """Which checkpoint does not load, and how to continue: from the complete checkpoint before it, or anew."""
    match = _CHECKPOINT.match(checkpoint.name)
    step = int(match.group(1)) if match else 0
    earlier = [p for n, p in list_checkpoints(checkpoint.parent) if n < step and checkpoint_complete(p)]
    if earlier:
        advice = f"remove {checkpoint} and --resume again to continue from {earlier[-1].name} (complete)"
    else:
        advice = "there is no complete checkpoint before it: --overwrite starts the run again"
    return f"{checkpoint}: its {what} does not load ({type(err).__name__}: {err}); {advice}"


class SieveTrainer(Trainer):
    """Saves and restores only the LoRA factors, never the frozen base weights.

    Checkpoints count only once complete (a marker listing every file and its size is written last), and
    rotation (``keep_checkpoints``) runs after that marker, so a kill at any moment leaves the newest
    complete checkpoint intact.
    """

    def __init__(
        self,
        *args: Any,
        base_model_id: str | None = None,
        keep_checkpoints: int | None = None,
        fused_ce: Any = None,
        segments: SegmentClock | None = None,
        expert_guard_steps: int = 2,
        **kwargs: Any,
    ):
        if fused_ce is not None:  # training/fused_loss.py: the loss comes from the hidden states, not the logits
            kwargs["compute_loss_func"] = fused_ce
        super().__init__(*args, **kwargs)
        self.expert_parallel = is_expert_parallel(self.model)
        self.base_model_id = base_model_id
        self.keep_checkpoints = keep_checkpoints
        self.fused_ce = fused_ce
        self.segments = segments
        if segments is not None:
            self.add_callback(segments)
        self.expert_guard = self._install_expert_guard(expert_guard_steps)

    def _install_expert_guard(self, steps: int) -> Any:
        """The first ``steps`` optimizer steps check that every selected expert with tokens gets a gradient
        (adapters/guard.py), for the methods that ask for it (sieve LoRA); FSDP2 shards the factors across
        processes, so it is skipped there."""
        from ..adapters.guard import install_expert_guard
        from ..adapters.methods import AdapterState, method_of

        adapters = getattr(self.model, "moe_sieve", None)
        if steps <= 0 or not isinstance(adapters, AdapterState) or not method_of(adapters).expert_guard:
            return None
        if self.args.fsdp or self.expert_parallel:
            if self.args.should_save:
                how = "FSDP" if self.args.fsdp else "expert parallelism"
                print(f"moe-sieve: expert guard skipped under {how} (the adapter factors are sharded)", file=sys.stderr)
            return None
        return install_expert_guard(self.model, steps)

    def write_model_card(self, run_dir: str | os.PathLike) -> Path | None:
        """``README.md`` in the run's ``adapter/`` directory, from the run's artifacts (adapters/card.py)."""
        from ..adapters.card import write_run_card

        try:
            return write_run_card(run_dir)
        except Exception as err:  # noqa: BLE001 - a finished run is never lost to its README
            print(f"moe-sieve: model card not written ({type(err).__name__}: {err})", file=sys.stderr)
            return None

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if self.fused_ce is not None and model.training:
            inputs = {**inputs, "logits_to_keep": 1}  # the head computes one position; the fused loss does the rest
        return super().compute_loss(model, inputs, *args, **kwargs)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        enable_cpu_fsdp(self)  # accelerate keeps a gloo/CPU group MULTI_CPU (plain DDP) even with FSDP asked for

    def _prepare_for_training(self, *args: Any, **kwargs: Any):
        prepared = super()._prepare_for_training(*args, **kwargs)
        if self.expert_parallel:
            self._reduce_expert_gradients()
        if self.is_fsdp_enabled:  # FSDP2 only (enable_cpu_fsdp refuses FSDP1)
            count = check_sharded(self.model)
            if self.args.should_save:
                print(
                    f"moe-sieve: FSDP2 sharded {count} trainable tensors over {self.args.world_size} processes",
                    file=sys.stderr,
                )
        return prepared

    def _expert_factors(self) -> list[torch.nn.Parameter]:
        return [p for p in self._sieve_model().parameters() if p.requires_grad and ep_slots(p) is not None]

    def _reduce_expert_gradients(self) -> None:
        """Expert-parallel factors: transformers' Trainer averages only plain adapter tensors over processes, so
        each hot expert's factors get the engine's reduction for expert weights at the end of every accumulation
        window (adapters/sieve/expert_parallel.py)."""
        dp_size = int(self._sieve_model().config.distributed_config.dp_size)

        def reduce(param: torch.nn.Parameter) -> None:
            if self.accelerator.sync_gradients:
                reduce_expert_gradient(param, dp_size)

        factors = self._expert_factors()
        for param in factors:
            if not getattr(param, "_moe_sieve_reduce_hook", False):
                param.register_post_accumulate_grad_hook(reduce)
                param._moe_sieve_reduce_hook = True
        if self.args.should_save:
            ranks = self._sieve_model().config.distributed_config
            print(
                f"moe-sieve: expert parallelism ep={ranks.ep_size} over {self.args.world_size} processes: "
                f"{len(factors)} expert-factor tensors on their owning ranks",
                file=sys.stderr,
            )

    def _sync_replicated_trainable_parameters(self, model: Any) -> None:
        """transformers broadcasts every plain trainable tensor from rank 0 and averages its gradient: right for
        the dense adapters, wrong for the expert factors each rank holds for its own experts."""
        factors = self._expert_factors() if self.expert_parallel else []
        for param in factors:
            param.requires_grad_(False)
        try:
            super()._sync_replicated_trainable_parameters(model)
        finally:
            for param in factors:
                param.requires_grad_(True)

    def _clip_grad_norm(self, model: Any) -> Any:
        """Under expert parallelism the norm adds each EP rank's expert-factor gradients (a collective over the
        EP group) to the dense adapters' (identical on every rank after averaging) and FSDP2 shards' norms."""
        if not self.expert_parallel:
            return super()._clip_grad_norm(model)
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor
        from torch.nn.utils import clip_grads_with_norm_, get_total_norm

        params = [p for p in self._sieve_model().parameters() if p.requires_grad]
        for param in params:
            if param.grad is None:  # e.g. a rank that owns no hot expert of a layer: still joins the collective
                param.grad = torch.zeros_like(param)
        squares = torch.zeros((), dtype=torch.float64)
        expert = [p for p in params if ep_slots(p) is not None]
        if expert:  # on the gradients' device: NCCL reduces GPU tensors only
            local = get_total_norm([p.grad for p in expert]).double() ** 2
            dist.all_reduce(local, group=ep_slots(expert[0]).ep_group)
            squares += local.cpu()
        sharded = [p.grad for p in params if isinstance(p.grad, DTensor)]
        if sharded:
            squares += get_total_norm(sharded).full_tensor().double().cpu() ** 2
        plain = [p.grad for p in params if ep_slots(p) is None and not isinstance(p.grad, DTensor)]
        if plain:
            squares += get_total_norm(plain).double().cpu() ** 2
        total = squares.sqrt().float()
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            for is_sharded in (False, True):  # one foreach call cannot mix DTensors and tensors
                group = [p for p in params if isinstance(p.grad, DTensor) == is_sharded]
                if group:
                    clip_grads_with_norm_(group, self.args.max_grad_norm, total)
        return total

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        path = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and (path.exists() or path.is_symlink()):
            # Left by an earlier attempt (resume starts below it): written fresh, never through what is there.
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        self.accelerator.wait_for_everyone()
        super()._save_checkpoint(model, trial)
        if self.expert_parallel:  # transformers saved the model only (save_only_model): add what a resume needs
            self._save_optimizer_and_scheduler(str(path))
            self._save_rng_state(str(path))
        self.accelerator.wait_for_everyone()  # every process has written its part (e.g. rng_state_N.pth)
        if not self.args.should_save:
            return
        fault_point("checkpoint-before-marker")
        if self.segments is not None:
            atomic_write_json(path / SEGMENTS_FILE, self.segments.segments(self.state))
        files = {
            str(p.relative_to(path)): p.stat().st_size
            for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != COMPLETE_MARKER
        }
        for p in path.rglob("*"):  # on disk before the marker says so
            if p.is_file():
                with open(p, "rb") as handle:
                    os.fsync(handle.fileno())
        atomic_write_json(path / COMPLETE_MARKER, {"step": self.state.global_step, "files": files})
        fault_point("checkpoint-after-marker")
        if self.keep_checkpoints:
            complete = [p for _, p in list_checkpoints(path.parent) if checkpoint_complete(p)]
            for old in complete[: -self.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ):
        """transformers computes the epoch to resume in as ``global_step // steps_per_epoch`` and checks
        ``max_steps`` only after an update; from a checkpoint taken at the final step of a partial epoch it
        would run one extra step (13 for ``--max-steps 12``). Such a run is already finished: skip the loop."""
        epochs, steps = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if resume_from_checkpoint is not None and 0 < max_steps <= self.state.global_step:
            return num_train_epochs, 0
        return epochs, steps

    def _sieve_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP every process gathers the adapter's shards (a collective), never the full base model
        that transformers' FSDP path would gather, and the main process writes them."""
        if not (self.is_fsdp_enabled or self.expert_parallel):
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir, factors=gather_factors(self._sieve_model()))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """transformers' FSDP branch also writes the full model (``save_fsdp_model``); keep the checkpoint
        adapter-only: accelerate's FSDP optimizer state (it holds the trainable factors only) and the schedule."""
        if self.expert_parallel:
            return self._save_gathered_optimizer(output_dir)
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import save_fsdp_optimizer
        from transformers.trainer import SCHEDULER_NAME

        save_fsdp_optimizer(
            self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model, output_dir
        )
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _save_gathered_optimizer(self, output_dir: str) -> None:
        """AdamW's state of the adapter factors keyed by name, every tensor gathered to its full shape (an
        EP-trained run resumes on any layout), and the schedule. A collective: every process calls it."""
        from transformers.trainer import SCHEDULER_NAME

        names = {p: n for n, p in self._sieve_model().named_parameters() if p.requires_grad}
        state = {}
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                moments = self.optimizer.state.get(param, {})
                state[names[param]] = {key: _full(value, param) for key, value in sorted(moments.items())}
        if self.args.should_save:
            groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [names[p] for p in g["params"]]}
                      for g in self.optimizer.param_groups]  # fmt: skip
            torch.save({"state": state, "param_groups": groups}, os.path.join(output_dir, EP_OPTIMIZER))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_gathered_optimizer(self, checkpoint: str) -> None:
        from transformers.trainer import SCHEDULER_NAME

        saved = torch.load(os.path.join(checkpoint, EP_OPTIMIZER), weights_only=True)
        names = {p: n for n, p in self._sieve_model().named_parameters() if p.requires_grad}
        current = self.optimizer.state_dict()
        for number, (group, entry) in enumerate(zip(self.optimizer.param_groups, current["param_groups"], strict=True)):
            saved_group = saved["param_groups"][number]
            if saved_group["params"] != [names[p] for p in group["params"]]:
                raise ValueError(f"param group {number} holds other tensors than the checkpoint's")
            entry.update({key: value for key, value in saved_group.items() if key != "params"})
            for index, param in zip(entry["params"], group["params"], strict=True):
                if saved["state"].get(names[param]):
                    current["state"][index] = {k: _local(v, param) for k, v in saved["state"][names[param]].items()}
        self.optimizer.load_state_dict(current)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None, factors: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self._sieve_model()
        save_factors(model, os.path.join(output_dir, ADAPTER_WEIGHTS), factors)
        fault_point("checkpoint-save")
        atomic_write_json(os.path.join(output_dir, ADAPTER_CONFIG), adapter_config(model, self.base_model_id))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """A damaged optimizer.pt / scheduler.pt (same size, so the marker still matches) is one error naming the
        checkpoint and the complete one before it, never a pickle traceback."""
        try:
            if self.expert_parallel and checkpoint is not None:
                return self._load_gathered_optimizer(checkpoint)
            super()._load_optimizer_and_scheduler(checkpoint)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as err:  # noqa: BLE001 - torch.load/pickle raise many types for a damaged file
            message = damaged_checkpoint_message(Path(str(checkpoint)), "optimizer/scheduler state", err)
            raise ValueError(message) from err

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        load_factors(model or self._sieve_model(), os.path.join(resume_from_checkpoint, ADAPTER_WEIGHTS))

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(model, inputs, *args, **kwargs)
        if not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at step {self.state.global_step + 1} "
                f"(epoch {self.state.epoch or 0:.2f}); checkpoints already written in {self.args.output_dir} are "
                "intact. Lower --learning-rate or check the data."
            )
        return loss


def _full(value: Any, param: Any) -> Any:
    """An optimizer state entry as a full CPU tensor (EP slots and FSDP2 shards gathered; scalars as they are)."""
    if not isinstance(value, torch.Tensor):
        return value
    return (value if value.ndim == 0 else full_tensor(value, param)).detach().cpu()


def _local(value: Any, param: Any) -> Any:
    """A saved full optimizer state entry as this process's part for ``param``."""
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        return value
    return local_part(value, param)


class ThroughputCallback(TrainerCallback):
    """Adds tokens/s (non-padding input tokens) to every log line."""

    def __init__(self) -> None:
        self._last: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self._last is None:
            return
        now, seen = time.perf_counter(), state.num_input_tokens_seen
        then, before = self._last
        if now > then and seen > before:
            logs["tokens_per_s"] = round((seen - before) / (now - then), 1)
        self._last = (now, seen)


class SegmentClock(TrainerCallback):
    """Steps, wall time and tokens of each training segment (a first run, then every --resume).

    Each checkpoint records the segments up to it (``moe_sieve_segments.json``), so a run resumed from that
    checkpoint, even after a kill, adds its own segment to those before it: the metrics of a resumed run cover
    the whole run, counting the work each checkpoint kept (not the steps a kill lost and the resume redid).
    """

    def __init__(self, resume_from: str | os.PathLike | None = None) -> None:
        self.earlier: list[dict[str, Any]] = []
        if resume_from is not None:
            try:
                self.earlier = json.loads((Path(resume_from) / SEGMENTS_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.earlier = []  # a checkpoint of an older version: its earlier time is unknown
        self.started = time.perf_counter()
        self.first: tuple[int, int] | None = None

    def start(self) -> None:
        """Call right before ``trainer.train``: the segment's clock starts here, as its wall time does."""
        self.started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.first = (state.global_step, int(state.num_input_tokens_seen))  # restored from the checkpoint

    def current(self, state: Any, wall_time_s: float | None = None) -> dict[str, Any]:
        step0, tokens0 = self.first or (0, 0)
        wall = time.perf_counter() - self.started if wall_time_s is None else wall_time_s
        return {
            "steps": state.global_step - step0,
            "wall_time_s": round(wall, 3),
            "tokens_seen": int(state.num_input_tokens_seen) - tokens0,
        }

    def segments(self, state: Any, wall_time_s: float | None = None) -> list[dict[str, Any]]:
        return [*self.earlier, self.current(state, wall_time_s)]

    def totals(self, state: Any, wall_time_s: float) -> dict[str, Any]:
        """``wall_time_s``, ``tokens_seen`` and ``tokens_per_s`` over every segment, and the segments."""
        segments = self.segments(state, wall_time_s)
        wall = sum(s["wall_time_s"] for s in segments)
        tokens = sum(s["tokens_seen"] for s in segments)
        return {
            "wall_time_s": round(wall, 3),
            "tokens_seen": tokens,
            "tokens_per_s": round(tokens / max(wall, 1e-9), 1),
            "segments": segments,
        }
