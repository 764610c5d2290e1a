"""Spider: execution accuracy, the predicted SQL's result against the gold query's on the real database (§5.1).

Defaults follow the official test-suite evaluation (taoyds/test-suite-sql-eval, ``exec_eval.eval_exec_match``):
``> =``/``< =``/``! =`` rewritten, ``YEAR(CURDATE())`` read as 2020, DISTINCT removed from both queries
(``keep_distinct=True`` keeps it, the official ``--keep_distinct``), row order compared only when the gold query
contains ``order by``, columns matched up to a permutation, rows as a bag, values by Python equality (``1 == 1.0``,
``'1' != 1``), and every ``*.sqlite`` of the database's folder must agree (the test suite's database variants).

Deliberate differences, all making model-written SQL safer, never more lenient: the query runs in a child process
(``SqlSandbox``) on a read-only connection (``mode=ro``, ``query_only``, an authorizer admitting only reads, so
writes and ``ATTACH`` fail), under a wall-clock limit (default 5 s, official 60 s) enforced by killing the child,
an address-space cap, SQLite's string/blob length limit (3.11+) and caps on result rows and bytes; any of those
makes the prediction wrong. A gold query that fails is reported (the official evaluator asserts).
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import re
import select
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data.tasks import get_task
from . import common
from .common import EvalResult, source_of
from .registry import ScoreContext, register_eval_task

# Generation stops at the end of the first statement: a ';', a blank line or a new SQL comment.
STOPS = (";", "\n\n", "\n--")
MAX_NEW_TOKENS = 128  # generation budget when none is given
MAX_RESULT_ROWS = 200_000  # a runaway cross join fails instead of filling RAM
MAX_RESULT_BYTES = 64 * 2**20
MEMORY_LIMIT_BYTES = 2 * 2**30  # the child's address space (RLIMIT_AS)
PROGRESS_STEPS = 100  # SQLite VM steps between deadline checks inside the child
_MAX_PERMUTATIONS = 10_000
_WORKER = Path(__file__).with_name("_sql_worker.py")
_CUR_YEAR = re.compile(r"YEAR\s*\(\s*CURDATE\s*\(\s*\)\s*\)\s*", re.IGNORECASE)


class QueryTimeout(TimeoutError):
    """A statement ran past its time limit and was stopped."""


class QueryError(RuntimeError):
    """A statement failed in the sandbox (SQLite error, refused write, memory or size limit)."""


def database_path(spider_dir: str | Path, db_id: str) -> Path:
    """Spider's layout: ``database/{db_id}/{db_id}.sqlite`` under the release folder."""
    return Path(spider_dir) / "database" / db_id / f"{db_id}.sqlite"


def suite_databases(db_path: str | Path) -> list[Path]:
    """Every database the official evaluator runs a pair on: ``db_path`` and the other ``*.sqlite`` files of its
    folder (the test suite's variants)."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise FileNotFoundError(f"{db_path} not found")
    others = (p for p in db_path.parent.iterdir() if ".sqlite" in p.name and p.is_file() and p != db_path)
    return [db_path, *sorted(others)]


def cut_sql(text: str) -> str:
    """The first statement of a generation: up to the first ';', blank line or '--' line, stripped."""
    return common.cut_at(text, STOPS).strip()


def postprocess(sql: str) -> str:
    """The official evaluator's rewrites (``exec_eval.postprocess`` and ``replace_cur_year``)."""
    sql = sql.replace("> =", ">=").replace("< =", "<=").replace("! =", "!=")
    return _CUR_YEAR.sub("2020", sql)


def remove_distinct(sql: str) -> str:
    """The official ``parse.remove_distinct``: every sqlparse token spelled DISTINCT dropped."""
    import sqlparse

    parsed = sqlparse.parse(sql)
    if not parsed:
        return sql
    return "".join(t.value for t in parsed[0].flatten() if t.value.lower() != "distinct")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        return base64.b64decode(value["b"]) if "b" in value else float("nan")
    return value


