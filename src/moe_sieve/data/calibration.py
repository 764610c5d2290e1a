"""Tokenisation and padded batches for the profiler, with a mask of the tokens whose routing counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from .tasks import Example

CountTokens = Literal["all", "prompt", "completion"]


@dataclass
class TokenizedExample:
    """Token ids of one example and which of them belong to the completion.

    ``has_prompt`` is False for plain text, whose prompt part is at most the tokenizer's BOS.
    """

    input_ids: list[int]
    is_completion: list[bool]
    source: str
    has_prompt: bool = True
    cut: bool = False  # more tokens follow that were not tokenized (only the needed prefix was)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class CalibrationBatch:
    """One right-padded forward pass; ``example_index`` maps rows back to the example list."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long
    count_mask: torch.Tensor  # [B, T] bool, False on padding
    example_index: torch.Tensor  # [B] long
    num_tokens: int  # real (non-padding) tokens


def _ids(encoding: Any) -> list[int]:
    return [int(i) for i in encoding["input_ids"]]


PREFIX_MARGIN = 16  # tokens dropped at a prefix's cut, where tokenization may differ from the full text's


def encode_prefix(text: str, tokenizer: Any, add_special_tokens: bool, need: int | None) -> tuple[list[int], bool]:
    """Token ids of ``text`` of which at least the first ``need`` equal the full text's; ``cut`` when more follow.

    A 50 MB row with ``--max-length 16`` must not tokenize 50 MB: tokenize a growing prefix (cut before a
    whitespace, where pre-tokenizers split) until it yields ``need`` tokens plus a margin, and drop the margin,
    whose tokens may differ at the cut. Short texts are tokenized whole, exactly as before.
    """
    chars = max(1024, 16 * ((need or 0) + PREFIX_MARGIN))
    while need is not None and chars < len(text):
        end = chars
        space = max(text.rfind(" ", chars // 2, chars), text.rfind("\n", chars // 2, chars))
        if space > 0:
            end = space
        ids = _ids(tokenizer(text[:end], add_special_tokens=add_special_tokens))
        if len(ids) >= need + PREFIX_MARGIN:
            return ids[: len(ids) - PREFIX_MARGIN], True
        chars *= 4
    return _ids(tokenizer(text, add_special_tokens=add_special_tokens)), False


def tokenize_example(
    example: Example, tokenizer: Any, max_length: int | None, *, exact_tokens: int | None = None
) -> TokenizedExample:
    """Prompt with the tokenizer's special tokens, then the completion without, cut to ``max_length``.

    Tokenising the parts separately keeps the prompt/completion boundary exact, which counting relies on.
    Only as much text is tokenized as the first ``max_length`` (or ``exact_tokens``) tokens need; ``cut``
    says that more tokens followed.
    """
    if max_length is not None and max_length < 1:
        raise ValueError(f"--max-length must be >= 1, got {max_length}")
    need = exact_tokens if exact_tokens is not None else max_length
    prompt_ids, cut = encode_prefix(example.prompt, tokenizer, True, need)
    completion_ids = []
    if example.completion and not cut:
        rest = None if need is None else max(1, need - len(prompt_ids))
        completion_ids, cut = encode_prefix(example.completion, tokenizer, False, rest)
    elif example.completion:
        cut = True
    input_ids = prompt_ids + completion_ids
    is_completion = [False] * len(prompt_ids) + [True] * len(completion_ids)
    if max_length is not None:
        cut = cut or len(input_ids) > max_length
        input_ids, is_completion = input_ids[:max_length], is_completion[:max_length]
    if not input_ids:
        raise ValueError(f"{example.source}: the example tokenizes to no tokens")
    return TokenizedExample(input_ids, is_completion, example.source, has_prompt=bool(example.prompt), cut=cut)


def count_mask(tokenized: TokenizedExample, count_tokens: CountTokens) -> list[bool]:
    """Which tokens' routing is counted: all of them, only the prompt or only the completion."""
    if count_tokens == "all":
        return [True] * len(tokenized.input_ids)
    if count_tokens == "prompt":
        return [not flag for flag in tokenized.is_completion]
    if count_tokens == "completion":
        return list(tokenized.is_completion)
    choices = ", ".join(get_args(CountTokens))
    raise ValueError(f"--count-tokens must be one of {choices}, got {count_tokens!r}")


def make_batches(
    tokenized: Sequence[TokenizedExample],
    *,
    batch_size: int,
    pad_token_id: int,
    count_tokens: CountTokens = "all",
    sort_by_length: bool = True,
) -> list[CalibrationBatch]:
    """Right-padded batches; sorting by length (longest first) wastes less compute on padding, and
    ``example_index`` still points at the original positions."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if not tokenized:
        raise ValueError("no examples to batch")
    masks = [count_mask(t, count_tokens) for t in tokenized]
    if count_tokens == "prompt" and not any(t.has_prompt for t in tokenized):
        raise ValueError(
            "--count-tokens prompt selects no tokens: no example has a prompt (plain-text data puts all "
            "of its text in the completion); use all or completion"
        )
    if not any(any(mask) for mask in masks):
        raise ValueError(f"--count-tokens {count_tokens} selects no tokens in any example")
    order = list(range(len(tokenized)))
    if sort_by_length:
        order.sort(key=lambda i: -len(tokenized[i].input_ids))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(tokenized[i].input_ids) for i in rows)
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        counted = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, i in enumerate(rows):
            n = len(tokenized[i].input_ids)
            input_ids[b, :n] = torch.tensor(tokenized[i].input_ids, dtype=torch.long)
            attention[b, :n] = 1
            counted[b, :n] = torch.tensor(masks[i], dtype=torch.bool)
        batches.append(
            CalibrationBatch(
                input_ids=input_ids,
                attention_mask=attention,
                count_mask=counted,
                example_index=torch.tensor(rows, dtype=torch.long),
                num_tokens=int(attention.sum()),
            )
        )
    return batches


def pad_token_id_for(tokenizer: Any) -> int:
    """The id that pads batches: pad, else eos, else 0 (padding is masked out, so any id works)."""
    for token_id in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(token_id, int):
            return token_id
        if isinstance(token_id, (list, tuple)) and token_id:
            return int(token_id[0])
    return 0
