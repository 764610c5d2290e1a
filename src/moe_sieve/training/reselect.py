"""``--reselect grow``: at the drift monitor's steps, add fresh adapters (B = 0) to experts that entered the
per-layer top-k, never removing trained ones (the paper's §8 "dynamic re-profiling", in its safest form).

Grown experts get their own parameter tensors, so AdamW starts them from fresh state (zero moments, step 0)
while every trained tensor keeps its state. Growth events are written to ``reselect.json``; a resumed run
replays the events up to its checkpoint *before* the checkpoint is loaded, which rebuilds the same
parameters in the same optimizer order, so resuming is exact. At the end the grown fused adapters are
folded into ordinary :class:`ExpertLoRA` modules, so the final adapter loads, merges and exports like any
other and records which experts were added at which step.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from .._io import atomic_write_json
from ..adapters.methods import AdaptedModule
from ..adapters.sieve.experts import ExpertLoRA
from ..adapters.sieve.model import fused_expert_lora, verify_adapters, wrap_listed_experts
from ..arch import find_moe_layers, get_arch

RESELECT_FILE = "reselect.json"
_FACTORS = ("gate_A", "gate_B", "up_A", "up_B", "down_A", "down_B")


@contextlib.contextmanager
def _seeded(*seed: int) -> Iterator[None]:
    """Initialise grown factors from their own generator: training's RNG stream is untouched, and a resumed
    run rebuilds identical tensors."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
        yield


