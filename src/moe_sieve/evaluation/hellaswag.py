"""HellaSwag: pick the ending the model finds most likely; the paper reports normalised accuracy (§5.1).

Scored as lm-evaluation-harness 0.4's ``hellaswag`` task: context ``preprocess(activity_label + ": " + ctx_a + " " +
ctx_b.capitalize())``, every ending preprocessed (WikiHow markup removed) and scored as ``" " + ending``,
``acc`` = argmax of the summed log-probabilities, ``acc_norm`` = argmax after dividing by the preprocessed
ending's length in characters (``len(str)``, as the harness's ``completion_len``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..data.tasks import format_hellaswag, preprocess_hellaswag
from . import common
from .common import EvalResult, source_of
from .registry import ScoreContext, register_eval_task


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; ties go to the first, as ``numpy.argmax`` does in lm-eval-harness."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def evaluate_hellaswag(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> EvalResult:
    """Score every ending by the summed log-probability of its tokens after the task's context prompt.

    ``accuracy`` takes the raw sum (harness ``acc``); ``accuracy_norm`` divides it by the preprocessed ending's
    length in characters first (harness ``acc_norm``), which removes the bias towards short endings.
    ``batch_size`` counts context+ending sequences per forward pass.
    """
    if not rows:
        raise ValueError("hellaswag: no examples to evaluate")
    pairs: list[tuple[str, str]] = []
    spans: list[tuple[int, int]] = []
    labels: list[int] = []
    for i, row in enumerate(rows):
        try:
            prompt, _ = format_hellaswag(row)  # also validates endings and label
        except (ValueError, KeyError) as err:
            raise ValueError(f"{source_of(row, i)}: {err}") from err
        endings = [preprocess_hellaswag(str(e)) for e in row["endings"]]
        spans.append((len(pairs), len(pairs) + len(endings)))
        pairs.extend((prompt, " " + ending) for ending in endings)
        labels.append(int(row["label"]))
    scores = common.score_continuations(model, tokenizer, pairs, batch_size, progress)
    predictions = []
    for i, (row, (start, end), label) in enumerate(zip(rows, spans, labels, strict=True)):
        raw = scores[start:end]
        endings = [pair[1][1:] for pair in pairs[start:end]]
        norm = [score / max(len(ending), 1) for score, ending in zip(raw, endings, strict=True)]
        pred_raw, pred_norm = _argmax(raw), _argmax(norm)
        predictions.append(
            {
                "index": i,
                "source": source_of(row, i),
                "prediction": pred_norm,
                "prediction_raw": pred_raw,
                "gold": label,
                "correct": pred_norm == label,
                "correct_raw": pred_raw == label,
                "logprobs": raw,
            }
        )
    n = len(predictions)
    return EvalResult(
        task="hellaswag",
        n=n,
        accuracy=sum(p["correct_raw"] for p in predictions) / n,
        accuracy_norm=sum(p["correct"] for p in predictions) / n,
        predictions=predictions,
        metadata={
            "metric": "accuracy_norm",
            "normalisation": "preprocessed ending characters",
            "definition": "lm-evaluation-harness 0.4 hellaswag (acc, acc_norm)",
        },
    )


def _score(model: Any, tokenizer: Any, rows: list[dict[str, Any]], ctx: ScoreContext) -> EvalResult:
    return evaluate_hellaswag(model, tokenizer, rows, batch_size=ctx.batch_size, progress=ctx.progress)


# HellaSwag's test split has no labels; scored by likelihood already, so no gold-likelihood pass
register_eval_task("hellaswag", _score, split="validation", gold_likelihood=False)
