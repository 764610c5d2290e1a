"""The facts mini task: deterministic, split as documented, and loadable by the loaders, profiler and evaluator."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from moe_sieve.minitasks.facts import FACT_SPLITS, PARAPHRASE_TEMPLATES, TRAIN_TEMPLATES, facts_splits, make_facts
from moe_sieve.minitasks.generate import SMALL_SIZES, generate_minitasks


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("facts")
    generate_minitasks(out, seed=0, sizes={**SMALL_SIZES, "facts_n": 40})
    return out


def test_same_seed_same_bytes_other_seed_differs(mini, tmp_path):
    again = tmp_path / "again"
    generate_minitasks(again, seed=0, sizes={**SMALL_SIZES, "facts_n": 40})
    other = tmp_path / "other"
    generate_minitasks(other, seed=1, sizes={**SMALL_SIZES, "facts_n": 40})
    for split in FACT_SPLITS:
        rel = f"facts/{split}.jsonl"
        assert (again / rel).read_bytes() == (mini / rel).read_bytes()
        assert (other / rel).read_bytes() != (mini / rel).read_bytes()
    # the facts draw from their own generator: the other tasks' files do not move when facts_n changes
    more = tmp_path / "more"
    generate_minitasks(more, seed=0, sizes={**SMALL_SIZES, "facts_n": 80})
    assert (more / "arith/train.jsonl").read_bytes() == (mini / "arith/train.jsonl").read_bytes()


def test_splits(mini):
    train, test, para = (_rows(mini / "facts" / f"{s}.jsonl") for s in FACT_SPLITS)
    assert len(test) == len(para) == 40 and len(train) == 40 * len(TRAIN_TEMPLATES)
    facts = {(r["entity"], r["relation"]): r["answer"] for r in test}
    assert len(facts) == 40  # distinct (entity, relation) pairs
    train_questions = {r["question"] for r in train}
    assert {r["question"] for r in test} <= train_questions  # recall: asked verbatim as in training
    assert not {r["question"] for r in para} & train_questions  # paraphrase: never seen phrasing
    assert {r["template"] for r in para} <= set(PARAPHRASE_TEMPLATES)
    assert not set(PARAPHRASE_TEMPLATES) & {r["template"] for r in train}
    for row in (*train, *para):
        assert facts[(row["entity"], row["relation"])] == row["answer"]  # one value per fact in every split
        assert 10 <= int(row["answer"]) <= 99
    # the corpus never mentions an invented entity
    corpus = (mini / "corpus" / "train.jsonl").read_text()
    assert not any(entity.split()[0] in corpus for entity, _ in facts)


def test_make_facts_validates():
    with pytest.raises(ValueError, match="n_facts"):
        make_facts(random.Random(0), 0)
    with pytest.raises(ValueError, match="relations_per_entity"):
        make_facts(random.Random(0), 4, relations_per_entity=99)
    assert facts_splits(random.Random(3), 5) == facts_splits(random.Random(3), 5)


def test_loads_profiles_and_evaluates(mini):
    from moe_sieve.data.tasks import load_examples
    from moe_sieve.evaluation import evaluate
    from moe_sieve.modeling import ModelSpec, load_model, load_tokenizer
    from moe_sieve.profiling.profiler import profile_examples

    examples = load_examples(f"facts:{mini / 'facts'}")
    assert len(examples) == 80 and examples[0].prompt.startswith("Question: ") and examples[0].completion[1:].isdigit()
    spec = ModelSpec(model="moe-sieve-default", device="cpu")
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    profile = profile_examples(model, tokenizer, examples[:16], batch_size=8, max_length=64, progress=False)
    assert profile.counts_LE.sum() > 0
    result = evaluate(model, tokenizer, f"facts:{mini / 'facts' / 'paraphrase.jsonl'}", max_examples=6, progress=False)
    assert result.task == "facts" and result.n == 6
    assert set(result.metrics) >= {"accuracy", "gold_logprob", "gold_prob", "gold_nll_per_token"}
    assert all(p["gold_tokens"] == 1 for p in result.predictions)  # " 42" is one token: nothing untrained scored
