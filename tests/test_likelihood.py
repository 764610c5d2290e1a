"""Likelihood metrics of `eval` against lm-evaluation-harness's own ``HFLM.loglikelihood`` on the same
(context, continuation) pairs, and the aggregates and result spans against hand computations."""

from __future__ import annotations

import json
import math

import pytest

from moe_sieve.evaluation.gsm8k import result_spans
from moe_sieve.evaluation.likelihood import likelihood_metrics
from moe_sieve.minitasks.generate import SMALL_SIZES, generate_minitasks


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini")
    generate_minitasks(out, sizes={**SMALL_SIZES, "facts_n": 12})
    return out


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from moe_sieve.modeling import ModelSpec, load_model, load_tokenizer

    spec = ModelSpec(model="moe-sieve-default", device="cpu")
    return load_model(spec), load_tokenizer(spec)


def test_gold_logprob_equals_lm_eval_loglikelihood(mini, model_and_tokenizer):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from moe_sieve.demo import default_model_path
    from moe_sieve.evaluation import evaluate
    from moe_sieve.evaluation.evaluate import load_task_rows

    model, tokenizer = model_and_tokenizer
    lm = HFLM(pretrained=str(default_model_path()), add_bos_token=True, batch_size=4, device="cpu")
    for data in (f"facts:{mini / 'facts'}", f"gsm8k:{mini / 'arith'}"):
        result = evaluate(model, tokenizer, data, max_examples=5, batch_size=3, max_new_tokens=8, progress=False)
        _, rows = load_task_rows(data, max_examples=5)
        requests = [
            Instance("loglikelihood", doc={}, arguments=(row["_prompt"], row["_completion"]), idx=i)
            for i, row in enumerate(rows)
        ]
        theirs = [logprob for logprob, _ in lm.loglikelihood(requests, disable_tqdm=True)]
        ours = [p["gold_logprob"] for p in result.predictions]
        assert ours == pytest.approx(theirs, abs=2e-4), data
        assert result.metrics["gold_logprob"] == pytest.approx(sum(theirs) / 5, abs=2e-4)
        assert result.metrics["gold_prob"] == pytest.approx(sum(math.exp(v) for v in theirs) / 5, rel=1e-3)
        tokens = sum(p["gold_tokens"] for p in result.predictions)
        assert result.metrics["gold_nll_per_token"] == pytest.approx(-sum(theirs) / tokens, abs=1e-4)
        # the predictions file keeps every row's values
        assert json.loads(json.dumps(result.to_json()))["predictions"][0]["gold_logprob"] == ours[0]


def test_result_spans_pick_the_chain_results():
    text = " Ada has 3 + 4 = 7 apples. Then 7 * 2 = 14.\n#### 14"
    assert [text[a:b] for a, b in result_spans(text)] == ["7", "14", "14"]
    other = "x = -1,200 and y=$5\n#### 1,205"
    assert [other[a:b] for a, b in result_spans(other)] == ["-1,200", "$5", "1,205"]


def test_result_logprob_sums_only_result_tokens(mini, model_and_tokenizer):
    from moe_sieve.evaluation.evaluate import load_task_rows
    from moe_sieve.evaluation.likelihood import score_gold

    model, tokenizer = model_and_tokenizer
    _, rows = load_task_rows(f"gsm8k:{mini / 'arith'}", max_examples=2)
    pairs = [(r["_prompt"], r["_completion"]) for r in rows]
    scored = score_gold(model, tokenizer, pairs, batch_size=2, progress=False, result_spans=result_spans)
    for (context, continuation), row in zip(pairs, scored, strict=True):
        # independent recomputation: score each result token as a continuation of everything before it
        from moe_sieve.evaluation.common import continuation_logprobs

        whole = tokenizer(context + continuation, return_offsets_mapping=True)
        n_ctx = len(tokenizer(context)["input_ids"])
        spans = [(len(context) + a, len(context) + b) for a, b in result_spans(continuation)]
        keep = [
            i
            for i, (a, b) in enumerate(whole["offset_mapping"][n_ctx:])
            if any(a < end and b > start for start, end in spans)
        ]
        logprobs = continuation_logprobs(model, tokenizer, [(context, continuation)], 1, progress=False)[0]
        assert row["result_tokens"] == len(keep) >= len(spans)
        assert row["result_logprob"] == pytest.approx(float(logprobs[keep].sum()), abs=1e-4)
        assert row["result_logprob"] > row["gold_logprob"]


def test_aggregates():
    rows = [{"gold_logprob": -1.0, "gold_tokens": 2}, {"gold_logprob": -3.0, "gold_tokens": 1}]
    metrics = likelihood_metrics(rows)
    assert metrics["gold_logprob"] == -2.0
    assert metrics["gold_prob"] == pytest.approx((math.exp(-1) + math.exp(-3)) / 2)
    assert metrics["gold_nll_per_token"] == pytest.approx(4 / 3)
    assert likelihood_metrics([]) == {}
