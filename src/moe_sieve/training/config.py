"""Typed configuration of ``moe-sieve train`` (defaults follow the paper's §5.1) and YAML presets."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..adapters.config import LoraOptions, lora_field
from ..adapters.methods import get_adapter_method, method_help
from ..selection import STRATEGIES as SELECTION_STRATEGIES
from ..selection import strategy_help

# Train-level choices beside the selection strategies: which experts get adapters when none are selected.
EXPERTS_WITHOUT_SELECTION = {"full": "all", "none": "none"}
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


def train_strategies() -> tuple[str, ...]:
    """What ``--strategy`` accepts: full (every expert), each registered selection strategy, none."""
    return ("full", *SELECTION_STRATEGIES, "none")


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if default is dataclasses.MISSING:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


EP_WITH_FSDP = (
    "--ep-size with --fsdp: transformers' expert-parallel engine applies FSDP2 itself (dense modules over all "
    "processes, each rank's experts over fsdp/ep copies); drop --fsdp"
)


def _check_types(config: Any) -> None:
    """Numeric, boolean and list fields have their annotated type (YAML presets and sweep files give strings as
    easily as numbers): a wrong one is an error naming the key; a number written as a string (``2e-4``) is read
    as that number."""
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), _HINTS[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if value is None and type(None) in args:
            continue  # optional and unset
        kind = next(a for a in args if a is not type(None))
        kind = typing.get_origin(kind) or kind
        where = f"{f.name} (--{f.name.replace('_', '-')})"
        if kind is bool and not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
            whole = value.is_integer() if isinstance(value, float) else str(value).strip().lstrip("+-").isdigit()
            if isinstance(value, bool) or not isinstance(value, float | str) or not whole:
                raise ValueError(f"{where} must be an integer, got {value!r}")
            value = int(value)
        if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where} must be a number, got {value!r}") from None
        if kind is str and isinstance(value, os.PathLike):
            value = os.fspath(value)
        if kind is tuple:
            value = tuple(t for t in value.split(",") if t) if isinstance(value, str) else value
            if not isinstance(value, list | tuple) or not all(isinstance(t, str) for t in value):
                raise ValueError(f"{where} must be a list of names, got {value!r}")
        setattr(config, f.name, value)


@dataclass
class TrainConfig:
    """One fine-tuning run: profile -> select -> LoRA fine-tune, all in ``out``."""

    model: str = _help("Hub id or local directory of the base MoE model.")
    data: str = _help("Task (gsm8k, hellaswag, spider), TASK:PATH, or a local JSONL (prompt/completion or messages).")
    out: str = _help("Run directory: profile, selection, checkpoints, adapter and metrics are written here.")
    split: str | None = _help("Training split (the task's default when unset).", None)
    max_examples: int | None = _help("Train on at most this many examples.", None)
    spider_dir: str | None = _help("Spider directory holding tables.json.", None)
    # selection
    strategy: str = _help(
        f"full (LoRA on all experts), a selection strategy: {strategy_help()}; or none (no routed expert).", "topk"
    )
    k: str = _help("Experts per layer: a count or a share of the routed experts.", "25%")
    rank_by: str = _help("Rank experts by routed-token count or routing mass.", "count")
    selection: str | None = _help("Use this selection JSON instead of profiling.", None)
    profile: str | None = _help("Use this profile directory instead of profiling again.", None)
    profile_subsample: float = _help("Share of the training examples profiled.", 0.1)
    coverage: float = _help("Target share for --strategy coverage.", 0.6)
    min_per_layer: int | None = _help("Greedy: experts every layer starts with (default: the model's top-k).", None)
    hot: str | None = _help("hot+filler: top experts kept per layer, a count or share (default: half of k).", None)
    # LoRA
    r: int = lora_field("r", "LoRA rank (routed: also the parallel adapter's width); one default for both methods.")
    alpha: float = lora_field("alpha", "LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = lora_field("dropout", "LoRA dropout.")
    targets: tuple[str, ...] = _help("Module groups to adapt.", ("attention", "router", "shared", "experts"))
    train_tokens: str = _help(
        "Also train the input-embedding and output-head rows of these tokens (row deltas saved with the adapter): "
        "none, auto (completion tokens whose rows look untrained, which train warns about), or a comma list of "
        "tokens and ids (may include auto).",
        "none",
    )
    # Routed-PEFT (--method routed): adapters only; --r/--alpha/--dropout size them, --strategy picks E's experts
    method: str = _help(f"Adapter method: {method_help()}.", "sieve")
    variant: str = _help("routed: S, D, R or E (E: experts from --strategy; full = all experts).", "E")
    adapter_type: str = _help("routed: lora or parallel adapters.", "lora")
    num_adapters: int = _help("routed: N adapters per MoE layer for D and R.", 4)
    top_k_adapters: int = _help("routed: K adapters per token for R.", 2)
    aux_loss_coef: float = _help("routed: weight of R's load-balancing loss.", 0.01)
    # optimisation
    learning_rate: float = _help("Peak AdamW learning rate.", 2e-4)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    epochs: float = _help("Training epochs (ignored when max_steps > 0).", 3.0)
    max_steps: int = _help("Stop after this many optimizer steps (-1: use epochs).", -1)
    batch_size: int = _help("Effective batch size (examples per optimizer step, all devices).", 64)
    micro_batch_size: int = _help("Examples per device per forward pass.", 8)
    warmup: float = _help("Warmup: a ratio of the total steps (< 1) or a number of steps.", 0.03)
    scheduler: str = _help("Learning-rate schedule (transformers name: linear, cosine, constant...).", "linear")
    max_length: int = _help("Longest example in tokens.", 1024)
    overflow: str = _help("Over-long examples: truncate (keep the start) or drop.", "truncate")
    seed: int = _help("Seed of data order, LoRA initialisation, dropout and random selection.", 0)
    gradient_checkpointing: bool = _help("Recompute activations in backward to save memory.", False)
    dtype: str = _help("Model dtype: auto (bf16 on CUDA, fp32 on CPU), bfloat16, float32.", "auto")
    device: str = _help("auto, cpu or cuda (ignored under accelerate/torchrun, which pick it).", "auto")
    logging_steps: int = _help("Log loss and tokens/s every this many steps.", 10)
    save_steps: int = _help("Checkpoint (adapter + optimizer) every this many steps.", 100)
    save_total_limit: int | None = _help("Keep at most this many checkpoints.", 2)
    report_to: str = _help("none, tensorboard, wandb or mlflow: loss, LR, tokens/s, routing coverage.", "none")
    trust_remote_code: bool = _help("Run the model repository's own code.", False)
    experts_implementation: str | None = _help("transformers experts backend for the base model.", None)
    fsdp: str = _help("FSDP option string passed to transformers (e.g. 'full_shard auto_wrap'); empty: off.", "")
    ep_size: int = _help(
        "Expert-parallel ranks (transformers' DistributedConfig engine, FSDP2 over all processes); 1: off. Each "
        "hot expert's LoRA lives on the rank owning the expert (docs/distributed.md).",
        1,
    )
    # speed (training/packing.py, training/fused_loss.py): both leave the loss and gradients unchanged
    packing: bool = _help(
        "Padding-free micro-batches: concatenate each micro-batch's examples into one row (position_ids restart "
        "per example, no cross-example attention). Pays off with flash-attention or short, uneven examples.",
        False,
    )
    fused_ce: str = _help(
        "Fused linear + cross-entropy so the vocab logits are never built: auto (liger, then cce, when installed "
        "and on CUDA; else the plain loss, logged), off, liger (Liger-Kernel) or cce (cut-cross-entropy).",
        "auto",
    )
    # routing while training (training/monitor.py, training/reselect.py)
    monitor_every: int = _help("Measure routing drift on fixed training batches every N steps (0: off).", 25)
    monitor_examples: int = _help("Training examples (seeded, fixed before training) the drift monitor routes.", 32)
    router: str = _help("Router training: lora (paper), freeze, or full (train the router weights).", "lora")
    router_aux_loss: float = _help("Add the model's load-balancing loss times this coefficient (0: off).", 0.0)
    reselect: str = _help("off, or grow: add fresh adapters to experts that enter the top-k at monitor steps.", "off")

    def __post_init__(self) -> None:
        _check_types(self)
        self.targets = tuple(self.targets)
        if self.strategy not in train_strategies():
            raise ValueError(f"--strategy {self.strategy!r}: choose one of {', '.join(train_strategies())}")
        LoraOptions(self.r, self.alpha, self.dropout)  # the shared checks, before any model loads
        if self.rank_by not in ("count", "mass"):
            raise ValueError(f"--rank-by must be count or mass, got {self.rank_by!r}")
        if self.overflow not in ("truncate", "drop"):
            raise ValueError(f"--overflow must be truncate or drop, got {self.overflow!r}")
        if not 0 < self.profile_subsample <= 1:
            raise ValueError(f"--profile-subsample must be in (0, 1], got {self.profile_subsample}")
        for name in ("batch_size", "micro_batch_size", "max_length", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 2:
            raise ValueError("--max-length must be >= 2: a causal LM learns a token only from the tokens before it")
        if self.strategy in SELECTION_STRATEGIES and SELECTION_STRATEGIES[self.strategy].uses_k:
            from ..routing_stats import check_k

            check_k(self.k, "--k")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"--batch-size {self.batch_size} must be a multiple of --micro-batch-size {self.micro_batch_size}"
            )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.monitor_every < 0:
            raise ValueError(f"--monitor-every must be >= 0, got {self.monitor_every}")
        if self.monitor_examples < 1:
            raise ValueError(f"--monitor-examples must be >= 1, got {self.monitor_examples}")
        if self.router not in ("lora", "freeze", "full"):
            raise ValueError(f"--router must be lora, freeze or full, got {self.router!r}")
        if self.router_aux_loss < 0:
            raise ValueError(f"--router-aux-loss must be >= 0, got {self.router_aux_loss}")
        if self.ep_size < 1:
            raise ValueError(f"--ep-size must be >= 1, got {self.ep_size}")
        if self.ep_size > 1 and self.fsdp:
            raise ValueError(EP_WITH_FSDP)
        if self.ep_size > 1 and self.reselect != "off":
            raise ValueError("--reselect grow cannot run under --ep-size: the engine shards the parameter set once")
        if self.reselect not in ("off", "grow"):
            raise ValueError(f"--reselect must be off or grow, got {self.reselect!r}")
        if self.reselect == "grow" and (self.monitor_every < 1 or self.experts_mode != "selected"):
            raise ValueError("--reselect grow needs --monitor-every >= 1 and a selecting --strategy (topk, ...)")
        if self.max_steps < 1 and self.epochs <= 0:
            raise ValueError("give --epochs > 0 or --max-steps >= 1")
        from .fused_loss import FUSED_CE_CHOICES

        if self.fused_ce not in FUSED_CE_CHOICES:
            raise ValueError(f"--fused-ce must be one of {', '.join(FUSED_CE_CHOICES)}, got {self.fused_ce!r}")
        if isinstance(self.train_tokens, (list, tuple)):  # a YAML list of tokens and ids
            self.train_tokens = ",".join(str(t) for t in self.train_tokens)
        if not isinstance(self.train_tokens, str) or not self.train_tokens.strip():
            raise ValueError(f"--train-tokens must be none, auto or a comma list of tokens, got {self.train_tokens!r}")
        method = get_adapter_method(self.method)  # --method must be one of the registered methods
        if self.train_tokens.strip() != "none" and not method.token_rows:
            raise ValueError(f"--train-tokens needs --method sieve ({method.label} adapters hold no token rows)")
        method.train_checks(self)  # e.g. routed: --variant, --adapter-type, --num-adapters, --top-k-adapters

    def adapter_config(self) -> Any:
        """The adapter config of ``--method`` (SieveLoraConfig, RoutedAdapterConfig, ...) for these options."""
        return get_adapter_method(self.method).from_train(self)

    @property
    def strategy_experts(self) -> str:
        """The routed experts ``--strategy`` adapts: all (full), none, or the selected ones."""
        return EXPERTS_WITHOUT_SELECTION.get(self.strategy, "selected")

    @property
    def experts_mode(self) -> str:
        """The routed experts that get adapters; a method may override the strategy's (routed S/D/R: none)."""
        return get_adapter_method(self.method).experts_mode(self) or self.strategy_experts

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; known: {', '.join(cls.__dataclass_fields__)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """A preset file (or a name from ``moe_sieve/presets``) with command-line overrides on top."""
        path = Path(path)
        if not path.exists() and (PRESET_DIR / f"{path.name}.yaml").exists():
            path = PRESET_DIR / f"{path.name}.yaml"
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"{path}: cannot read preset ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a preset is a mapping of option names to values")
        return cls.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}}, source=str(path))


_HINTS = typing.get_type_hints(TrainConfig)
