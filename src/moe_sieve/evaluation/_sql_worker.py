"""Child process that runs model-written SQL for the Spider evaluator (``spider.SqlSandbox``).

Run as a script by path (``python -I _sql_worker.py MEMORY_BYTES SQLITE_LIMITS``), so it imports nothing but the
standard library. It caps its own address space (RLIMIT_AS), then answers one JSON request per stdin line with one JSON
line: ``{"rows": [...]}`` or ``{"error": "Type: message"}``. The parent kills it when a query outruns the wall-clock
limit; the progress handler below ends most runaway statements earlier without losing the process.
"""

from __future__ import annotations

import base64
import json
import resource
import sqlite3
import sys
import time

_READ_ACTIONS = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
)
_LIMITS = {  # sqlite3.Connection.setlimit exists on Python 3.11+; RLIMIT_AS bounds 3.10 too.
    "SQLITE_LIMIT_LENGTH": 10_000_000,  # largest string/blob: zeroblob(900000000) fails at once
    "SQLITE_LIMIT_SQL_LENGTH": 1_000_000,
}


def _authorize(action: int, *args: object) -> int:
    return sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY


def _connect(path: str, limits: bool) -> sqlite3.Connection:
    from pathlib import Path

    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    conn.execute("PRAGMA query_only = ON")
    conn.set_authorizer(_authorize)
    conn.text_factory = lambda raw: raw.decode(errors="ignore")  # as the official evaluator
    if limits and hasattr(conn, "setlimit"):
        for name, value in _LIMITS.items():
            conn.setlimit(getattr(sqlite3, name), value)
    return conn


def _size(value: object) -> int:
    return len(value) if isinstance(value, (str, bytes)) else 8


def _encode(value: object) -> object:
    if isinstance(value, bytes):
        return {"b": base64.b64encode(value).decode()}
    if isinstance(value, float) and value != value:
        return {"nan": 1}
    return value


def _run(conn: sqlite3.Connection, request: dict) -> dict:
    deadline = time.monotonic() + request["timeout_s"]
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), request["progress_steps"])
    max_rows, max_bytes = request["max_rows"], request["max_bytes"]
    rows, size = [], 0
    for row in conn.execute(request["sql"]):  # row by row, so a cap trips before the next row is built
        size += sum(_size(v) for v in row) + 8
        if size > max_bytes:
            raise sqlite3.OperationalError(f"result is larger than {max_bytes} bytes")
        rows.append([_encode(v) for v in row])
        if len(rows) > max_rows:
            raise sqlite3.OperationalError(f"result has more than {max_rows} rows")
    return {"rows": rows}


def main() -> None:
    memory, limits = int(sys.argv[1]), sys.argv[2] == "1"
    if memory > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    connections: dict[str, sqlite3.Connection] = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["db"] not in connections:
                connections[request["db"]] = _connect(request["db"], limits)
            reply = _run(connections[request["db"]], request)
        except MemoryError:
            reply = {"error": "MemoryError: the query exceeded the sandbox's memory limit"}
        except Exception as err:  # any failure of model-written SQL is an answer, not a crash
            reply = {"error": f"{type(err).__name__}: {err}"}
        try:
            text = json.dumps(reply)
        except MemoryError:
            text = json.dumps({"error": "MemoryError: the result exceeded the sandbox's memory limit"})
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