class GrownExpertLoRA(ExpertLoRA):
    """An :class:`ExpertLoRA` whose factors are the slot-ordered concatenation of several parts (the original
    selection and each growth), each part a separate set of parameters with its own optimizer state."""

    def __init__(self, parts: Sequence[ExpertLoRA]) -> None:
        nn.Module.__init__(self)
        first = parts[0]
        for name in (
            "num_experts",
            "first_expert",
            "hidden_size",
            "intermediate_size",
            "r",
            "alpha",
            "scaling",
            "has_gate",
        ):
            setattr(self, name, getattr(first, name))
        self.is_transposed, self.is_concatenated = first.is_transposed, first.is_concatenated
        self.dropout = nn.Dropout(first.dropout.p)
        self.parts = nn.ModuleList(parts)
        concat = [e for part in parts for e in part.selected_experts]
        if len(set(concat)) != len(concat):
            raise ValueError(f"grown experts overlap: {concat}")
        ids = sorted(concat)
        self.selected_experts = tuple(ids)
        device = first.expert_ids.device
        order = torch.tensor([concat.index(e) for e in ids], dtype=torch.long, device=device)
        slot_of_expert = torch.full((self.num_experts,), -1, dtype=torch.long, device=device)
        slot_of_expert[torch.tensor(ids, device=device)] = torch.arange(len(ids), device=device)
        self.register_buffer("expert_ids", torch.tensor(ids, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("slot_of_expert", slot_of_expert, persistent=False)
        self.register_buffer("order", order, persistent=False)

    def _stacked(self, name: str) -> torch.Tensor:
        return torch.cat([getattr(part, name) for part in self.parts]).index_select(0, self.order)

    def consolidated(self) -> ExpertLoRA:
        """One ordinary ExpertLoRA holding the same factors (for the final adapter)."""
        plain = self.parts[0].with_experts(self.selected_experts, self.num_experts)
        with torch.no_grad():
            for name, _, _ in plain._factors():
                for suffix in ("_A", "_B"):
                    getattr(plain, name + suffix).copy_(self._stacked(name + suffix))
        return plain


def _factor_property(name: str) -> property:
    return property(lambda self: self._stacked(name))


for _name in _FACTORS:
    setattr(GrownExpertLoRA, _name, _factor_property(_name))


def grow_experts(model: nn.Module, new: dict[int, list[int]], *, seed: int, step: int) -> list[nn.Parameter]:
    """Add fresh adapters to ``new`` experts ({layer id: ids}) of an adapted model; returns the new parameters."""
    state = model.moe_sieve
    spec = get_arch(model)
    config = state.config
    added: list[nn.Parameter] = []
    for layer in find_moe_layers(model, spec):
        ids = sorted(set(new.get(layer.layer_id, [])) - set(state.experts[layer.layer_id]))
        if not ids:
            continue
        with _seeded(seed, step, layer.layer_id):
            if layer.layout.storage == "fused":
                current = layer.experts.sieve_lora
                part = fused_expert_lora(layer, ids, config)
                parts = list(current.parts) if isinstance(current, GrownExpertLoRA) else [current]
                layer.experts.sieve_lora = GrownExpertLoRA([*parts, part])
                params = list(part.parameters())
            else:
                params = wrap_listed_experts(model, layer, ids, spec, config)
        for p in params:
            p.requires_grad_(True)
        state.experts[layer.layer_id] = sorted(state.experts[layer.layer_id] + ids)
        state.modules.append(
            AdaptedModule("experts", layer.layer_id, layer.experts_name, sum(p.numel() for p in params), ids)
        )
        added += params
    verify_adapters(model)
    return added


def consolidate(model: nn.Module) -> None:
    """Replace every grown fused adapter with an ordinary one holding the same factors."""
    for layer in find_moe_layers(model):
        lora = getattr(layer.experts, "sieve_lora", None)
        if isinstance(lora, GrownExpertLoRA):
            layer.experts.sieve_lora = lora.consolidated()
    verify_adapters(model)


def extend_optimizer(trainer: Any, model: nn.Module) -> None:
    """Put newly trainable parameters into the AdamW groups a fresh ``Trainer.create_optimizer`` would give them,
    in its order (``named_parameters``), so optimizer checkpoints of the grown model load into a resumed run.
    New tensors have no optimizer state yet: AdamW initialises it (zero moments, step 0) on their first step."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    decay = set(trainer.get_decay_parameter_names(model))
    wanted = [
        [p for n, p in model.named_parameters() if n in decay and p.requires_grad],
        [p for n, p in model.named_parameters() if n not in decay and p.requires_grad],
    ]
    groups = optimizer.param_groups
    if len(groups) != 2:
        raise RuntimeError(f"--reselect grow expects Trainer's two AdamW parameter groups, found {len(groups)}")
    for group, params in zip(groups, wanted, strict=True):
        missing = {id(p) for p in group["params"]} - {id(p) for p in params}
        if missing:
            raise RuntimeError("--reselect grow: a trained parameter left the optimizer")
        group["params"] = params


class Regrower(TrainerCallback):
    """Grows the adapter at the monitor's measurements and records the events."""

    def __init__(self, model: nn.Module, monitor: Any, run_dir: Path, state: Any, seed: int = 0) -> None:
        if state.num_processes > 1:
            raise ValueError("--reselect grow runs in one process (DDP/FSDP wrap the parameter set once)")
        self.model = model
        self.monitor = monitor
        self.path = Path(run_dir) / RESELECT_FILE
        self.seed = seed
        self.events: list[dict[str, Any]] = []
        self.layer_ids = list(monitor.layer_ids)

    def attach(self) -> Regrower:
        self.monitor.on_measure = self.on_measure
        return self

    def _apply(self, step: int, new: dict[int, list[int]]) -> list[nn.Parameter]:
        params = grow_experts(self.model, new, seed=self.seed, step=step)
        for i, layer in enumerate(self.layer_ids):
            self.monitor.selected_LE[i, new.get(layer, [])] = True
        return params

    def on_measure(self, step: int, counts_LE: np.ndarray, figures: dict[str, np.ndarray]) -> None:
        adapted = self.monitor.selected_LE
        new = {
            layer: np.flatnonzero(figures["top_LE"][i] & ~adapted[i]).tolist() for i, layer in enumerate(self.layer_ids)
        }
        new = {layer: ids for layer, ids in new.items() if ids}
        trainer = self.monitor.trainer
        if not new or step >= trainer.state.max_steps:  # an adapter added at the last step would never train
            return
        self._apply(step, new)
        extend_optimizer(trainer, self.model)
        self.events.append({"step": step, "experts": {str(k): v for k, v in new.items()}})
        if self.monitor.is_main_process:
            atomic_write_json(self.path, {"events": self.events})

    def replay(self, up_to_step: int) -> None:
        """Rebuild the grown adapter of a resumed run before its checkpoint is loaded."""
        if not self.path.exists():
            return
        events = json.loads(self.path.read_text(encoding="utf-8"))["events"]
        self.events = [e for e in events if e["step"] <= up_to_step]
        for event in self.events:
            self._apply(event["step"], {int(k): v for k, v in event["experts"].items()})

    def on_train_end(self, args, state, control, **kwargs):
        consolidate(self.model)

    def record(self) -> dict[str, Any]:
        """What the final adapter records about growth."""
        return {"reselect": {"mode": "grow", "events": self.events}}
