"""The seeded mini-task generator: reproducible, split-disjoint, correct, and loadable by the task loaders."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from moe_sieve.data.tasks import load_examples
from moe_sieve.minitasks import SMALL_SIZES, generate_minitasks
from moe_sieve.minitasks.generate import main, number_word

SPLITS = ("train", "validation", "test")
EQUATION = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_query(db: Path, query: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


def tables_of(spider: Path, prompt: str) -> list[str]:
    db_id = prompt.splitlines()[0].removeprefix("-- Database: ")
    entry = next(e for e in json.loads((spider / "tables.json").read_text()) if e["db_id"] == db_id)
    return entry["table_names_original"]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("minitasks") / "seed0"
    generate_minitasks(root, seed=0, sizes=SMALL_SIZES)
    return root


def test_layout_counts_and_manifest(out):
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["generator_version"] >= 1
    for task in ("arith", "spider", "hellaswag"):
        for split in SPLITS:
            rows = read_jsonl(out / task / f"{split}.jsonl")
            assert len(rows) == SMALL_SIZES[f"{task}_{split}"] == manifest["counts"][f"{task}/{split}.jsonl"]
    assert len(read_jsonl(out / "corpus" / "train.jsonl")) == SMALL_SIZES["corpus_train_docs"]
    assert len(read_jsonl(out / "corpus" / "validation.jsonl")) == SMALL_SIZES["corpus_validation_docs"]
    assert manifest["corpus_train_bytes"] == (out / "corpus" / "train.jsonl").stat().st_size


def test_same_seed_same_bytes_other_seed_differs(out, tmp_path):
    again = tmp_path / "again"
    generate_minitasks(again, seed=0, sizes=SMALL_SIZES)
    assert all_files(again) == all_files(out)
    other = tmp_path / "other"
    generate_minitasks(other, seed=1, sizes=SMALL_SIZES)
    files, other_files = all_files(out), all_files(other)
    assert files.keys() == other_files.keys()
    for rel in ("arith/train.jsonl", "spider/train.jsonl", "hellaswag/train.jsonl", "corpus/train.jsonl"):
        assert files[rel] != other_files[rel], rel


@pytest.mark.parametrize(("task", "key"), [("arith", "question"), ("spider", "question"), ("hellaswag", "ctx")])
def test_splits_are_disjoint(out, task, key):
    seen: dict[str, str] = {}
    for split in SPLITS:
        for row in read_jsonl(out / task / f"{split}.jsonl"):
            assert row[key] not in seen, f"{row[key]!r} in {seen.get(row[key])} and {split}"
            seen[row[key]] = split


def test_arith_answers_are_correct(out):
    for split in SPLITS:
        for row in read_jsonl(out / "arith" / f"{split}.jsonl"):
            body, final = row["answer"].rsplit("\n#### ", 1)
            equations = EQUATION.findall(body)
            assert 1 <= len(equations) <= 2, row
            for a, op, b, result in equations:
                a, b, result = int(a), int(b), int(result)
                assert {"+": a + b, "-": a - b, "*": a * b}[op] == result >= 0, row
                assert 2 <= a <= 9 and 2 <= b <= 12 if op == "*" else 1 <= b <= 60, row
            assert int(final) == int(equations[-1][3]), row
    examples = load_examples(f"gsm8k:{out / 'arith'}", split="test")
    assert len(examples) == SMALL_SIZES["arith_test"]
    assert examples[0].prompt.startswith("Question: ") and examples[0].prompt.endswith("\nAnswer:")
    assert re.search(r"\n#### \d+$", examples[0].completion)


def test_spider_gold_queries_execute(out):
    tables = json.loads((out / "spider" / "tables.json").read_text())
    by_id = {entry["db_id"]: entry for entry in tables}
    assert 3 <= len(by_id) <= 4
    for entry in tables:
        assert entry["column_names_original"][0] == [-1, "*"]
        n_cols = len(entry["column_names_original"])
        assert len(entry["column_names"]) == len(entry["column_types"]) == n_cols
        assert 2 <= len(entry["table_names_original"]) == len(entry["table_names"]) <= 3
        assert len(entry["primary_keys"]) == len(entry["table_names_original"])
        for src, dst in entry["foreign_keys"]:
            assert 0 < src < n_cols and 0 < dst < n_cols
    for split in SPLITS:
        for row in read_jsonl(out / "spider" / f"{split}.jsonl"):
            db = out / "spider" / "database" / row["db_id"] / f"{row['db_id']}.sqlite"
            assert run_query(db, row["query"]), row


def test_spider_templates_cover_every_kind(tmp_path):
    root = tmp_path / "many"
    generate_minitasks(root, seed=3, sizes={**SMALL_SIZES, "spider_train": 400})
    queries = [r["query"] for r in read_jsonl(root / "spider" / "train.jsonl")]
    for fragment in ("count(*)", "WHERE", "max(", "min(", "ORDER BY", "LIMIT", "JOIN", "GROUP BY", "HAVING"):
        assert any(fragment in q for q in queries), fragment
    for row in read_jsonl(root / "spider" / "train.jsonl"):
        assert run_query(root / "spider" / "database" / row["db_id"] / f"{row['db_id']}.sqlite", row["query"]), row


def test_spider_loads_with_schema(out):
    spider = out / "spider"
    examples = load_examples(f"spider:{spider}", split="validation", spider_dir=str(spider))
    assert len(examples) == SMALL_SIZES["spider_validation"]
    first = examples[0]
    assert first.prompt.startswith("-- Database: ") and "CREATE TABLE " in first.prompt
    assert all(f"CREATE TABLE {t}" in first.prompt for t in tables_of(spider, first.prompt))
    assert first.prompt.endswith("-- SQL:\n") and first.completion.startswith("SELECT ")
    # tables.json beside the rows is found without spider_dir, as for Spider's own release.
    assert load_examples(f"spider:{spider}", split="test")[0].prompt.startswith("-- Database: ")


def test_hellaswag_rows_and_loader(out):
    for split in SPLITS:
        for row in read_jsonl(out / "hellaswag" / f"{split}.jsonl"):
            assert set(row) == {"activity_label", "ctx", "endings", "label"}
            assert row["label"] in {"0", "1", "2", "3"} and len(row["endings"]) == 4
            assert len(set(row["endings"])) == 4
        examples = load_examples(f"hellaswag:{out / 'hellaswag'}", split=split)
        assert len(examples) == SMALL_SIZES[f"hellaswag_{split}"]
    row = read_jsonl(out / "hellaswag" / "test.jsonl")[0]
    example = load_examples(f"hellaswag:{out / 'hellaswag'}", split="test")[0]
    assert example.prompt == f"{row['activity_label']}: {row['ctx']}"
    assert example.completion == " " + row["endings"][int(row["label"])]


def test_corpus_keeps_task_formats_and_held_out_items_out(out):
    docs = [row["text"] for split in ("train", "validation") for row in read_jsonl(out / "corpus" / f"{split}.jsonl")]
    text = "\n".join(docs)
    assert "#### " not in text and "Question:" not in text and "Answer:" not in text
    assert all(1 <= len(doc.splitlines()) <= 8 for doc in docs)
    held_ctx = [r["ctx"] for s in ("validation", "test") for r in read_jsonl(out / "hellaswag" / f"{s}.jsonl")]
    assert not any(ctx in text for ctx in held_ctx)
    lines = set(text.splitlines())
    held_sql = [r["question"] for s in ("validation", "test") for r in read_jsonl(out / "spider" / f"{s}.jsonl")]
    assert not any("-- " + q[0].lower() + q[1:].rstrip("?.") in lines for q in held_sql)
    # All four domains are present: equations, SQL, scenes, and prose or code.
    assert re.search(r"\d+ \+ \d+ = \d+", text) and "SELECT " in text and "CREATE TABLE" in text
    assert "def " in text and any(ending in text for ending in ("and lets it steep.", "pedals down the street."))
    for a, op, b, result in EQUATION.findall(text):
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(result)


def test_sizes_are_validated(tmp_path):
    with pytest.raises(ValueError, match="unknown size"):
        generate_minitasks(tmp_path, sizes={"arith_dev": 3})
    with pytest.raises(ValueError, match="distinct"):
        generate_minitasks(tmp_path, sizes={**SMALL_SIZES, "hellaswag_train": 6000})


def test_number_words():
    assert [number_word(n) for n in (0, 7, 19, 20, 42, 100, 119)] == [
        "zero", "seven", "nineteen", "twenty", "forty-two", "one hundred", "one hundred and nineteen",
    ]  # fmt: skip


def test_cli_small(tmp_path, capsys):
    assert main([str(tmp_path / "cli"), "--small", "--seed", "2"]) == 0
    assert "corpus/train.jsonl" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "manifest.json").read_text())["seed"] == 2


def test_arith_in_the_llm_adapters_math_format(out):
    """The same problems as arith/, one JSON list per split, loadable as Math50K (train) and as a math test set
    (eval reads the folder's test split), with an answer that LLM-Adapters' parser reads back from the output."""
    from moe_sieve.data.llm_adapters import extract_answer, is_correct
    from moe_sieve.evaluation import load_task_rows

    folder = out / "llm-adapters-math"
    manifest = json.loads((out / "manifest.json").read_text())
    for split in SPLITS:
        rows = json.loads((folder / f"{split}.json").read_text())
        arith = read_jsonl(out / "arith" / f"{split}.jsonl")
        assert len(rows) == len(arith) == manifest["counts"][f"llm-adapters-math/{split}.json"]
        for row, source in zip(rows, arith, strict=True):
            assert row["instruction"] == source["question"] and row["input"] == ""
            assert row["answer"] == source["answer"].rsplit("#### ", 1)[1]
            assert row["output"].endswith(f"The answer is {row['answer']}.")
            assert is_correct("math-gsm8k", extract_answer("math-gsm8k", row["output"]), row["answer"])
    train = load_examples(f"math50k:{folder}")
    assert len(train) == SMALL_SIZES["arith_train"] and train[0].prompt.endswith("### Response:\n")
    task, test_rows = load_task_rows(f"math-gsm8k:{folder}")
    assert task == "math-gsm8k" and len(test_rows) == SMALL_SIZES["arith_test"]
