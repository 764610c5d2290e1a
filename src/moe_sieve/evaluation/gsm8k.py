"""GSM8K: exact match of the final number of a greedy answer against the gold ``#### N`` (paper §5.1)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..data.tasks import format_gsm8k
from . import common
from .common import EvalResult, cut_at, source_of

# A number as written in GSM8K answers: optional sign, thousands commas, optional decimals ("-1,234.50").
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# The prompt starts with "Question:", so a second one in the output is the model inventing the next problem.
STOPS = ("Question:",)


def _normalise(number: str) -> str:
    number = number.replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return "0" if number in ("-0", "") else number


def extract_answer(text: str) -> str | None:
    """The number after ``####`` (the GSM8K answer convention), else the last number in ``text``; None if none.

    Normalised so that formatting is not scored: ``1,000`` -> ``1000``, ``5.0`` -> ``5``, ``2.50`` -> ``2.5``.
    """
    marker = text.find("####")
    if marker != -1:
        found = _NUMBER.search(text, marker + 4)
        if found is not None:
            return _normalise(found.group())
    numbers = _NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def evaluate_gsm8k(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    progress: bool = True,
) -> EvalResult:
    """Greedy answers to the task's own prompt (``format_gsm8k``), scored by exact match of the extracted number."""
    if not rows:
        raise ValueError("gsm8k: no examples to evaluate")
    golds = []
    for i, row in enumerate(rows):
        gold = extract_answer(str(row["answer"]))
        if gold is None:
            raise ValueError(f"{source_of(row, i)}: the gold answer has no number: {row['answer']!r}")
        golds.append(gold)
    prompts = [format_gsm8k(row)[0] for row in rows]
    outputs = common.generate_completions(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stops=STOPS,
        progress=progress,
        label="gsm8k",
    )
    predictions = []
    for i, (row, gold, output) in enumerate(zip(rows, golds, outputs, strict=True)):
        completion = cut_at(output, STOPS)
        answer = extract_answer(completion)
        predictions.append(
            {
                "index": i,
                "source": source_of(row, i),
                "prediction": answer,
                "gold": gold,
                "correct": answer == gold,
                "completion": completion,
            }
        )
    accuracy = sum(p["correct"] for p in predictions) / len(predictions)
    return EvalResult(
        task="gsm8k",
        n=len(predictions),
        accuracy=accuracy,
        predictions=predictions,
        metadata={"metric": "exact_match", "max_new_tokens": max_new_tokens},
    )
