"""Evaluation: exact metrics through stubbed generation/scoring, real paths on a tiny random OLMoE, and the
Spider executor's safety (read-only, time-limited) on a throwaway SQLite database."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

import datasets
import pytest
import torch

from moe_sieve.data.tasks import format_gsm8k, format_hellaswag
from moe_sieve.evaluation import (
    EvalResult,
    QueryError,
    QueryTimeout,
    SqlSandbox,
    common,
    cut_sql,
    evaluate,
    evaluate_gsm8k,
    evaluate_hellaswag,
    evaluate_spider,
    execute_sql,
    execution_match,
    extract_answer,
    load_task_rows,
    results_match,
)
from moe_sieve.evaluation.gsm8k import gold_answer

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = 5\n#### 5"},
    {"question": "A box holds 2 dozen eggs. How many eggs?", "answer": "2 * 12 = 24\n#### 24"},
    {"question": "What is 1,000 plus 234?", "answer": "1,000 + 234 = 1,234\n#### 1,234"},
]
HELLASWAG_ROWS = [
    {"activity_label": "Cooking", "ctx": "She cracks an egg", "endings": ["a", "into the hot pan.", "b", "c"],
     "label": "1"},
    {"activity_label": "", "ctx": "He opens the door", "endings": ["and walks in.", "x", "y", "z"], "label": "0"},
]  # fmt: skip
PROMPTS = ["Question: hi\nAnswer:", "Question: a somewhat longer prompt than the others\nAnswer:", "Q"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from moe_sieve.tiny import byte_level_tokenizer

    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    from transformers import OlmoeForCausalLM

    from moe_sieve.tiny import tiny_olmoe_config

    torch.manual_seed(0)
    config = tiny_olmoe_config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_experts=4
    )
    model = OlmoeForCausalLM(config)
    with torch.no_grad():  # spread the routers so routing differs per token, as in a real model
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
    return model.eval()


def stub_generate(monkeypatch, outputs: dict[str, str]) -> list[list[str]]:
    """Replace batched generation by a prompt -> text table; returns the batches it was called with."""
    calls: list[list[str]] = []

    def fake(model, tokenizer, prompts, max_new_tokens, stops=()):
        calls.append(list(prompts))
        return [outputs[p] for p in prompts]

    monkeypatch.setattr(common, "_generate", fake)
    return calls


# --- GSM8K ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "flexible", "strict"),
    [
        ("3 + 2 = 5\n#### 5", "5", "5"),
        ("so 1,000 + 234 = 1,234\n#### 1,234", "1234", "1234"),
        ("#### $1,234,567.", "1234567", None),
        ("She lost money.\n#### -7", "-7", "-7"),
        ("#### 5.", "5", "5"),
        ("#### 5.0", "5.0", "5.0"),  # the harness compares strings: 5.0 is not 5
        ("#### 12 apples, not 13", "13", "12"),
        ("First 3 then 4 so the answer is 17.", "17", None),
        ("It costs -3.", "-3", None),
        ("The total is 1,200 dollars", "1200", None),
        ("####\nbut then 8", "8", None),
        # Wrong answers that must stay wrong (issue 9): none of these may become 5 or 2.
        ("#### .5", ".5", ".5"),
        ("#### -.5", "-.5", "-.5"),
        ("#### -$5", "-5", None),
        ("#### 1.5.2", "1.5.2", "1.5.2"),
        ("#### \uff15", None, None),  # FULLWIDTH DIGIT FIVE
        ("#### \u0665", None, None),  # ARABIC-INDIC DIGIT FIVE
        ("no digits here", None, None),
        ("", None, None),
    ],
)
def test_extract_answer(text, flexible, strict):
    assert extract_answer(text) == flexible
    assert extract_answer(text, "strict-match") == strict


def test_extract_answer_agrees_with_lm_eval_filters():
    """The harness's own RegexFilter objects and exact_match metric, built from its gsm8k.yaml, decide the same."""
    pytest.importorskip("lm_eval")
    import lm_eval.tasks
    import yaml
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    task_yaml = Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k.yaml"
    spec = yaml.safe_load(task_yaml.read_text().replace("!function", ""))
    metric = spec["metric_list"][0]
    answers = ["x\n#### 5", "y\n#### 2", "z\n#### 1,234", "w\n#### -5", "v\n#### 18"]
    responses = ["#### .5", "#### -.5", "#### -$5", "#### 1.5.2", "#### \uff15", "is $18.", "#### 12 then 13", "#### 5",
                 "#### 1,234.", "#### 2", "5.0", "####\n-5", ""]  # fmt: skip
    for flt in spec["filter_list"]:
        regex = flt["filter"][0]
        harness = RegexFilter(regex["regex_pattern"], regex.get("group_select", 0))
        mode = flt["name"]
        for response in responses:
            (picked,) = list(harness.apply([[response]], [{}]))[0]
            for answer in answers:
                expected = exact_match_hf_evaluate(
                    [picked], [answer], regexes_to_ignore=metric["regexes_to_ignore"], ignore_case=True
                )["exact_match"]
                ours = extract_answer(response, mode)
                assert (ours is not None and ours == gold_answer(answer)) == bool(expected), (mode, response, answer)


