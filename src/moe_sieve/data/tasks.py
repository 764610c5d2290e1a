"""Calibration tasks: the paper's fine-tuning datasets (§5.1) and plain JSONL, as prompt -> completion pairs.

Profiling counts the tokens a fine-tuning run would feed the model, so every task is formatted the way it is
fine-tuned: a prompt and the target completion, kept apart so that counting can target either part.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RowFormatter = Callable[[Mapping[str, Any]], tuple[str, str]]

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class Example:
    """One calibration example; plain text is ``prompt=""``, ``completion=text``.

    ``source`` locates it for error messages: ``origin:index``, a 0-based row for data read through
    ``datasets`` (``openai/gsm8k[train]:17``) and a 1-based line for generic JSONL (``file.jsonl:18``).
    """

    prompt: str
    completion: str
    source: str


@dataclass
class TaskSpec:
    """A registered task: where its rows live on the hub and how one row becomes prompt and completion.

    ``configure``, when set, builds the formatter from a resource directory (Spider's schemas live in
    ``tables.json`` outside the rows); ``resource_file`` names the file it needs there.
    """

    name: str
    hub_path: str
    hub_config: str | None
    default_split: str
    required_fields: tuple[str, ...]
    format: RowFormatter
    description: str
    configure: Callable[[str | None], RowFormatter] | None = None
    resource_file: str | None = None
    skip_blank: str | None = None
    """Rows whose value in this field is blank are not examples (Wikitext's empty lines); row numbers stay."""

    def formatter(self, resource_dir: str | None = None) -> RowFormatter:
        return self.configure(resource_dir) if self.configure is not None else self.format


TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add (or replace) a task so ``--data NAME`` and ``NAME:PATH`` reach it."""
    TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


# --- formatters -------------------------------------------------------------------------------------------


def format_gsm8k(row: Mapping[str, Any]) -> tuple[str, str]:
    return f"Question: {row['question']}\nAnswer:", " " + str(row["answer"])


def preprocess_hellaswag(text: str) -> str:
    """lm-evaluation-harness's HellaSwag clean-up (``tasks/hellaswag/utils.py``): strip, `` [title]`` -> ``. ``,
    drop the other WikiHow markup (``[header]``, ``[step]``, ...), then one pass of double space -> single."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_query(row: Mapping[str, Any]) -> str:
    """The context as the harness builds it: ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``.

    Rows without ``ctx_a``/``ctx_b`` fall back to ``ctx``; rows without an activity label (not in the hub data)
    get no ``": "`` prefix.
    """
    if row.get("ctx_a") is not None and row.get("ctx_b") is not None:
        ctx = f"{row['ctx_a']} {str(row['ctx_b']).capitalize()}"
    elif row.get("ctx") is not None:
        ctx = str(row["ctx"])
    else:
        raise ValueError("missing field 'ctx' (or both 'ctx_a' and 'ctx_b')")
    activity = row.get("activity_label")
    return preprocess_hellaswag(f"{activity}: {ctx}" if activity else ctx)


def format_hellaswag(row: Mapping[str, Any]) -> tuple[str, str]:
    """Prompt and gold ending exactly as lm-evaluation-harness scores them (query, `` `` + preprocessed ending), so
    fine-tuning teaches the text that evaluation reads."""
    query = hellaswag_query(row)
    endings = row["endings"]
    if not isinstance(endings, (list, tuple)) or not endings:
        raise ValueError(f"'endings' must be a non-empty list, got {endings!r}")
    label = row["label"]
    if isinstance(label, str):
        if not label.strip():
            raise ValueError("empty 'label' (HellaSwag's test split is unlabelled; use train or validation)")
        try:
            label = int(label)
        except ValueError:
            raise ValueError(f"'label' must be an integer, got {row['label']!r}") from None
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise ValueError(f"'label' must be an integer, got {label!r}")
    if not 0 <= label < len(endings):
        raise ValueError(f"'label' {label} is outside 0..{len(endings) - 1} ({len(endings)} endings)")
    return query, " " + preprocess_hellaswag(str(endings[int(label)]))


def _spider_needs_dir(row: Mapping[str, Any]) -> tuple[str, str]:
    return _spider_formatter(None)(row)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _sql_name(name: str) -> str:
    return name if _IDENTIFIER.fullmatch(name) else '"' + name.replace('"', '""') + '"'


def render_spider_schema(db: Mapping[str, Any]) -> str:
    """``CREATE TABLE`` lines of one ``tables.json`` entry, with its primary and foreign keys."""
    tables = db["table_names_original"]
    columns = db["column_names_original"]
    types = db["column_types"]
    body: list[list[str]] = [[] for _ in tables]
    for (table, column), col_type in zip(columns, types, strict=True):
        if table >= 0:
            body[table].append(f"{_sql_name(column)} {col_type}")
    for key in db.get("primary_keys", []):
        cols = key if isinstance(key, list) else [key]
        names = ", ".join(_sql_name(columns[c][1]) for c in cols)
        body[columns[cols[0]][0]].append(f"PRIMARY KEY ({names})")
    for src, dst in db.get("foreign_keys", []):
        src_table, src_col = columns[src]
        dst_table, dst_col = columns[dst]
        target = f"{_sql_name(tables[dst_table])}({_sql_name(dst_col)})"
        body[src_table].append(f"FOREIGN KEY ({_sql_name(src_col)}) REFERENCES {target}")
    return "\n".join(f"CREATE TABLE {_sql_name(t)} ({', '.join(cols)});" for t, cols in zip(tables, body, strict=True))


def _spider_formatter(spider_dir: str | None) -> RowFormatter:
    if spider_dir is None:
        raise ValueError(
            "task spider needs the database schemas: pass --spider-dir (spider_dir=) pointing at the Spider "
            "folder holding tables.json"
        )
    path = Path(spider_dir)
    path = path if path.is_file() else path / "tables.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --spider-dir must be the Spider folder with tables.json")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        databases = {entry["db_id"]: entry for entry in entries}
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise ValueError(f"{path} is not a Spider tables.json (a list of databases with db_id): {err}") from None
    schemas: dict[str, str] = {}

    def format_spider(row: Mapping[str, Any]) -> tuple[str, str]:
        db_id = row["db_id"]
        if db_id not in schemas:
            if db_id not in databases:
                raise ValueError(f"db_id {db_id!r} is not in {path}")
            try:
                schemas[db_id] = render_spider_schema(databases[db_id])
            except (KeyError, IndexError, TypeError, ValueError) as err:
                raise ValueError(f"database {db_id!r} in {path} is malformed: {err!r}") from err
        prompt = f"-- Database: {db_id}\n{schemas[db_id]}\n-- Question: {row['question']}\n-- SQL:\n"
        return prompt, str(row["query"])

    return format_spider


