"""Spider: execution accuracy, the predicted SQL's result against the gold query's on the real database (§5.1).

Model-generated SQL is untrusted: each database is opened read-only (``mode=ro`` plus ``PRAGMA query_only``),
an authorizer admits nothing but reads, and a progress handler aborts any statement that runs past its time
limit. A query that errors, writes, or times out simply counts as wrong.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data.tasks import get_task
from . import common
from .common import EvalResult, source_of

# Generation stops at the end of the first statement: a ';', a blank line or a new SQL comment.
STOPS = (";", "\n\n", "\n--")
MAX_RESULT_ROWS = 200_000  # bounds memory: a runaway cross join fails instead of filling RAM
_MAX_PERMUTATIONS = 10_000
_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)
_READ_ACTIONS = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
)


class QueryTimeout(sqlite3.OperationalError):
    """A statement ran past its time limit and was interrupted."""


def database_path(spider_dir: str | Path, db_id: str) -> Path:
    """Spider's layout: ``database/{db_id}/{db_id}.sqlite`` under the release folder."""
    return Path(spider_dir) / "database" / db_id / f"{db_id}.sqlite"


def cut_sql(text: str) -> str:
    """The first statement of a generation: up to the first ';', blank line or '--' line, stripped."""
    return common.cut_at(text, STOPS).strip()


def _authorize(action: int, *args: Any) -> int:
    return sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY


def execute_sql(db_path: str | Path, sql: str, *, timeout_s: float = 5.0) -> list[tuple[Any, ...]]:
    """Rows of one read-only statement on ``db_path``; raises ``sqlite3.Error`` (``QueryTimeout`` on timeout)."""
    path = Path(db_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    try:
        conn.execute("PRAGMA query_only = ON")
        conn.set_authorizer(_authorize)
        # Spider's databases hold some text that is not valid UTF-8; the official evaluator ignores it too.
        conn.text_factory = lambda raw: raw.decode(errors="ignore")
        deadline = time.monotonic() + timeout_s
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
        try:
            cursor = conn.execute(sql)
            rows: list[tuple[Any, ...]] = []
            while batch := cursor.fetchmany(1000):
                rows.extend(batch)
                if len(rows) > MAX_RESULT_ROWS:
                    raise sqlite3.OperationalError(f"result has more than {MAX_RESULT_ROWS} rows")
        except sqlite3.OperationalError as err:
            if time.monotonic() > deadline and "interrupt" in str(err):
                raise QueryTimeout(f"timed out after {timeout_s:g}s") from err
            raise
        return rows
    finally:
        conn.close()


def _column_assignments(candidates: list[list[int]]) -> Iterator[tuple[int, ...]]:
    """Distinct-column assignments, one candidate per gold column (depth-first)."""
    chosen: list[int] = []

    def walk(col: int) -> Iterator[tuple[int, ...]]:
        if col == len(candidates):
            yield tuple(chosen)
            return
        for j in candidates[col]:
            if j not in chosen:
                chosen.append(j)
                yield from walk(col + 1)
                chosen.pop()

    return walk(0)


def results_match(gold: Sequence[tuple[Any, ...]], pred: Sequence[tuple[Any, ...]], ordered: bool) -> bool:
    """Whether two results hold the same rows, up to a reordering of the columns.

    Rows compare as multisets unless ``ordered`` (the gold query sorts). Column order and aliases are free,
    as in Spider's official test-suite evaluation: ``SELECT a, b`` matches ``SELECT b AS y, a AS x``.
    """
    if len(gold) != len(pred):
        return False
    if not gold:
        return True
    width = len(gold[0])
    if any(len(row) != width for row in pred):
        return False
    gold_columns = [Counter(row[i] for row in gold) for i in range(width)]
    pred_columns = [Counter(row[j] for row in pred) for j in range(width)]
    candidates = [[j for j in range(width) if pred_columns[j] == gold_columns[i]] for i in range(width)]
    if not all(candidates):
        return False
    gold_rows = list(gold) if ordered else Counter(gold)
    for tried, perm in enumerate(_column_assignments(candidates)):
        if tried >= _MAX_PERMUTATIONS:
            break
        permuted = [tuple(row[j] for j in perm) for row in pred]
        if (permuted if ordered else Counter(permuted)) == gold_rows:
            return True
    return False


def execution_match(
    db_path: str | Path, predicted: str, gold: str, *, timeout_s: float = 5.0
) -> tuple[bool, str | None]:
    """``(correct, error)``: run both queries and compare results; any failure of the prediction is wrong."""
    try:
        gold_rows = execute_sql(db_path, gold, timeout_s=timeout_s)
    except Exception as err:  # a broken gold query is reported, not raised mid-run
        return False, f"gold query failed: {type(err).__name__}: {err}"
    if not predicted.strip():
        return False, "empty query"
    try:
        pred_rows = execute_sql(db_path, predicted, timeout_s=timeout_s)
    except Exception as err:  # model output may fail in any way; that is just a wrong answer
        return False, f"{type(err).__name__}: {err}"
    return results_match(gold_rows, pred_rows, ordered=bool(_ORDER_BY.search(gold))), None


def evaluate_spider(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    spider_dir: str | Path,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    timeout_s: float = 5.0,
    progress: bool = True,
) -> EvalResult:
    """Greedy SQL from the task's schema prompt, cut to one statement, scored by execution accuracy."""
    if not rows:
        raise ValueError("spider: no examples to evaluate")
    spider_dir = Path(spider_dir)
    spider_dir = spider_dir.parent if spider_dir.is_file() else spider_dir  # a tables.json path names its folder
    missing = sorted({str(row["db_id"]) for row in rows if not database_path(spider_dir, row["db_id"]).is_file()})
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} Spider database(s) missing under {spider_dir / 'database'}, e.g. "
            f"{database_path(spider_dir, missing[0])}: spider_dir must be the Spider release folder"
        )
    fmt = get_task("spider").formatter(str(spider_dir))
    prompts = [fmt(row)[0] for row in rows]
    outputs = common.generate_completions(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stops=STOPS,
        progress=progress,
        label="spider",
    )
    predictions = []
    for i, (row, output) in enumerate(zip(rows, outputs, strict=True)):
        sql, gold = cut_sql(output), str(row["query"])
        correct, error = execution_match(database_path(spider_dir, row["db_id"]), sql, gold, timeout_s=timeout_s)
        predictions.append(
            {
                "index": i,
                "source": source_of(row, i),
                "db_id": row["db_id"],
                "prediction": sql,
                "gold": gold,
                "correct": correct,
                "error": error,
            }
        )
    return EvalResult(
        task="spider",
        n=len(predictions),
        accuracy=sum(p["correct"] for p in predictions) / len(predictions),
        predictions=predictions,
        metadata={"metric": "execution_accuracy", "max_new_tokens": max_new_tokens, "timeout_s": timeout_s},
    )