def test_gsm8k_exact_match_with_stubbed_generation(monkeypatch, tiny_model, tokenizer):
    prompts = [format_gsm8k(row)[0] for row in GSM8K_ROWS]
    calls = stub_generate(
        monkeypatch,
        {
            prompts[0]: " 3 + 2 = 5\n#### 5",
            # The run-on second problem is cut off, so its 99 does not become the last number.
            prompts[1]: " 2 * 12 = 24 eggs.\n\nQuestion: Bob has 99 eggs\nAnswer: 99",
            prompts[2]: " 1,000 + 234 = 1,244\n#### 1,244",
        },
    )
    result = evaluate_gsm8k(tiny_model, tokenizer, GSM8K_ROWS, batch_size=2, progress=False)
    assert (result.task, result.n, result.correct) == ("gsm8k", 3, 2)
    assert result.accuracy == pytest.approx(2 / 3)
    assert [p["prediction"] for p in result.predictions] == ["5", "24", "1244"]
    assert [p["gold"] for p in result.predictions] == ["5", "24", "1234"]
    assert [p["correct"] for p in result.predictions] == [True, True, False]
    assert result.predictions[1]["completion"] == " 2 * 12 = 24 eggs.\n\n"
    assert sorted(len(batch) for batch in calls) == [1, 2]  # batch_size respected, every prompt once
    assert sorted(p for batch in calls for p in batch) == sorted(prompts)
    json.dumps(result.to_json())


def test_gsm8k_on_tiny_model_restores_training_mode(tiny_model, tokenizer):
    tiny_model.train()
    try:
        result = evaluate_gsm8k(tiny_model, tokenizer, GSM8K_ROWS[:2], max_new_tokens=4, progress=False)
        assert tiny_model.training
    finally:
        tiny_model.eval()
    assert result.n == 2 and 0.0 <= result.accuracy <= 1.0
    assert all(isinstance(p["completion"], str) for p in result.predictions)


# --- generation -------------------------------------------------------------------------------------------