register_task(
    TaskSpec(
        name="gsm8k",
        hub_path="openai/gsm8k",
        hub_config="main",
        default_split="train",
        required_fields=("question", "answer"),
        format=format_gsm8k,
        description="Grade-school math word problems; completion is the worked answer ending in '#### N'.",
    )
)
register_task(
    TaskSpec(
        name="hellaswag",
        hub_path="Rowan/hellaswag",
        hub_config=None,
        default_split="train",
        required_fields=("endings", "label"),
        format=format_hellaswag,
        description="Commonsense sentence completion; completion is the correct ending.",
    )
)
register_task(
    TaskSpec(
        name="spider",
        hub_path="xlangai/spider",
        hub_config=None,
        default_split="train",
        required_fields=("db_id", "question", "query"),
        format=_spider_needs_dir,
        description="Text-to-SQL; prompt holds the database schema (from --spider-dir) and the question.",
        configure=_spider_formatter,
        resource_file="tables.json",
    )
)

register_task(
    TaskSpec(
        name="facts",
        hub_path="moe-sieve/facts",
        hub_config=None,
        default_split="train",
        required_fields=("question", "answer"),
        format=format_gsm8k,
        description="Made-up facts (entity, relation -> 2-digit value) of the mini tasks; completion is the value. "
        "Not on the hub: write it with `python -m moe_sieve.minitasks.generate OUT` and pass facts:OUT/facts.",
    )
)


# --- loading ----------------------------------------------------------------------------------------------


