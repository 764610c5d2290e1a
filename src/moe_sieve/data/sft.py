"""Supervised fine-tuning data: task examples (§5.1) or chat JSONL as token ids with completion-only labels.

Loss is taken on the completion alone (the prompt is context, not a target), so labels are -100 on prompt
tokens. Tokenisation is the profiler's (``calibration.tokenize_example``): the routing that selected the
experts was measured on exactly the token sequences that fine-tuning then feeds the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from .calibration import pad_token_id_for, tokenize_example
from .tasks import (
    TASKS,
    Example,
    check_selection_args,
    iter_jsonl_objects,
    load_examples,
    select_indices,
    single_file_split_message,
)

Overflow = Literal["truncate", "drop"]

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and transformers' causal-LM loss) skips
MAX_DROPPED_SOURCES = 20
_PAIR_FIELDS = ("text", "prompt", "completion")


# --- loading ----------------------------------------------------------------------------------------------


def _is_generic_jsonl(data: str) -> Path | None:
    """The path when ``load_examples`` would read ``data`` as a generic JSONL file (not a task), else None."""
    if data in TASKS:
        return None
    name, sep, rest = data.partition(":")
    if sep and name in TASKS and rest:
        return None
    path = Path(data)
    return path if path.is_file() and path.suffix.lower() == ".jsonl" else None


def _read_chat_rows(path: Path) -> list[tuple[int, list[Any]]] | None:
    """``(line, messages)`` of a JSONL file of chat rows, or None when no row is a chat row.

    A file either is all chat rows or has none: a mix is an error, since the two formats cannot share one
    prompt/completion convention.
    """
    text = path.read_text(encoding="utf-8-sig")
    if '"messages"' not in text:  # cheap pre-check: plain files go straight to read_jsonl
        return None
    rows: list[tuple[int, Any]] = [(line_no, obj) for line_no, _, obj in iter_jsonl_objects(path)]
    chat = [("messages" in obj) for _, obj in rows]
    if not any(chat):
        return None
    first_line, _ = rows[0]
    first_kind = "chat 'messages'" if chat[0] else "'text' or 'prompt'+'completion'"
    for (line_no, obj), is_chat in zip(rows, chat, strict=True):
        where = f"{path}:{line_no}"
        both = [name for name in _PAIR_FIELDS if name in obj]
        if is_chat and both:
            raise ValueError(f"{where}: has both 'messages' and {', '.join(repr(n) for n in both)}; use one format")
        if is_chat != chat[0]:
            kind = "chat 'messages'" if is_chat else "no 'messages'"
            raise ValueError(
                f"{where}: mixes formats: this row has {kind} but line {first_line} is {first_kind}; "
                "a file must be all chat rows or all 'text'/'prompt'+'completion' rows"
            )
    return [(line_no, _check_messages(obj["messages"], f"{path}:{line_no}")) for line_no, obj in rows]


def _check_messages(messages: Any, where: str) -> list[Any]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"{where}: messages[{i}] must be an object with a string 'role', got {message!r}")
    last = messages[-1]
    if last["role"] != "assistant":
        raise ValueError(
            f"{where}: the last message must have role 'assistant' (it is the completion to learn), "
            f"got role {last['role']!r}"
        )
    if not isinstance(last.get("content"), str):
        raise ValueError(f"{where}: the last (assistant) message needs a string 'content'")
    return messages


def chat_example(messages: Sequence[Mapping[str, Any]], tokenizer: Any, source: str) -> Example:
    """Prompt = the conversation before the last (assistant) turn with the generation prompt; completion =
    the rest of the full rendering, so that prompt + completion is exactly what the template renders."""
    try:
        prompt = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    except Exception as err:  # jinja2 errors and raise_exception() from templates: name the row
        raise ValueError(f"{source}: the chat template failed on this row: {err}") from err
    if not full.startswith(prompt):
        pairs = enumerate(zip(prompt, full, strict=False))
        at = next((i for i, (a, b) in pairs if a != b), min(len(prompt), len(full)))
        start = max(0, at - 30)
        raise ValueError(
            f"{source}: the chat template's rendering of the whole conversation does not start with its "
            "rendering of the prompt (messages before the last, with the generation prompt), so the "
            f"completion cannot be split off; they differ at character {at}: prompt has "
            f"{prompt[start : at + 20]!r}, full text has {full[start : at + 20]!r}"
        )
    return Example(prompt, full[len(prompt) :], source)


def load_sft_examples(
    data: str,
    *,
    split: str | None = None,
    max_examples: int | None = None,
    subsample: float | None = None,
    seed: int = 0,
    spider_dir: str | None = None,
    tokenizer: Any = None,
) -> list[Example]:
    """``load_examples`` plus generic JSONL whose rows hold chat ``messages`` (rendered with ``tokenizer``'s
    chat template); selection (``subsample``, then ``max_examples``) is the same, and only selected rows
    are rendered."""
    path = _is_generic_jsonl(data)
    rows = _read_chat_rows(path) if path is not None else None
    if path is None or rows is None:
        return load_examples(
            data, split=split, max_examples=max_examples, subsample=subsample, seed=seed, spider_dir=spider_dir
        )
    if split is not None:
        raise ValueError(single_file_split_message(split, path))
    check_selection_args(subsample, max_examples)
    if tokenizer is None:
        raise ValueError(f"{path}: chat 'messages' rows need a tokenizer (its chat template renders them)")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{path}: chat 'messages' rows need a chat template, and this tokenizer has none; use a chat "
            "(instruct) model's tokenizer, set tokenizer.chat_template, or write 'prompt'+'completion' rows"
        )
    selected = [rows[i] for i in select_indices(len(rows), subsample, max_examples, seed)]
    return [chat_example(messages, tokenizer, f"{path}:{line_no}") for line_no, messages in selected]


# --- tokenisation -----------------------------------------------------------------------------------------


@dataclass
class SFTItem:
    """One training sequence; ``labels`` is -100 where no loss is taken (the prompt)."""

    input_ids: list[int]
    labels: list[int]
    source: str
    truncated: bool = False

    @property
    def completion_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _check_rule(max_length: int, overflow: str) -> None:
    if max_length < 1:
        raise ValueError(f"--max-length must be >= 1, got {max_length}")
    if overflow not in get_args(Overflow):
        raise ValueError(f"overflow must be one of {', '.join(get_args(Overflow))}, got {overflow!r}")


def _eos_id(tokenizer: Any) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return int(eos) if isinstance(eos, int) else None


def tokenize_for_sft(
    example: Example,
    tokenizer: Any,
    max_length: int,
    *,
    overflow: Overflow = "truncate",
    add_eos: bool = True,
) -> SFTItem | None:
    """Prompt (with special tokens) + completion (without) + EOS, labelled on completion and EOS only.

    EOS teaches the model to stop after the answer; it is not added twice when the completion already
    ends in it (chat templates often render it). Over ``max_length``: ``truncate`` keeps the first
    ``max_length`` tokens, ``drop`` drops the example. None means dropped, which also happens when no
    completion token is left, since such an example has no loss to learn from.
    """
    _check_rule(max_length, overflow)
    # Only the first max_length (+ a BOS that may be dropped, + EOS) tokens matter: a huge row is not
    # tokenized whole. ``cut`` means the row is longer than that anyway.
    tokenized = tokenize_example(example, tokenizer, None, exact_tokens=max_length + 2)
    input_ids, is_completion = tokenized.input_ids, tokenized.is_completion
    bos = getattr(tokenizer, "bos_token", None)
    if (
        bos
        and example.prompt.startswith(bos)
        and len(input_ids) > 1
        and input_ids[0] == input_ids[1] == getattr(tokenizer, "bos_token_id", None)
    ):
        # A chat template that renders its own BOS would get a second one from the tokenizer.
        input_ids, is_completion = input_ids[1:], is_completion[1:]
    eos = _eos_id(tokenizer)
    if tokenized.cut:  # its end (and any EOS) lies beyond max_length
        pass
    elif add_eos and eos is not None and not (is_completion and is_completion[-1] and input_ids[-1] == eos):
        input_ids, is_completion = [*input_ids, eos], [*is_completion, True]
    truncated = tokenized.cut or len(input_ids) > max_length
    if truncated:
        if overflow == "drop":
            return None
        input_ids, is_completion = input_ids[:max_length], is_completion[:max_length]
    if not any(is_completion):
        return None
    labels = [tok if flag else IGNORE_INDEX for tok, flag in zip(input_ids, is_completion, strict=True)]
    return SFTItem(input_ids, labels, example.source, truncated)


@dataclass
class SFTReport:
    """What became of the examples, so a silent loss of data (too short ``max_length``) shows up in logs."""

    total: int
    kept: int
    truncated: int
    dropped: int
    dropped_sources: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    tokens: int = 0
    max_length: int = 0
    overflow: str = "truncate"
    empty: int = 0  # rows with an empty text/completion, left out
    empty_sources: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        line = f"{self.total} examples: {self.kept} kept, {self.truncated} truncated, {self.dropped} dropped"
        if self.dropped:
            if self.overflow == "drop":
                why = f"> {self.max_length} tokens"
            else:
                why = f"no completion token in the first {self.max_length}"
            line += f" ({why}, rule {self.overflow})"
        if self.empty:
            line += f", {self.empty} left out with an empty text (e.g. {self.empty_sources[0]})"
        return f"{line}; {self.tokens} tokens, {self.completion_tokens} with loss"


def _origins(examples: Sequence[Example]) -> str:
    seen: dict[str, None] = {}
    for example in examples:
        seen.setdefault(example.source.rpartition(":")[0] or example.source, None)
    names = list(seen)
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def build_sft_dataset(
    examples: Sequence[Example],
    tokenizer: Any,
    max_length: int,
    overflow: Overflow = "truncate",
    *,
    add_eos: bool = True,
) -> tuple[Any, SFTReport]:
    """A ``datasets.Dataset`` of ``input_ids`` and ``labels`` and the report of what was kept, cut and dropped."""
    import datasets

    _check_rule(max_length, overflow)
    if not examples:
        raise ValueError("no examples to build a fine-tuning dataset from")
    items: list[SFTItem] = []
    dropped: list[str] = []
    empty: list[str] = []
    for example in examples:
        if not example.completion.strip():  # nothing to learn but an EOS: left out, and counted
            empty.append(example.source)
            continue
        item = tokenize_for_sft(example, tokenizer, max_length, overflow=overflow, add_eos=add_eos)
        if item is None:
            dropped.append(example.source)
        else:
            items.append(item)
    report = SFTReport(
        total=len(examples),
        kept=len(items),
        truncated=sum(item.truncated for item in items),
        dropped=len(dropped),
        dropped_sources=dropped[:MAX_DROPPED_SOURCES],
        completion_tokens=sum(item.completion_tokens for item in items),
        tokens=sum(len(item.input_ids) for item in items),
        max_length=max_length,
        overflow=overflow,
        empty=len(empty),
        empty_sources=empty[:MAX_DROPPED_SOURCES],
    )
    if len(empty) == len(examples):
        raise ValueError(f"{_origins(examples)}: all {len(examples)} examples have an empty text/completion")
    if not items:
        hint = "raise --max-length" + (" or use overflow truncate" if overflow == "drop" else "")
        raise ValueError(
            f"{_origins(examples)}: all {len(examples)} examples were dropped by the overflow rule {overflow!r} "
            f"at max_length {max_length} (no example keeps a completion token); {hint}"
        )
    dataset = datasets.Dataset.from_dict(
        {"input_ids": [item.input_ids for item in items], "labels": [item.labels for item in items]}
    )
    return dataset, report


# --- batching ---------------------------------------------------------------------------------------------


@dataclass
class SFTCollator:
    """Right-pads ``input_ids`` (pad id) and ``labels`` (-100) and masks the padding; a Trainer data_collator.

    The pad id is ``pad_token_id`` when given, else the tokenizer's pad, else EOS, else 0: padded positions
    are masked out and carry no loss, so any id works.
    """

    tokenizer: Any = None
    pad_to_multiple_of: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            self.pad_token_id = pad_token_id_for(self.tokenizer) if self.tokenizer is not None else 0
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        rows = []
        for i, feature in enumerate(features):
            ids, labels = [int(t) for t in feature["input_ids"]], [int(t) for t in feature["labels"]]
            if len(ids) != len(labels):
                raise ValueError(f"batch row {i}: {len(ids)} input_ids but {len(labels)} labels")
            rows.append((ids, labels))
        width = max(len(ids) for ids, _ in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), int(self.pad_token_id), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, (ids, labs) in enumerate(rows):
            input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[b, : len(labs)] = torch.tensor(labs, dtype=torch.long)
            attention_mask[b, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
