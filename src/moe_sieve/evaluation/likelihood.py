"""Likelihood metrics of generation tasks: how much probability the model puts on the gold completion.

Exact match is a threshold on the argmax; on a small model it flips on tiny changes of the weights, while the
log-probability of the gold answer moves smoothly. Every generation task's ``eval`` therefore also scores its
gold completion by teacher forcing, on the prompt formatting the task fine-tunes with:

* ``gold_logprob``: per row, the summed log-probability of the gold completion's tokens given the prompt (what
  lm-evaluation-harness's ``HFLM.loglikelihood`` returns for the same (context, continuation) pair with
  ``add_bos_token=True``); the aggregate is the mean over rows;
* ``gold_prob``: the mean over rows of ``exp(gold_logprob)``, a soft accuracy in [0, 1];
* ``gold_nll_per_token``: total negative log-likelihood over total gold tokens (token-weighted, as the training
  loss is).

A task may also name *result spans* inside its completion (GSM8K's ``= N`` results and the ``#### N`` answer);
``result_logprob``/``result_prob``/``result_nll_per_token`` then score only the tokens that overlap them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from . import common

SpanFinder = Callable[[str], list[tuple[int, int]]]


def _token_offsets(tokenizer: Any, context: str, continuation: str, n_tokens: int) -> list[tuple[int, int]] | None:
    """Character spans (in ``context + continuation``) of the last ``n_tokens`` tokens of the whole text, the
    continuation's tokens as ``encode_pair`` cuts them; None for a tokenizer without offsets."""
    try:
        encoding = tokenizer(context + continuation, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None
    offsets = encoding.get("offset_mapping")
    if offsets is None or len(offsets) < n_tokens:
        return None
    return [(int(a), int(b)) for a, b in offsets[len(offsets) - n_tokens :]]


def score_gold(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    progress: bool = True,
    result_spans: SpanFinder | None = None,
) -> list[dict[str, Any]]:
    """Per pair: ``gold_logprob`` and ``gold_tokens``; with ``result_spans`` (character spans of the
    continuation), also ``result_logprob`` and ``result_tokens`` (None where the continuation has no span)."""
    per_token = common.continuation_logprobs(model, tokenizer, pairs, batch_size, progress, label="gold likelihood")
    rows = []
    for (context, continuation), logprobs in zip(pairs, per_token, strict=True):
        row: dict[str, Any] = {"gold_logprob": float(logprobs.double().sum()), "gold_tokens": len(logprobs)}
        if result_spans is not None:
            spans = [(len(context) + a, len(context) + b) for a, b in result_spans(continuation)]
            offsets = _token_offsets(tokenizer, context, continuation, len(logprobs))
            if offsets is None:
                raise ValueError("result likelihoods need a fast tokenizer (character offsets of each token)")
            keep = [i for i, (a, b) in enumerate(offsets) if any(a < end and b > start for start, end in spans)]
            row["result_logprob"] = float(logprobs[keep].double().sum()) if keep else None
            row["result_tokens"] = len(keep)
        rows.append(row)
    return rows


def _aggregate(rows: Sequence[dict[str, Any]], prefix: str) -> dict[str, float]:
    values = [(r[f"{prefix}_logprob"], r[f"{prefix}_tokens"]) for r in rows if r.get(f"{prefix}_logprob") is not None]
    if not values:
        return {}
    tokens = sum(n for _, n in values)
    return {
        f"{prefix}_logprob": math.fsum(lp for lp, _ in values) / len(values),
        f"{prefix}_prob": math.fsum(math.exp(lp) for lp, _ in values) / len(values),
        f"{prefix}_nll_per_token": -math.fsum(lp for lp, _ in values) / max(tokens, 1),
    }


def likelihood_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The aggregates ``eval.json`` records under ``metrics`` (see the module docstring)."""
    return {**_aggregate(rows, "gold"), **_aggregate(rows, "result")}
