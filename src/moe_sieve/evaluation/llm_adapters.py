"""The LLM-Adapters test sets (8 commonsense, 6 math) as Routed-PEFT scores them: a greedy answer to the
Alpaca prompt, parsed and judged by ``data.llm_adapters`` (LLM-Adapters' ``commonsense_evaluate.py`` /
``evaluate.py`` rules), accuracy per task.

LLM-Adapters decodes prompt + generation and keeps ``text.split("### Response:")[1].strip()``: the generation up
to a second ``### Response:``. Generation here stops at that string and the completion is cut there, which is the
same text. Differences from those scripts, on purpose: greedy decoding (the paper's setting; the scripts default
to 4-beam search), the row's ``input`` is kept in the prompt when non-empty (as fine-tuning formats it; the
released test sets have it empty), and a gold ``answer`` given as a one-element list (older releases) counts as
its element, as the earlier ``evaluate.py`` read it (``answer[-1]``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..data.llm_adapters import COMMONSENSE_LABELS, MATH_SETS, alpaca_prompt, extract_answer, is_correct
from . import common
from .common import EvalResult, cut_at, source_of
from .registry import ScoreContext, register_eval_task, register_not_evaluable

STOPS = ("### Response:",)
# LLM-Adapters' generation budgets: commonsense_evaluate.py max_new_tokens=32, evaluate.py (math) 256.
COMMONSENSE_MAX_NEW_TOKENS = 32
MATH_MAX_NEW_TOKENS = 256
TEST_SETS: tuple[str, ...] = (*(f"commonsense-{n}" for n in COMMONSENSE_LABELS), *(f"math-{n}" for n in MATH_SETS))
TRAINING_MIXES = ("commonsense170k", "math50k")


def is_test_set(task: str) -> bool:
    return task in TEST_SETS


def default_max_new_tokens(task: str) -> int:
    """The budget LLM-Adapters' evaluation script of ``task`` uses."""
    return COMMONSENSE_MAX_NEW_TOKENS if task.startswith("commonsense-") else MATH_MAX_NEW_TOKENS


def definition(task: str) -> str:
    """How ``task`` is scored, in words (written to the result's metadata)."""
    if task.startswith("commonsense-"):
        return "LLM-Adapters commonsense_evaluate.py: first label word of the greedy response, exact match"
    if task == "math-aqua":
        return "LLM-Adapters evaluate.py: first letter A-E of the greedy response, exact match"
    return "LLM-Adapters evaluate.py: last number of the greedy response (commas removed), |gold - pred| <= 0.001"


def gold_answer(task: str, row: Mapping[str, Any], source: str) -> str | float:
    """The row's ``answer`` as the task compares it: a number for the math sets (AQuA: a letter A-E), a label
    word of the task's label set for commonsense. Anything else is an error naming the row: it could never be
    matched, and a silent 0 would look like a model failure."""
    answer = row.get("answer")
    if isinstance(answer, list) and answer:
        answer = answer[-1]
    name = task.split("-", 1)[1]
    if name == "aqua":
        if str(answer).strip() not in tuple("ABCDE"):
            raise ValueError(f"{source}: {task} answer must be a letter A-E, got {answer!r}")
        return str(answer).strip()
    if task.startswith("math-"):
        try:
            value = float(answer)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"{source}: {task} answer must be a number, got {answer!r}")
        return value
    labels = COMMONSENSE_LABELS[name]
    if not isinstance(answer, str) or not re.fullmatch(labels, answer.strip()):
        raise ValueError(f"{source}: {task} answer must be one of {labels.replace('|', ', ')}, got {answer!r}")
    return answer.strip()


def evaluate_llm_adapters(
    model: Any,
    tokenizer: Any,
    task: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> EvalResult:
    """Accuracy of greedy answers on one LLM-Adapters test set (``commonsense-boolq``, ``math-gsm8k``, ...)."""
    if not is_test_set(task):
        raise ValueError(f"{task!r} is not an LLM-Adapters test set; test sets: {', '.join(TEST_SETS)}")
    if not rows:
        raise ValueError(f"{task}: no examples to evaluate")
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(task)
    golds = [gold_answer(task, row, source_of(row, i)) for i, row in enumerate(rows)]
    prompts = [alpaca_prompt(row) for row in rows]
    outputs = common.generate_completions(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stops=STOPS,
        progress=progress,
        label=task,
    )
    predictions = []
    for i, (row, gold, output) in enumerate(zip(rows, golds, outputs, strict=True)):
        completion = cut_at(output, STOPS).strip()
        parsed = extract_answer(task, completion)
        correct = is_correct(task, parsed, gold)
        predictions.append(
            {
                "index": i,
                "source": source_of(row, i),
                # no number found is inf in LLM-Adapters (never within 0.001 of a gold); JSON has no inf
                "prediction": None if parsed == "" or parsed == math.inf else parsed,
                "gold": gold,
                "correct": correct,
                "completion": completion,
            }
        )
    n = len(predictions)
    return EvalResult(
        task=task,
        n=n,
        accuracy=sum(p["correct"] for p in predictions) / n,
        predictions=predictions,
        metadata={
            "metric": "accuracy",
            "definition": definition(task),
            "max_new_tokens": max_new_tokens,
        },
    )


def _score(model: Any, tokenizer: Any, rows: list[dict[str, Any]], ctx: ScoreContext) -> EvalResult:
    return evaluate_llm_adapters(
        model,
        tokenizer,
        ctx.task,
        rows,
        max_new_tokens=ctx.max_new_tokens,
        batch_size=ctx.batch_size,
        progress=ctx.progress,
    )


for _name in TEST_SETS:  # LLM-Adapters keeps each test set in dataset/<name>/test.json, not on the hub
    register_eval_task(
        _name,
        _score,
        split="test",
        max_new_tokens=default_max_new_tokens(_name),
        local_only="an LLM-Adapters test set: dataset/<name>/test.json of github.com/AGI-Edgerunners/LLM-Adapters, "
        "or its folder",
    )
for _mix in TRAINING_MIXES:
    register_not_evaluable(
        _mix,
        f"{_mix} is an LLM-Adapters training mix (no single answer format); evaluate on its test sets instead: "
        f"{', '.join(t for t in TEST_SETS if t.startswith(_mix[:4]))} (NAME:PATH)",
    )