def select_indices(n: int, subsample: float | None, max_examples: int | None, seed: int) -> list[int]:
    """Indices kept by ``subsample`` (seeded, original order) and then ``max_examples``."""
    indices = np.arange(n)
    if subsample is not None and subsample < 1:
        size = max(1, round(subsample * n))
        indices = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    if max_examples is not None:
        indices = indices[:max_examples]
    return [int(i) for i in indices]


def format_rows(
    rows: Iterable[Mapping[str, Any]], indices: list[int], origin: str, spec: TaskSpec, fmt: RowFormatter
) -> list[Example]:
    examples = []
    for index, row in zip(indices, rows, strict=True):
        for field in spec.required_fields:
            if row.get(field) is None:
                raise ValueError(
                    f"{origin} row {index}: missing field {field!r} "
                    f"(task {spec.name} needs {', '.join(spec.required_fields)})"
                )
        try:
            prompt, completion = fmt(row)
        except (ValueError, KeyError) as err:
            detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            raise ValueError(f"{origin} row {index}: {detail}") from err
        examples.append(Example(prompt, completion, f"{origin}:{index}"))
    return examples


def single_file_split_message(split: str, path: Path) -> str:
    return f"--split {split} needs a hub task or a dataset directory; {path} is a single file"


def load_task_dataset(spec: TaskSpec, path: Path | None, split: str | None) -> tuple[Any, str]:
    """The ``datasets.Dataset`` of a task (hub, local file or local directory) and its origin label."""
    import datasets

    if path is None:
        split = split or spec.default_split
        origin = f"{spec.hub_path}[{split}]"
        try:
            return datasets.load_dataset(spec.hub_path, spec.hub_config, split=split), origin
        except (OSError, ValueError) as err:
            raise ValueError(
                f"could not load {origin} from the Hugging Face hub: {err}. Without hub access, download the "
                f"data and pass {spec.name}:PATH (a .jsonl/.json/.parquet/.csv file or a dataset directory)"
            ) from err
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (from --data {spec.name}:{path})")
    if path.is_dir():
        split = split or spec.default_split
        origin = f"{path}[{split}]"
        return _read_dataset(f"could not load split {split!r} from {path}", str(path), split=split), origin
    if split is not None:
        raise ValueError(single_file_split_message(split, path))
    builder = LOCAL_FORMATS.get(path.suffix.lower())
    if builder is None:
        formats = ", ".join(LOCAL_FORMATS)
        raise ValueError(f"{path}: unsupported file type; use one of {formats} or a dataset directory")
    size = path.stat().st_size
    if builder == "json" and path.suffix.lower() == ".jsonl":
        # datasets' JSON reader names neither the line nor the byte of a bad row; this check does.
        if size and not sum(1 for _ in iter_jsonl_objects(path)):
            size = 0
    elif builder == "json" and size < 4096:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text (byte {err.start + 1})") from None
        if text in ("[]", "{}"):
            raise ValueError(f"{path}: no examples (an empty JSON {'list' if text == '[]' else 'object'})")
        size = size if text else 0
    if size == 0:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return _read_dataset(f"{path}: could not read the data", builder, data_files=str(path), split="train"), str(path)


def _read_dataset(failure: str, *args: Any, **kwargs: Any) -> Any:
    """``datasets.load_dataset`` of local files; whatever its builders raise (a truncated JSON file, a loading
    script it no longer runs, a split that is not there) becomes one error naming the file."""
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises DatasetGenerationError, RuntimeError, ValueError...
        generation = isinstance(err, datasets.exceptions.DatasetGenerationError) and err.__cause__ is not None
        cause = err.__cause__ if generation else err  # the builder's own error says what is wrong
        detail = " ".join(str(cause).split())[:300] or type(cause).__name__
        raise ValueError(f"{failure} ({type(cause).__name__}: {detail})") from err


