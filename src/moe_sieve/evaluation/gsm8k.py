"""GSM8K: exact match of a greedy answer against the gold ``#### N`` (paper §5.1), as lm-evaluation-harness 0.4's
``gsm8k`` task scores it.

The harness's two filters are kept verbatim: ``strict-match`` takes the first ``#### (\\-?[0-9\\.\\,]+)``,
``flexible-extract`` the last match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)``; a response without a match is
``[invalid]``. Prediction and reference then lose ``,``, ``$``, everything up to ``#### `` and one trailing
``.`` and are compared as lower-case strings. So ``.5``, ``-.5``, ``-$5`` (-> ``-5``), ``1.5.2`` and non-ASCII
digits never equal ``5`` or ``2``, and ``5.0`` is not ``5`` (the harness's rule, kept).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..data.tasks import format_gsm8k
from . import common
from .common import EvalResult, cut_at, source_of
from .registry import ScoreContext, register_eval_task

MAX_NEW_TOKENS = 128  # generation budget when none is given (the harness's zero-shot gsm8k: until "Question:")
# lm_eval/tasks/gsm8k/gsm8k.yaml (0.4.x): filter_list and exact_match's regexes_to_ignore, in their order.
STRICT_MATCH = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_EXTRACT = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = tuple(re.compile(p) for p in (",", "\\$", "(?s).*#### ", "\\.$"))
FILTERS = ("strict-match", "flexible-extract")
# The harness's prompt ends generation at "Question:" (the model inventing the next problem).
STOPS = ("Question:", "</s>", "<|im_end|>")


# The numbers a worked answer computes: each ``= N`` of the chain and the final ``#### N``.
RESULT = re.compile(r"(?:=|####)[ \t]*(-?\$?[0-9]+(?:[.,][0-9]+)*)")


def result_spans(completion: str) -> list[tuple[int, int]]:
    """Character spans of the result numbers of a worked answer: where its likelihood carries the signal (the
    chain's wording and the ``####`` marker are format, the results are arithmetic)."""
    return [match.span(1) for match in RESULT.finditer(completion)]


def normalise_answer(text: str) -> str:
    """exact_match's normalisation: each ignored pattern removed in turn, then lower case."""
    for pattern in IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def extract_answer(text: str, mode: str = "flexible-extract") -> str | None:
    """The answer the harness's ``mode`` filter takes from ``text``, normalised as its exact_match compares it;
    None where the filter finds nothing (the harness's ``[invalid]``)."""
    if mode == "strict-match":
        found = STRICT_MATCH.findall(text)
        match = found[0] if found else None
    elif mode == "flexible-extract":
        found = FLEXIBLE_EXTRACT.findall(text)
        match = next((group for group in found[-1] if group), None) if found else None
    else:
        raise ValueError(f"GSM8K filter must be one of {', '.join(FILTERS)}, got {mode!r}")
    return None if match is None else normalise_answer(match.strip())


def gold_answer(answer: str) -> str | None:
    """The reference as the harness compares it: the whole ``answer`` cleaned (all but the number after ``#### ``
    goes); None when it holds no ``#### ``."""
    return normalise_answer(answer) if "#### " in answer else None


def evaluate_gsm8k(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 8,
    progress: bool = True,
) -> EvalResult:
    """Greedy answers to the task's own prompt (``format_gsm8k``, the harness's zero-shot ``doc_to_text``).

    ``accuracy`` is the harness's ``exact_match,flexible-extract``; ``metadata["strict_match"]`` its
    ``exact_match,strict-match``."""
    if not rows:
        raise ValueError("gsm8k: no examples to evaluate")
    golds = common.gold_answers(rows, gold_answer, "the gold answer has no '#### N'")
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
        answer, strict = extract_answer(completion), extract_answer(completion, "strict-match")
        predictions.append(
            {
                "index": i,
                "source": source_of(row, i),
                "prediction": answer,
                "prediction_strict": strict,
                "gold": gold,
                "correct": answer == gold,
                "correct_strict": strict == gold,
                "completion": completion,
            }
        )
    n = len(predictions)
    return common.accuracy_result(
        "gsm8k",
        predictions,
        {
            "metric": "exact_match,flexible-extract",
            "strict_match": sum(p["correct_strict"] for p in predictions) / n,
            "definition": "lm-evaluation-harness 0.4 gsm8k (exact_match, both filters)",
            "max_new_tokens": max_new_tokens,
        },
    )


def _score(model: Any, tokenizer: Any, rows: list[dict[str, Any]], ctx: ScoreContext) -> EvalResult:
    return evaluate_gsm8k(
        model, tokenizer, rows, max_new_tokens=ctx.max_new_tokens, batch_size=ctx.batch_size, progress=ctx.progress
    )


register_eval_task("gsm8k", _score, split="test", max_new_tokens=MAX_NEW_TOKENS, result_spans=result_spans)
