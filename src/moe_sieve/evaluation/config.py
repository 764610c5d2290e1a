"""Typed configuration of one held-out evaluation, shared by ``moe-sieve eval``, ``evaluate`` and the sweep."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class EvalConfig:
    """What to score and how: the options of ``moe-sieve eval`` and of a sweep's ``eval`` settings (the sweep's
    ``EvalSettings`` adds its own few). Defaults that depend on the task (split, generation budget) come from the
    task's registered record (``evaluation.registry``), so eval and sweep cannot disagree on them."""

    data: str | None = _help(
        "A task (gsm8k, hellaswag, spider, facts), TASK:PATH for that task's rows in local files, or an "
        "LLM-Adapters test set NAME:PATH.",
        None,
    )
    split: str | None = _help("Split (default: the task's evaluation split).", None)
    max_examples: int | None = _help("Evaluate at most this many examples.", None)
    batch_size: int = _help("Prompts per batch.", 8)
    max_new_tokens: int | None = _help(
        "Generation budget (default: the task's own: 128 for GSM8K and Spider, 4 for facts, LLM-Adapters' 32 "
        "for commonsense and 256 for math test sets).",
        None,
    )
    spider_dir: str | None = _help("Spider directory (tables.json, database/).", None)
    keep_distinct: bool = _help("Spider: keep DISTINCT when comparing (the official default removes it).", False)

    def __post_init__(self) -> None:
        for name in ("max_examples", "batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if value is None and name != "batch_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"eval {name} (--{name.replace('_', '-')}) must be an integer >= 1, got {value!r}")
        if not isinstance(self.keep_distinct, bool):
            raise ValueError(f"eval keep_distinct (--keep-distinct) must be true or false, got {self.keep_distinct!r}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalConfig:
        """The settings of ``cls`` in ``data`` (other keys, such as the sweep's ``also``, are left out); absent
        ones take their default (a record written before the option existed)."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
