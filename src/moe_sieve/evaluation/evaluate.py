"""Loading a task's evaluation rows and dispatching to its metric (paper §5.1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.tasks import TASKS, _format_rows, _load_task_rows, _select, check_selection_args, get_task
from .common import EvalResult
from .llm_adapters import TEST_SETS as LLM_ADAPTERS_TEST_SETS
from .llm_adapters import TRAINING_MIXES as LLM_ADAPTERS_TRAINING_MIXES

# Fine-tuning defaults to each task's train split; evaluation to its held-out one (HellaSwag's test split has
# no labels, Spider's test databases are not public). LLM-Adapters keeps each test set in dataset/<name>/test.json.
EVAL_SPLITS = {
    "gsm8k": "test",
    "facts": "test",
    "hellaswag": "validation",
    "spider": "validation",
    **dict.fromkeys(LLM_ADAPTERS_TEST_SETS, "test"),
}
EVAL_TASKS = tuple(EVAL_SPLITS)
DEFAULT_MAX_NEW_TOKENS = 128  # GSM8K and Spider; the LLM-Adapters sets use their scripts' budgets (32 / 256)


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
    if name in LLM_ADAPTERS_TRAINING_MIXES:
        raise ValueError(
            f"--data {data!r}: {name} is an LLM-Adapters training mix (no single answer format); evaluate on its "
            f"test sets instead: {', '.join(t for t in LLM_ADAPTERS_TEST_SETS if t.startswith(name[:4]))} (NAME:PATH)"
        )
    if name not in EVAL_SPLITS:
        raise ValueError(f"task {name!r} has no evaluator; evaluable tasks: {', '.join(EVAL_TASKS)}")
    if path is None and name in LLM_ADAPTERS_TEST_SETS:
        raise ValueError(
            f"--data {data!r}: the LLM-Adapters test sets are not on the Hugging Face hub; pass {name}:PATH "
            "(dataset/<name>/test.json of github.com/AGI-Edgerunners/LLM-Adapters, or its folder)"
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
    return (split or EVAL_SPLITS[name]) if path is None or path.is_dir() else split


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
    dataset, origin = _load_task_rows(spec, path, split)
    if len(dataset) == 0:
        raise ValueError(f"{origin}: no examples")
    indices = _select(len(dataset), None, max_examples, 0)
    rows = [dict(row) for row in dataset.select(indices)]
    examples = _format_rows(rows, indices, origin, spec, fmt)
    for row, example in zip(rows, examples, strict=True):
        row["_source"] = example.source
        row["_prompt"], row["_completion"] = example.prompt, example.completion
    return name, rows


def evaluate(
    model: Any,
    tokenizer: Any,
    data: str,
    *,
    split: str | None = None,
    max_examples: int | None = None,
    spider_dir: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    timeout_s: float = 5.0,
    keep_distinct: bool = False,
    progress: bool = True,
    likelihood: bool = True,
) -> EvalResult:
    """Evaluate ``model`` on ``data`` (``gsm8k``, ``hellaswag``, ``spider`` or ``TASK:PATH``, including the
    LLM-Adapters test sets ``commonsense-*:PATH`` / ``math-*:PATH``) with its metric.

    ``max_new_tokens`` defaults to 128 for GSM8K and Spider, 4 for the facts task and to LLM-Adapters' own
    budgets for its test sets. With ``likelihood`` (every task but HellaSwag, which already scores by
    likelihood), the gold completions are also scored by teacher forcing (``evaluation.likelihood``): the
    aggregates go to ``result.metrics``, each row's values to its prediction."""
    from .facts import MAX_NEW_TOKENS as FACTS_MAX_NEW_TOKENS
    from .facts import evaluate_facts
    from .gsm8k import evaluate_gsm8k
    from .hellaswag import evaluate_hellaswag
    from .llm_adapters import evaluate_llm_adapters
    from .spider import evaluate_spider

    name, path = _parse_data(data)
    spider_dir = _resource_dir(name, path, spider_dir)
    task, rows = load_task_rows(data, split, max_examples, spider_dir=spider_dir)
    budget = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    if task in LLM_ADAPTERS_TEST_SETS:
        result = evaluate_llm_adapters(
            model, tokenizer, task, rows, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
        )
    elif task == "gsm8k":
        result = evaluate_gsm8k(model, tokenizer, rows, max_new_tokens=budget, batch_size=batch_size, progress=progress)
    elif task == "facts":
        result = evaluate_facts(
            model,
            tokenizer,
            rows,
            max_new_tokens=FACTS_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens,
            batch_size=batch_size,
            progress=progress,
        )
    elif task == "hellaswag":
        result = evaluate_hellaswag(model, tokenizer, rows, batch_size=batch_size, progress=progress)
    else:
        assert spider_dir is not None  # load_task_rows refuses spider without its schemas
        result = evaluate_spider(
            model,
            tokenizer,
            rows,
            spider_dir=spider_dir,
            max_new_tokens=budget,
            batch_size=batch_size,
            timeout_s=timeout_s,
            keep_distinct=keep_distinct,
            progress=progress,
        )
    if likelihood and task != "hellaswag":
        add_likelihoods(model, tokenizer, task, rows, result, batch_size=batch_size, progress=progress)
    norm = {} if result.accuracy_norm is None else {"accuracy_norm": result.accuracy_norm}
    result.metrics = {"accuracy": result.accuracy, **norm, **result.metrics}
    result.metadata.update({"data": data, "split": _eval_split(name, path, split), "max_examples": max_examples})
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
    predictions (matched by ``source``) and the aggregates in ``result.metrics``."""
    from .gsm8k import result_spans
    from .likelihood import likelihood_metrics, score_gold

    pairs = [(row["_prompt"], row["_completion"]) for row in rows]
    scored = score_gold(
        model,
        tokenizer,
        pairs,
        batch_size=batch_size,
        progress=progress,
        result_spans=result_spans if task == "gsm8k" else None,
    )
    by_source = {row["_source"]: values for row, values in zip(rows, scored, strict=True)}
    for prediction in result.predictions:
        prediction.update(by_source.get(prediction.get("source"), {}))
    result.metrics.update(likelihood_metrics(scored))
