"""Typed configuration of ``moe-sieve train`` (defaults follow the paper's §5.1) and YAML presets."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

STRATEGIES = ("full", "topk", "random", "greedy", "coverage", "hot+filler", "none")
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if default is dataclasses.MISSING:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


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
    strategy: str = _help("full (LoRA on all experts), topk (MoE-Sieve), random, greedy, coverage, none.", "topk")
    k: str = _help("Experts per layer: a count or a share of the routed experts.", "25%")
    rank_by: str = _help("Rank experts by routed-token count or routing mass.", "count")
    selection: str | None = _help("Use this selection JSON instead of profiling.", None)
    profile: str | None = _help("Use this profile directory instead of profiling again.", None)
    profile_subsample: float = _help("Share of the training examples profiled.", 0.1)
    coverage: float = _help("Target share for --strategy coverage.", 0.6)
    min_per_layer: int | None = _help("Greedy: experts every layer starts with (default: the model's top-k).", None)
    hot: str | None = _help("hot+filler: top experts kept per layer, a count or share (default: half of k).", None)
    # LoRA
    r: int = _help("LoRA rank.", 32)
    alpha: float = _help("LoRA alpha.", 64.0)
    dropout: float = _help("LoRA dropout.", 0.05)
    targets: tuple[str, ...] = _help("Module groups to adapt.", ("attention", "router", "shared", "experts"))
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

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.rank_by not in ("count", "mass"):
            raise ValueError(f"--rank-by must be count or mass, got {self.rank_by!r}")
        if self.overflow not in ("truncate", "drop"):
            raise ValueError(f"--overflow must be truncate or drop, got {self.overflow!r}")
        if not 0 < self.profile_subsample <= 1:
            raise ValueError(f"--profile-subsample must be in (0, 1], got {self.profile_subsample}")
        for name in ("batch_size", "micro_batch_size", "max_length", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"--batch-size {self.batch_size} must be a multiple of --micro-batch-size {self.micro_batch_size}"
            )
        if self.learning_rate <= 0:
            raise ValueError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.max_steps < 1 and self.epochs <= 0:
            raise ValueError("give --epochs > 0 or --max-steps >= 1")

    @property
    def experts_mode(self) -> str:
        return {"full": "all", "none": "none"}.get(self.strategy, "selected")

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
