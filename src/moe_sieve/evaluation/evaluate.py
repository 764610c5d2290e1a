"""Loading a task's evaluation rows and scoring them with the task's registered evaluator (paper §5.1)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..data.tasks import TASKS, check_selection_args, format_rows, get_task, load_task_dataset, select_indices
from .common import EvalResult
from .config import EvalConfig
from .registry import EVAL_TASKS, NOT_EVALUABLE, ScoreContext, get_eval_task


def _parse_data(data: str) -> tuple[str, Path | None]:
    """``TASK`` (hub) or ``TASK:PATH`` (local files in the hub schema) -> task name and path."""
    if data in TASKS:
        name, path = data, None
    else:
        name, sep, rest = data.partition(":")
        if not (sep and name in TASKS and rest):
            raise ValueError(
                f"--data {data!r}: evaluation needs a task ({', '.join(EVAL_TASKS)}) or TASK:PATH "
                "(a .jsonl/.json/.parquet/.csv file or a dataset directory in the hub schema)"
            )
        path = Path(rest)
    if name in NOT_EVALUABLE:
        raise ValueError(f"--data {data!r}: {NOT_EVALUABLE[name]}")
    spec = get_eval_task(name)
    if path is None and spec.local_only is not None:
        raise ValueError(
            f"--data {data!r}: {name} is not on the Hugging Face hub; pass {name}:PATH ({spec.local_only})"
        )
    return name, path


def check_eval_data(data: str) -> str:
    """The task ``data`` would be scored as; raises the one-line error ``evaluate`` would raise about ``data``
    itself (no such evaluator, a training mix, a test set without its file), before anything is trained."""
    return _parse_data(data)[0]


def _resource_dir(name: str, path: Path | None, resource_dir: str | None) -> str | None:
    """The explicit directory, else the data's own folder when it holds the task's resource file (as
    ``load_examples`` does: Spider's release keeps tables.json and database/ next to its rows)."""
    resource_file = get_task(name).resource_file
    if resource_dir is None and path is not None and resource_file is not None:
        folder = path if path.is_dir() else path.parent
        if (folder / resource_file).is_file():
            return str(folder)
    return resource_dir


def _eval_split(name: str, path: Path | None, split: str | None) -> str | None:
    """The split to read: as given, else the held-out one; a single file is its own split (None)."""
    return (split or get_eval_task(name).split) if path is None or path.is_dir() else split


def load_task_rows(
    data: str, split: str | None = None, max_examples: int | None = None, spider_dir: str | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """``(task name, raw rows)``: the evaluators need a row's own fields (gold answer, endings and label, db_id
    and gold query), not only the prompt/completion pair.

    Rows are read and validated exactly as ``load_examples`` reads them (same loaders, same errors); each
    row gains ``_source`` (``origin:index``, as ``Example.source``). ``split`` defaults to the task's held-out
    split (``EVAL_SPLITS``) for hub data and dataset directories; a single file is its own split.
    """
    check_selection_args(None, max_examples)
    name, path = _parse_data(data)
    spec = get_task(name)
    split = _eval_split(name, path, split)
    fmt = spec.formatter(_resource_dir(name, path, spider_dir))
    dataset, origin = load_task_dataset(spec, path, split)
    if len(dataset) == 0:
        raise ValueError(f"{origin}: no examples")
    indices = select_indices(len(dataset), None, max_examples, 0)
    rows = [dict(row) for row in dataset.select(indices)]
    examples = format_rows(rows, indices, origin, spec, fmt)
    for row, example in zip(rows, examples, strict=True):
        row["_source"] = example.source
        row["_prompt"], row["_completion"] = example.prompt, example.completion
    return name, rows


def evaluate(
    model: Any,
    tokenizer: Any,
    data: str | EvalConfig,
    *,
    split: str | None = None,
    max_examples: int | None = None,
    spider_dir: str | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    timeout_s: float = 5.0,
    keep_distinct: bool | None = None,
    progress: bool = True,
    likelihood: bool = True,
) -> EvalResult:
    """Evaluate ``model`` on ``data`` (``gsm8k``, ``hellaswag``, ``spider`` or ``TASK:PATH``, including the
    LLM-Adapters test sets ``commonsense-*:PATH`` / ``math-*:PATH``) with its metric.

    ``data`` is a data string or an :class:`EvalConfig`; the options given here (not None) set or override its
    fields, the others keep ``EvalConfig``'s defaults. ``max_new_tokens`` defaults to the task's own budget
    (``EVAL_TASKS[name].max_new_tokens``; LLM-Adapters' test sets have their scripts'). With ``likelihood`` (every
    task whose metric is not a likelihood already, i.e. all but HellaSwag), the gold completions are also scored
    by teacher forcing (``evaluation.likelihood``): the aggregates go to ``result.metrics``, each row's values to
    its prediction."""
    options = {
        "split": split,
        "max_examples": max_examples,
        "spider_dir": spider_dir,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "keep_distinct": keep_distinct,
    }
    given = {name: value for name, value in options.items() if value is not None}
    config = dataclasses.replace(data, **given) if isinstance(data, EvalConfig) else EvalConfig(data=data, **given)
    if config.data is None:
        raise ValueError("evaluate: no data to evaluate (EvalConfig.data is unset)")
    name, path = _parse_data(config.data)
    spec = get_eval_task(name)
    resource_dir = _resource_dir(name, path, config.spider_dir)
    task, rows = load_task_rows(config.data, config.split, config.max_examples, spider_dir=resource_dir)
    context = ScoreContext(
        task=task,
        max_new_tokens=spec.budget(config.max_new_tokens),
        batch_size=config.batch_size,
        progress=progress,
        resource_dir=resource_dir,
        keep_distinct=config.keep_distinct,
        timeout_s=timeout_s,
    )
    result = spec.score(model, tokenizer, rows, context)
    if likelihood and spec.gold_likelihood:
        add_likelihoods(model, tokenizer, task, rows, result, batch_size=config.batch_size, progress=progress)
    norm = {} if result.accuracy_norm is None else {"accuracy_norm": result.accuracy_norm}
    result.metrics = {"accuracy": result.accuracy, **norm, **result.metrics}
    split_read = _eval_split(name, path, config.split)
    result.metadata.update({"data": config.data, "split": split_read, "max_examples": config.max_examples})
    return result


def add_likelihoods(
    model: Any,
    tokenizer: Any,
    task: str,
    rows: list[dict[str, Any]],
    result: EvalResult,
    *,
    batch_size: int,
    progress: bool,
) -> None:
    """Score each row's gold completion (as fine-tuning formats it) and record the per-row values in the
    predictions (matched by ``source``) and the aggregates in ``result.metrics``; a task with ``result_spans``
    also gets the ``result_*`` metrics of those spans."""
    from .likelihood import likelihood_metrics, score_gold

    pairs = [(row["_prompt"], row["_completion"]) for row in rows]
    scored = score_gold(
        model,
        tokenizer,
        pairs,
        batch_size=batch_size,
        progress=progress,
        result_spans=get_eval_task(task).result_spans,
    )
    by_source = {row["_source"]: values for row, values in zip(rows, scored, strict=True)}
    for prediction in result.predictions:
        prediction.update(by_source.get(prediction.get("source"), {}))
    result.metrics.update(likelihood_metrics(scored))