def test_batched_left_padded_generation_equals_unbatched(tiny_model, tokenizer):
    lengths = {len(tokenizer(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) == 3
    with torch.inference_mode():
        batched = common._generate(tiny_model, tokenizer, PROMPTS, 8)
        single = [common._generate(tiny_model, tokenizer, [p], 8)[0] for p in PROMPTS]
    assert batched == single
    assert tokenizer.padding_side == "right"  # left padding is built by hand, the tokenizer is untouched
    in_order = common.generate_completions(
        tiny_model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=2, progress=False
    )
    assert in_order == single


def test_stop_strings_stop_generation(tiny_model, tokenizer):
    prompt = tokenizer("Q:")["input_ids"]
    stop = common._StopOnStrings(tokenizer, len(prompt), ["Question:"])
    ids = torch.tensor([prompt + tokenizer("ab Question: c", add_special_tokens=False)["input_ids"],
                        prompt + tokenizer("ab Quest xxxxx", add_special_tokens=False)["input_ids"]])  # fmt: skip
    assert stop(ids, None).tolist() == [True, False]
    assert common.cut_at("x;y\n\nz", (";", "\n\n")) == "x"
    # "" is in every text: each row stops after its first token (one byte of the byte-level tokenizer).
    with torch.inference_mode():
        texts = common._generate(tiny_model, tokenizer, PROMPTS, 8, stops=("",))
    assert all(len(text.encode()) <= 3 for text in texts)


# --- HellaSwag --------------------------------------------------------------------------------------------


def test_hellaswag_argmax_and_length_normalisation(monkeypatch, tiny_model, tokenizer):
    seen = []

    def fake_scores(model, tokenizer, pairs, batch_size, progress=True):
        seen.extend(pairs)
        # Row 0: raw favours the 1-char ending 0; per character the 17-char ending 1 (the label) wins.
        # Row 1: ending 0 wins either way.
        return [-2.0, -5.1, -8.0, -9.0, -1.0, -6.0, -7.0, -8.0]

    monkeypatch.setattr(common, "score_continuations", fake_scores)
    result = evaluate_hellaswag(tiny_model, tokenizer, HELLASWAG_ROWS, progress=False)
    assert seen[:2] == [("Cooking: She cracks an egg", " a"), ("Cooking: She cracks an egg", " into the hot pan.")]
    assert seen[4] == (format_hellaswag(HELLASWAG_ROWS[1])[0], " and walks in.")
    assert (result.accuracy, result.accuracy_norm) == (0.5, 1.0)
    first = result.predictions[0]
    assert (first["prediction_raw"], first["prediction"], first["gold"]) == (0, 1, 1)
    assert (first["correct_raw"], first["correct"]) == (False, True)


def test_hellaswag_logprob_scorer_matches_full_forward(tiny_model, tokenizer):
    context = "Cooking: She cracks an egg"
    endings = [" into the hot pan.", " a", " and then sings loudly"]
    scores = common.score_continuations(tiny_model, tokenizer, [(context, e) for e in endings], 2, progress=False)
    for ending, score in zip(endings, scores, strict=True):
        ctx_ids = tokenizer(context)["input_ids"]
        ids = ctx_ids + tokenizer(ending, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(tiny_model(torch.tensor([ids])).logits[0].double(), dim=-1)
        expected = sum(float(logprobs[t - 1, ids[t]]) for t in range(len(ctx_ids), len(ids)))
        assert score == pytest.approx(expected, abs=1e-4)
    result = evaluate_hellaswag(tiny_model, tokenizer, HELLASWAG_ROWS, batch_size=3, progress=False)
    assert result.n == 2 and len(result.predictions[0]["logprobs"]) == 4


# --- Spider -----------------------------------------------------------------------------------------------

TABLES = [
    {
        "db_id": "shop",
        "table_names_original": ["people"],
        "column_names_original": [[-1, "*"], [0, "id"], [0, "name"], [0, "age"]],
        "column_types": ["text", "number", "text", "number"],
        "primary_keys": [1],
        "foreign_keys": [],
    }
]
PEOPLE = [(1, "Ann", 30), (2, "Bob", 25), (3, "Cid", 30), (4, "Dee", 41)]
SPIDER_ROWS = [
    {"db_id": "shop", "question": "How many people?", "query": "SELECT count(*) FROM people"},
    {"db_id": "shop", "question": "Names by age.", "query": "SELECT name FROM people ORDER BY age, name"},
    {"db_id": "shop", "question": "Names and ages over 26.", "query": "SELECT name, age FROM people WHERE age > 26"},
]


@pytest.fixture
def spider_dir(tmp_path) -> Path:
    root = tmp_path / "spider"
    (root / "database" / "shop").mkdir(parents=True)
    (root / "tables.json").write_text(json.dumps(TABLES))
    conn = sqlite3.connect(root / "database" / "shop" / "shop.sqlite")
    conn.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, age INTEGER)")
    conn.executemany("INSERT INTO people VALUES (?, ?, ?)", PEOPLE)
    conn.commit()
    conn.close()
    return root


def db_of(spider_dir: Path) -> Path:
    return spider_dir / "database" / "shop" / "shop.sqlite"


def test_cut_sql():
    assert cut_sql(" SELECT 1 FROM t; SELECT 2") == "SELECT 1 FROM t"
    assert cut_sql("SELECT a\nFROM t\n\nQuestion: next") == "SELECT a\nFROM t"
    assert cut_sql("SELECT a FROM t\n-- Question: more") == "SELECT a FROM t"


def test_execution_match_ignores_column_order_and_aliases(spider_dir):
    db = db_of(spider_dir)
    gold = "SELECT name, age FROM people WHERE age > 26"
    for pred in (
        "SELECT age AS a, name AS n FROM people WHERE age >= 27",
        "SELECT name, age FROM people WHERE age > 26 ORDER BY name DESC",  # gold unordered: any order matches
    ):
        assert execution_match(db, pred, gold) == (True, None)
    assert execution_match(db, "SELECT name, age FROM people", gold) == (False, None)
    assert execution_match(db, "SELECT name FROM people WHERE age > 26", gold) == (False, None)
    # Multisets, not sets: duplicates count, once DISTINCT is kept (the official default removes it).
    assert execution_match(db, "SELECT DISTINCT age FROM people", "SELECT age FROM people") == (True, None)
    strict = execution_match(db, "SELECT DISTINCT age FROM people", "SELECT age FROM people", keep_distinct=True)
    assert strict == (False, None)
    assert results_match([(1, "a"), (2, "b")], [("a", 1), ("b", 2)], ordered=True)
    assert not results_match([(1, "a"), (2, "b")], [("b", 2), ("a", 1)], ordered=True)
    assert results_match([(1, "a"), (2, "b")], [("b", 2), ("a", 1)], ordered=False)
    assert results_match([], [], ordered=False)


def test_execution_match_respects_gold_order_by(spider_dir):
    db = db_of(spider_dir)
    gold = "SELECT name FROM people ORDER BY age, name"
    assert execution_match(db, "SELECT name FROM people ORDER BY age ASC, id", gold) == (True, None)
    assert execution_match(db, "SELECT name FROM people ORDER BY age DESC", gold) == (False, None)
    assert execution_match(db, "SELECT name FROM people", gold) == (False, None)


def test_predicted_writes_fail_and_leave_the_database_unchanged(spider_dir, tmp_path):
    db = db_of(spider_dir)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    gold = "SELECT count(*) FROM people"
    attached = tmp_path / "attached.db"
    for pred in (
        "DELETE FROM people",
        "DROP TABLE people",
        "UPDATE people SET age = 0",
        "INSERT INTO people VALUES (9, 'Eve', 1)",
        "CREATE TABLE x (a)",
        "PRAGMA query_only = OFF",
        f"ATTACH DATABASE '{attached}' AS other",
        "SELECT 1; DELETE FROM people",
    ):
        correct, error = execution_match(db, pred, gold)
        # (The official DISTINCT removal keeps sqlparse's first statement only: "SELECT 1;" is then just wrong.)
        assert not correct and (error or pred.startswith("SELECT 1;")), pred
        with pytest.raises(QueryError):
            execute_sql(db, pred)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert not attached.exists()
    assert execute_sql(db, "SELECT id, name, age FROM people ORDER BY id") == PEOPLE


def test_official_test_suite_rules(spider_dir):
    """taoyds/test-suite-sql-eval exec_eval.eval_exec_match: rewrites, DISTINCT, 'order by', value types, and every
    database variant of the folder."""
    db = db_of(spider_dir)
    gold = "SELECT name FROM people WHERE age >= 30"
    assert execution_match(db, "SELECT name FROM people WHERE age > = 30", gold) == (True, None)
    assert execution_match(db, "SELECT name FROM people WHERE NOT age < = 29", gold) == (True, None)
    assert execution_match(db, "SELECT name FROM people WHERE age ! = 25", gold) == (True, None)
    # Values compare by Python equality: 30 == 30.0, but '30' != 30.
    assert execution_match(db, "SELECT 30.0", "SELECT 30") == (True, None)
    assert execution_match(db, "SELECT '30'", "SELECT 30") == (False, None)
    # Row order matters only when the gold query contains 'order by' (the official substring test).
    assert execution_match(db, "SELECT name FROM people ORDER BY name DESC", "SELECT name FROM people") == (True, None)
    assert (
        execution_match(db, "SELECT name FROM people ORDER BY name DESC", "SELECT name FROM people ORDER BY name")[0]
        is False
    )
    # A DISTINCT inside an aggregate goes too, in both queries (official remove_distinct).
    assert execution_match(db, "SELECT count(age) FROM people", "SELECT count(DISTINCT age) FROM people")[0]
    assert not execution_match(
        db, "SELECT count(age) FROM people", "SELECT count(DISTINCT age) FROM people", keep_distinct=True
    )[0]
    # Test suite: a second database variant in the folder where the prediction's shortcut gives another answer.
    variant = db.with_name("shop_variant.sqlite")
    conn = sqlite3.connect(variant)
    conn.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, age INTEGER)")
    conn.executemany("INSERT INTO people VALUES (?, ?, ?)", [(1, "Ann", 30), (2, "Zed", 31)])
    conn.commit()
    conn.close()
    shortcut = "SELECT name FROM people WHERE age = 30"  # equals the gold on shop.sqlite only
    assert execution_match(db, shortcut, "SELECT name FROM people WHERE age >= 30") == (False, None)


def test_sandbox_bounds_time_memory_and_size(spider_dir):
    """Issue 8 finding 9: each query ends as a wrong answer within the limit, and the database is unchanged."""
    db = db_of(spider_dir)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    rows = "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < {n}) "
    queries = {
        "printf": rows.format(n=200000) + "SELECT length(printf('%.*c', 5000000 + i, 'x')) FROM r",
        "printf_huge": "SELECT printf('%.*c', 2000000000, 'x')",
        "zeroblob": rows.format(n=20) + "SELECT zeroblob(900000000) FROM r",
        "wide_rows": rows.format(n=100) + "SELECT zeroblob(5000000) FROM r",  # 500 MB in rows under the length cap
        "recursive": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
    }
    # sqlite_limits=False is Python 3.10 (no Connection.setlimit): the address-space cap and byte cap still hold.
    for limits in (True, False):
        with SqlSandbox(memory_bytes=1 << 30, sqlite_limits=limits) as sandbox:
            for name, sql in queries.items():
                start = time.monotonic()
                correct, error = execution_match(db, sql, "SELECT count(*) FROM people", timeout_s=1.0, sandbox=sandbox)
                took = time.monotonic() - start
                assert not correct and error, (limits, name)
                assert took < 2.5, (limits, name, took, error)  # 1 s limit + 0.5 s grace + a worker restart
            # The worker still answers afterwards.
            assert sandbox.execute(db, "SELECT count(*) FROM people") == [(4,)]
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_sandbox_kills_a_query_the_progress_handler_misses(spider_dir):
    """With SQLite's own interrupt out of reach (a huge progress interval), the wall clock still ends the query:
    the worker is killed and restarted for the next one."""
    db = db_of(spider_dir)
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    with SqlSandbox(progress_steps=2**30) as sandbox:
        start = time.monotonic()
        with pytest.raises(QueryTimeout, match="killed"):
            sandbox.execute(db, endless, timeout_s=0.5)
        assert time.monotonic() - start < 2.5 and sandbox.restarts == 1
        assert sandbox.execute(db, "SELECT count(*) FROM people") == [(4,)]


def test_sandbox_overhead_is_small(spider_dir):
    """The worker is reused: a trivial query's round trip stays far below a process start."""
    db = db_of(spider_dir)
    with SqlSandbox() as sandbox:
        sandbox.execute(db, "SELECT 1")
        start = time.perf_counter()
        for _ in range(50):
            assert sandbox.execute(db, "SELECT count(*) FROM people") == [(4,)]
        per_query = (time.perf_counter() - start) / 50
    assert per_query < 0.05, per_query
    assert sandbox.execute(db, "SELECT x'00ff'") == [(b"\x00\xff",)]  # blobs survive the round trip


def test_slow_query_is_aborted(spider_dir):
    db = db_of(spider_dir)
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    start = time.monotonic()
    with pytest.raises(QueryTimeout, match="timed out"):
        execute_sql(db, endless, timeout_s=0.3)
    correct, error = execution_match(db, endless, "SELECT count(*) FROM people", timeout_s=0.3)
    assert time.monotonic() - start < 3.0
    assert not correct and "timed out" in error


def test_evaluate_spider_with_stubbed_generation(monkeypatch, tiny_model, tokenizer, spider_dir):
    rows = [dict(row, _source=f"dev:{i}") for i, row in enumerate(SPIDER_ROWS)]
    stub_generate(
        monkeypatch,
        {
            f"-- Database: shop\n{_schema()}\n-- Question: {row['question']}\n-- SQL:\n": output
            for row, output in zip(
                rows,
                [
                    "SELECT count(id) FROM people; SELECT 1",
                    "SELECT name FROM people ORDER BY age DESC\n\n-- Question: more",
                    "DROP TABLE people",
                ],
                strict=True,
            )
        },
    )
    result = evaluate_spider(tiny_model, tokenizer, rows, spider_dir=spider_dir, progress=False)
    assert (result.n, result.correct) == (3, 1)
    assert result.accuracy == pytest.approx(1 / 3)
    assert [p["prediction"] for p in result.predictions] == [
        "SELECT count(id) FROM people",
        "SELECT name FROM people ORDER BY age DESC",
        "DROP TABLE people",
    ]
    assert [p["source"] for p in result.predictions] == ["dev:0", "dev:1", "dev:2"]
    assert result.predictions[0]["error"] is None and "not authorized" in result.predictions[2]["error"]
    assert execute_sql(db_of(spider_dir), "SELECT count(*) FROM people") == [(4,)]

    with pytest.raises(FileNotFoundError, match="database"):
        evaluate_spider(tiny_model, tokenizer, [dict(rows[0], db_id="flights")], spider_dir=spider_dir, progress=False)


def _schema() -> str:
    from moe_sieve.data.tasks import render_spider_schema

    return render_spider_schema(TABLES[0])


# --- loading and dispatch ---------------------------------------------------------------------------------


def test_load_task_rows_local_files_and_directories(tmp_path, spider_dir):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    task, rows = load_task_rows(f"gsm8k:{path}", max_examples=2)
    assert task == "gsm8k" and [r["answer"] for r in rows] == [r["answer"] for r in GSM8K_ROWS[:2]]
    assert rows[1]["_source"] == f"{path}:1"

    folder = tmp_path / "hellaswag"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [HELLASWAG_ROWS[1]])
    write_jsonl(folder / "validation.jsonl", HELLASWAG_ROWS)
    task, rows = load_task_rows(f"hellaswag:{folder}")  # evaluation defaults to the held-out split
    assert task == "hellaswag" and len(rows) == 2 and rows[0]["endings"] == HELLASWAG_ROWS[0]["endings"]
    assert rows[0]["_source"] == f"{folder}[validation]:0"
    assert len(load_task_rows(f"hellaswag:{folder}", split="train")[1]) == 1

    # Spider's release keeps tables.json next to its rows: found without spider_dir.
    write_jsonl(spider_dir / "dev.jsonl", SPIDER_ROWS)
    task, rows = load_task_rows(f"spider:{spider_dir / 'dev.jsonl'}")
    assert task == "spider" and rows[2]["query"] == SPIDER_ROWS[2]["query"]

    with pytest.raises(ValueError, match="evaluation needs a task"):
        load_task_rows(str(path))
    with pytest.raises(ValueError, match="--spider-dir"):
        load_task_rows(f"spider:{write_jsonl(tmp_path / 'dev.jsonl', SPIDER_ROWS)}")
    with pytest.raises(ValueError, match=r"row 1: missing field 'answer'"):
        load_task_rows(f"gsm8k:{write_jsonl(tmp_path / 'bad.jsonl', [GSM8K_ROWS[0], {'question': 'q'}])}")