def _load_task(
    spec: TaskSpec,
    path: Path | None,
    split: str | None,
    resource_dir: str | None,
    subsample: float | None,
    max_examples: int | None,
    seed: int,
) -> list[Example]:
    if resource_dir is None and path is not None and spec.resource_file is not None:
        folder = path if path.is_dir() else path.parent
        if (folder / spec.resource_file).is_file():
            resource_dir = str(folder)
    fmt = spec.formatter(resource_dir)
    dataset, origin = load_task_dataset(spec, path, split)
    if len(dataset) == 0:
        raise ValueError(f"{origin}: no examples")
    for field in spec.required_fields:
        if field not in dataset.column_names:
            raise ValueError(
                f"{origin} row 0: missing field {field!r} (no row has it; columns: {', '.join(dataset.column_names)})"
            )
    rows = list(range(len(dataset)))
    if spec.skip_blank is not None:
        rows = [i for i, value in enumerate(dataset[spec.skip_blank]) if value is not None and str(value).strip()]
        if not rows:
            raise ValueError(f"{origin}: no examples (every {spec.skip_blank!r} is blank)")
    indices = [rows[i] for i in select_indices(len(rows), subsample, max_examples, seed)]
    return format_rows(dataset.select(indices), indices, origin, spec, fmt)


def iter_jsonl_objects(path: Path, hint: str = "") -> Iterator[tuple[int, str, dict[str, Any]]]:
    """``(line number, "file:line", object)`` for each non-blank line; bad JSON names the file and line."""
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: not UTF-8 text (byte {err.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}{hint}")
            yield line_no, where, obj


def read_jsonl(path: str | Path) -> list[Example]:
    """Generic calibration JSONL: one object per line with ``text`` or ``prompt`` + ``completion``."""
    path = Path(path)
    examples = []
    accepted = "each line needs 'text', or 'prompt' and 'completion' (strings)"
    for _, where, obj in iter_jsonl_objects(path, f"; {accepted}"):
        has_text = "text" in obj
        has_pair = "prompt" in obj or "completion" in obj
        if has_text and has_pair:
            raise ValueError(f"{where}: has both 'text' and 'prompt'/'completion'; {accepted}")
        if has_text:
            prompt, completion = "", obj["text"]
        elif "prompt" in obj and "completion" in obj:
            prompt, completion = obj["prompt"], obj["completion"]
        else:
            missing = "'completion'" if "prompt" in obj else "'prompt'" if has_pair else "'text'"
            found = ", ".join(obj) or "none"
            raise ValueError(f"{where}: missing field {missing}; {accepted} (found: {found})")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError(f"{where}: fields must be strings; {accepted}")
        examples.append(Example(prompt, completion, where))
    return examples


def check_selection_args(subsample: float | None, max_examples: int | None) -> None:
    """Validate the row-selection options before any data is read."""
    if subsample is not None and not 0 < subsample <= 1:
        raise ValueError(f"--subsample must be in (0, 1], got {subsample}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"--max-examples must be >= 1, got {max_examples}")


def load_examples(
    data: str,
    *,
    split: str | None = None,
    max_examples: int | None = None,
    subsample: float | None = None,
    seed: int = 0,
    spider_dir: str | None = None,
) -> list[Example]:
    """Calibration examples from a task name (hub), ``TASK:PATH`` (local files in the hub schema) or a
    generic local ``.jsonl``; ``subsample`` keeps a seeded share (in original order), then ``max_examples``
    the first N."""
    check_selection_args(subsample, max_examples)
    if data in TASKS:
        return _load_task(TASKS[data], None, split, spider_dir, subsample, max_examples, seed)
    name, sep, rest = data.partition(":")
    if sep and name in TASKS and rest:
        return _load_task(TASKS[name], Path(rest), split, spider_dir, subsample, max_examples, seed)
    path = Path(data)
    if path.is_file() and path.suffix.lower() == ".jsonl":
        if split is not None:
            raise ValueError(single_file_split_message(split, path))
        examples = read_jsonl(path)
        if not examples:
            raise ValueError(f"{path}: no examples (the file is empty)")
        return [examples[i] for i in select_indices(len(examples), subsample, max_examples, seed)]
    if path.exists():
        raise ValueError(
            f"{path}: generic local data must be a .jsonl file with 'text' or 'prompt'+'completion' per "
            f"line; for a task's files in its hub schema pass TASK:PATH (tasks: {', '.join(sorted(TASKS))})"
        )
    raise ValueError(
        f"--data {data!r} is neither a registered task ({', '.join(sorted(TASKS))}), TASK:PATH, nor an "
        "existing local .jsonl file ('text' or 'prompt'+'completion' per line)"
    )
