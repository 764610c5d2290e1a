"""transformers ``Trainer`` specialised for Sieve adapters: checkpoints hold the adapter (and the
optimizer state Trainer adds), non-finite losses stop the run, and tokens/s is logged."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .._io import atomic_write_json
from ..adapters.io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, load_factors, save_factors


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class SieveTrainer(Trainer):
    """Saves and restores only the LoRA factors, never the frozen base weights."""

    def __init__(self, *args: Any, base_model_id: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.base_model_id = base_model_id

    def _sieve_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self._sieve_model()
        save_factors(model, os.path.join(output_dir, ADAPTER_WEIGHTS))
        atomic_write_json(os.path.join(output_dir, ADAPTER_CONFIG), adapter_config(model, self.base_model_id))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

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