def test_load_task_rows_hub_defaults_to_held_out_split(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, *, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(GSM8K_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task, rows = load_task_rows("gsm8k", max_examples=1)
    assert calls == [("openai/gsm8k", "main", "test")] and len(rows) == 1
    assert rows[0]["_source"] == "openai/gsm8k[test]:0"


def test_eval_tasks_are_a_registry_evaluate_reads_split_budget_and_result_spans_from(monkeypatch, tmp_path):
    """One data task plus one register_eval_task call make a task evaluable: evaluate takes its held-out split,
    its generation budget (unless given) and its likelihood result spans from the record."""
    from moe_sieve.data.tasks import TASKS, TaskSpec
    from moe_sieve.evaluation import EVAL_TASKS, likelihood, register_eval_task
    from moe_sieve.evaluation.gsm8k import result_spans
    from moe_sieve.evaluation.llm_adapters import default_max_new_tokens
    from moe_sieve.tiny import byte_level_tokenizer

    seen: dict = {}

    def score(model, tokenizer, rows, ctx):
        seen["budget"] = ctx.max_new_tokens
        predictions = [{"source": row["_source"], "correct": True} for row in rows]
        return EvalResult(task=ctx.task, n=len(rows), accuracy=1.0, predictions=predictions)

    def spans(completion):
        return [(0, 1)]

    def fake_score_gold(model, tokenizer, pairs, *, batch_size, progress, result_spans):
        seen["spans"] = result_spans
        return [{"gold_logprob": -1.0, "gold_tokens": 1} for _ in pairs]

    monkeypatch.setattr(likelihood, "score_gold", fake_score_gold)
    spec = TaskSpec("echo", "nowhere/echo", None, "train", ("q", "a"), lambda r: (r["q"], " " + r["a"]), "echo")
    monkeypatch.setitem(TASKS, "echo", spec)
    register_eval_task("echo", score, split="validation", max_new_tokens=7, result_spans=spans)
    try:
        folder = tmp_path / "echo"
        folder.mkdir()
        write_jsonl(folder / "train.jsonl", [{"q": "1+2=", "a": "3"}] * 2)
        write_jsonl(folder / "validation.jsonl", [{"q": "1+1=", "a": "2"}])
        result = evaluate(None, byte_level_tokenizer(), f"echo:{folder}", progress=False)
        assert (seen["budget"], seen["spans"], result.metadata["split"], result.n) == (7, spans, "validation", 1)
        assert result.metrics == {"accuracy": 1.0, "gold_logprob": -1.0, "gold_prob": pytest.approx(0.3679, abs=1e-4),
                                  "gold_nll_per_token": 1.0}  # fmt: skip
        evaluate(None, byte_level_tokenizer(), f"echo:{folder}", max_new_tokens=3, progress=False)
        assert seen["budget"] == 3
    finally:
        del EVAL_TASKS["echo"]
    assert EVAL_TASKS["gsm8k"].result_spans is result_spans and EVAL_TASKS["facts"].result_spans is None
    assert EVAL_TASKS["hellaswag"].budget(64) is None and not EVAL_TASKS["hellaswag"].gold_likelihood
    assert {EVAL_TASKS[t].budget() for t in ("commonsense-boolq", "math-aqua")} == {32, 256}
    assert all(EVAL_TASKS[t].budget() == default_max_new_tokens(t) for t in EVAL_TASKS if "-" in t)


def test_evaluate_dispatches_on_the_task(monkeypatch, tmp_path, tiny_model, tokenizer, spider_dir):
    stub_generate(monkeypatch, {format_gsm8k(row)[0]: " #### 5" for row in GSM8K_ROWS})
    result = evaluate(tiny_model, tokenizer, f"gsm8k:{write_jsonl(tmp_path / 'g.jsonl', GSM8K_ROWS)}", progress=False)
    assert isinstance(result, EvalResult) and result.task == "gsm8k"
    assert result.accuracy == pytest.approx(1 / 3)
    assert result.to_json()["predictions"][0]["correct"] is True
    monkeypatch.undo()

    # Real generation on the tiny model: random SQL, but the whole path runs and every row is recorded.
    write_jsonl(spider_dir / "dev.jsonl", SPIDER_ROWS)
    result = evaluate(tiny_model, tokenizer, f"spider:{spider_dir / 'dev.jsonl'}", max_new_tokens=6, progress=False)
    assert result.task == "spider" and result.n == 3 and len(result.predictions) == 3

    hella = write_jsonl(tmp_path / "h.jsonl", HELLASWAG_ROWS)
    result = evaluate(tiny_model, tokenizer, f"hellaswag:{hella}", max_examples=1, progress=False)
    assert result.task == "hellaswag" and result.n == 1 and result.accuracy_norm is not None


def test_one_eval_config_behind_eval_and_the_sweep(tmp_path):
    """`moe-sieve eval` exposes every EvalConfig field with its default; the sweep's EvalSettings is an EvalConfig
    (same fields and checks, plus its own defaults and `also`), and its errors name the file."""
    import dataclasses

    import typer

    from moe_sieve.cli import app
    from moe_sieve.evaluation import EvalConfig
    from moe_sieve.sweep.config import EvalSettings, SweepConfig

    command = typer.main.get_command(app).commands["eval"]
    options = {param.name: param.default for param in command.params}
    for f in dataclasses.fields(EvalConfig):
        assert f.name in options and (f.name == "data" or options[f.name] == f.default), f.name
    assert issubclass(EvalSettings, EvalConfig)
    names = [f.name for f in dataclasses.fields(EvalConfig)]
    assert [f.name for f in dataclasses.fields(EvalSettings)] == [*names, "also"]
    with pytest.raises(ValueError, match=r"--max-new-tokens\) must be an integer >= 1, got 0"):
        EvalConfig(data="gsm8k", max_new_tokens=0)
    sweep = {
        "name": "s",
        "models": ["m"],
        "tasks": [{"name": "t", "data": "spider", "eval": {"keep_distinct": True}}],
        "conditions": [{"name": "c"}],
        "seeds": [0],
    }
    config = SweepConfig.from_dict(sweep, source="s.yaml")
    assert config.tasks[0].eval.keep_distinct and config.tasks[0].eval.batch_size == 16
    sweep["eval"] = {"batch_size": 0}
    with pytest.raises(ValueError, match=r"s.yaml: eval: eval batch_size \(--batch-size\) must be an integer >= 1"):
        SweepConfig.from_dict(sweep, source="s.yaml")
