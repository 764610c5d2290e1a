"""The ``facts`` mini task: exact match of the first integer of a greedy answer against the stored value.

The likelihood metrics (``gold_prob`` above all) are the study's measure; exact match is kept for reading
predictions and as the familiar number.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..data.tasks import format_gsm8k
from . import common
from .common import EvalResult, cut_at, source_of
from .registry import ScoreContext, register_eval_task

STOPS = ("\n", "Question:")
MAX_NEW_TOKENS = 4
_INTEGER = re.compile(r"-?\d+")


def extract_value(text: str) -> str | None:
    """The first integer of ``text`` (None without one)."""
    found = _INTEGER.search(text)
    return None if found is None else found.group(0)


def evaluate_facts(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 8,
    progress: bool = True,
) -> EvalResult:
    """Greedy answers to ``Question: ...\\nAnswer:`` (the prompt the task fine-tunes with)."""
    if not rows:
        raise ValueError("facts: no examples to evaluate")
    golds = common.gold_answers(rows, extract_value, "the answer holds no integer")
    outputs = common.generate_completions(
        model,
        tokenizer,
        [format_gsm8k(row)[0] for row in rows],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stops=STOPS,
        progress=progress,
        label="facts",
    )
    predictions = []
    for i, (row, gold, output) in enumerate(zip(rows, golds, outputs, strict=True)):
        completion = cut_at(output, STOPS)
        answer = extract_value(completion)
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
    return common.accuracy_result(
        "facts",
        predictions,
        {
            "metric": "exact_match",
            "definition": "first integer of the greedy answer equals the stored value",
            "max_new_tokens": max_new_tokens,
        },
    )


def _score(model: Any, tokenizer: Any, rows: list[dict[str, Any]], ctx: ScoreContext) -> EvalResult:
    return evaluate_facts(
        model, tokenizer, rows, max_new_tokens=ctx.max_new_tokens, batch_size=ctx.batch_size, progress=ctx.progress
    )


register_eval_task("facts", _score, split="test", max_new_tokens=MAX_NEW_TOKENS)