class SqlSandbox:
    """A reusable child process that runs read-only SQL with hard limits; one per evaluation.

    Each query costs one JSON round trip (connections stay open per database); a query that outruns
    ``timeout_s`` is stopped inside the child by SQLite's progress handler, or, when one function call runs long,
    by killing the child, which is restarted for the next query. The database is never opened writable.
    """

    def __init__(
        self, *, memory_bytes: int = MEMORY_LIMIT_BYTES, max_rows: int = MAX_RESULT_ROWS,
        max_bytes: int = MAX_RESULT_BYTES, progress_steps: int = PROGRESS_STEPS, sqlite_limits: bool = True,
    ) -> None:  # fmt: skip
        self.memory_bytes, self.max_rows, self.max_bytes = memory_bytes, max_rows, max_bytes
        self.sqlite_limits = sqlite_limits  # False: as on Python 3.10, which has no Connection.setlimit
        self.progress_steps = progress_steps
        self._proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", str(_WORKER), str(self.memory_bytes), "1" if self.sqlite_limits else "0"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                bufsize=0,
            )
        return self._proc

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
            self.restarts += 1

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def __enter__(self) -> SqlSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, db_path: str | Path, sql: str, *, timeout_s: float = 5.0) -> list[tuple[Any, ...]]:
        """Rows of one statement; raises ``QueryTimeout`` past ``timeout_s`` (wall clock), else ``QueryError``."""
        path = Path(db_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        request = {
            "db": str(path.resolve()),
            "sql": sql,
            "timeout_s": timeout_s,
            "progress_steps": self.progress_steps,
            "max_rows": self.max_rows,
            "max_bytes": self.max_bytes,
        }
        try:
            proc.stdin.write((json.dumps(request) + "\n").encode())
            proc.stdin.flush()
        except BrokenPipeError:
            self._kill()
            raise QueryError("the SQL sandbox process died") from None
        # Half a second of grace over the in-process deadline, for the child to report an interrupt itself; the
        # reply is read in chunks under the same deadline, so a child stuck mid-line cannot hold the parent either.
        deadline = time.monotonic() + timeout_s + 0.5
        buffer = bytearray()
        fd = proc.stdout.fileno()
        while not buffer.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self._kill()
                raise QueryTimeout(f"timed out after {timeout_s:g}s (sandbox process killed)")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                self._kill()
                raise QueryError("the SQL sandbox process died (memory limit?)")
            buffer += chunk
        line = buffer.decode()
        reply = json.loads(line)
        if "error" in reply:
            if "interrupted" in reply["error"]:
                raise QueryTimeout(f"timed out after {timeout_s:g}s")
            raise QueryError(reply["error"])
        return [tuple(_decode(v) for v in row) for row in reply["rows"]]


_DEFAULT_SANDBOX: SqlSandbox | None = None


def _default_sandbox() -> SqlSandbox:
    """One shared worker for calls without their own sandbox (it exits with this process)."""
    global _DEFAULT_SANDBOX
    if _DEFAULT_SANDBOX is None:
        _DEFAULT_SANDBOX = SqlSandbox()
        atexit.register(_DEFAULT_SANDBOX.close)
    return _DEFAULT_SANDBOX


def execute_sql(
    db_path: str | Path, sql: str, *, timeout_s: float = 5.0, sandbox: SqlSandbox | None = None
) -> list[tuple[Any, ...]]:
    """Rows of one read-only statement on ``db_path``, run in ``sandbox`` (a shared one by default)."""
    return (sandbox or _default_sandbox()).execute(db_path, sql, timeout_s=timeout_s)


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
    db_path: str | Path, predicted: str, gold: str, *, timeout_s: float = 5.0, keep_distinct: bool = False,
    sandbox: SqlSandbox | None = None,
) -> tuple[bool, str | None]:  # fmt: skip
    """``(correct, error)`` by the official rules: both queries post-processed (and DISTINCT removed unless
    ``keep_distinct``), run on every database of the test suite, results compared; any failure of the prediction
    is wrong."""
    if not predicted.strip():
        return False, "empty query"
    predicted, gold = postprocess(predicted), postprocess(gold)
    if not keep_distinct:
        predicted, gold = remove_distinct(predicted), remove_distinct(gold)
    ordered = "order by" in gold.lower()  # the official test: a plain substring
    for db in suite_databases(db_path):
        try:
            gold_rows = execute_sql(db, gold, timeout_s=timeout_s, sandbox=sandbox)
        except Exception as err:  # a broken gold query is reported, not raised mid-run
            return False, f"gold query failed on {db.name}: {type(err).__name__}: {err}"
        try:
            pred_rows = execute_sql(db, predicted, timeout_s=timeout_s, sandbox=sandbox)
        except Exception as err:  # model output may fail in any way; that is just a wrong answer
            return False, f"{type(err).__name__}: {err}"
        if not results_match(gold_rows, pred_rows, ordered=ordered):
            return False, None
    return True, None


def evaluate_spider(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    spider_dir: str | Path,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 8,
    timeout_s: float = 5.0,
    keep_distinct: bool = False,
    progress: bool = True,
) -> EvalResult:
    """Greedy SQL from the task's schema prompt, cut to one statement, scored by the official test-suite
    execution accuracy (``keep_distinct``: its strict-DISTINCT variant)."""
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
    with SqlSandbox() as sandbox:
        for i, (row, output) in enumerate(zip(rows, outputs, strict=True)):
            sql, gold = cut_sql(output), str(row["query"])
            correct, error = execution_match(
                database_path(spider_dir, row["db_id"]), sql, gold, timeout_s=timeout_s,
                keep_distinct=keep_distinct, sandbox=sandbox,
            )  # fmt: skip
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
        metadata={
            "metric": "execution_accuracy",
            "definition": "test-suite-sql-eval exec_eval" + (" --keep_distinct" if keep_distinct else ""),
            "max_new_tokens": max_new_tokens,
            "timeout_s": timeout_s,
        },
    )


def _score(model: Any, tokenizer: Any, rows: list[dict[str, Any]], ctx: ScoreContext) -> EvalResult:
    if ctx.resource_dir is None:  # load_task_rows refuses Spider rows without their schemas first
        raise ValueError("spider: evaluation needs the Spider folder (tables.json, database/); pass --spider-dir")
    return evaluate_spider(
        model,
        tokenizer,
        rows,
        spider_dir=ctx.resource_dir,
        max_new_tokens=ctx.max_new_tokens,
        batch_size=ctx.batch_size,
        timeout_s=ctx.timeout_s,
        keep_distinct=ctx.keep_distinct,
        progress=ctx.progress,
    )


# Spider's test databases are not public: the held-out split is validation
register_eval_task("spider", _score, split="validation", max_new_tokens=MAX_NEW_TOKENS)
