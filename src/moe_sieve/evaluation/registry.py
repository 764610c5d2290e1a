"""Evaluation tasks as a registry: how each task is scored, on which split, with which generation budget.

Each task's module registers its scorer (``register_eval_task``) next to the scoring code, so ``evaluate``, the
sweep and ``moe-sieve eval`` dispatch on the record, never on the task's name. Adding a task is its own module
with one ``register_eval_task`` call, imported by ``moe_sieve.evaluation``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .common import EvalResult
    from .likelihood import SpanFinder


@dataclass(frozen=True)
class ScoreContext:
    """What a scorer needs beyond the model and the rows: the options of this evaluation, resolved."""

    task: str
    max_new_tokens: int | None
    """The generation budget: the caller's, else the task's own; None for a task that does not generate."""
    batch_size: int
    progress: bool
    resource_dir: str | None = None
    """The task's resource folder when it has one (Spider: tables.json and database/)."""
    keep_distinct: bool = False
    timeout_s: float = 5.0


Scorer = Callable[[Any, Any, list[dict[str, Any]], ScoreContext], "EvalResult"]


@dataclass(frozen=True)
class EvalTask:
    """A registered evaluation task (its rows come from the data task of the same name, ``data.tasks``).

    ``split``: the held-out split read by default from the hub or a dataset folder; ``max_new_tokens``: the
    generation budget when the caller gives none (None: scored by likelihood, never generates); ``result_spans``:
    character spans of the gold completion scored on their own (``result_*`` likelihood metrics);
    ``gold_likelihood``: also score the gold completion by teacher forcing (off where the metric already is a
    likelihood); ``local_only``: where the rows are, for a task not on the hub (it then needs ``NAME:PATH``).
    """

    name: str
    score: Scorer
    split: str
    max_new_tokens: int | None = None
    result_spans: SpanFinder | None = None
    gold_likelihood: bool = True
    local_only: str | None = None

    def budget(self, max_new_tokens: int | None = None) -> int | None:
        """The generation budget of a run asked for ``max_new_tokens`` (None: the task's own); None where the
        task does not generate."""
        if self.max_new_tokens is None:
            return None
        return self.max_new_tokens if max_new_tokens is None else max_new_tokens


EVAL_TASKS: dict[str, EvalTask] = {}
# Data tasks that have no evaluator on purpose, and what to evaluate instead (LLM-Adapters' training mixes).
NOT_EVALUABLE: dict[str, str] = {}


def register_eval_task(
    name: str,
    score: Scorer,
    *,
    split: str,
    max_new_tokens: int | None = None,
    result_spans: SpanFinder | None = None,
    gold_likelihood: bool = True,
    local_only: str | None = None,
) -> EvalTask:
    """Add (or replace) the evaluator of the data task ``name`` (``--data NAME`` / ``NAME:PATH``)."""
    task = EvalTask(name, score, split, max_new_tokens, result_spans, gold_likelihood, local_only)
    EVAL_TASKS[name] = task
    return task


def register_not_evaluable(name: str, why: str) -> None:
    """Say why the data task ``name`` has no evaluator (the error ``eval --data NAME`` prints)."""
    NOT_EVALUABLE[name] = why


def get_eval_task(name: str) -> EvalTask:
    try:
        return EVAL_TASKS[name]
    except KeyError:
        raise ValueError(f"task {name!r} has no evaluator; evaluable tasks: {', '.join(EVAL_TASKS)}") from None


class _Splits(Mapping[str, str]):
    """Task name -> held-out split, read from the registry (so a task registered later is in it too)."""

    def __getitem__(self, name: str) -> str:
        return EVAL_TASKS[name].split

    def __iter__(self) -> Iterator[str]:
        return iter(EVAL_TASKS)

    def __len__(self) -> int:
        return len(EVAL_TASKS)

    def __repr__(self) -> str:
        return repr(dict(self))


EVAL_SPLITS: Mapping[str, str] = _Splits()
