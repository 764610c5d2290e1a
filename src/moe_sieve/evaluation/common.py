"""What every evaluator shares: the result record, greedy generation and continuation log-likelihoods.

Generation and scoring are module-level functions (``_generate``, ``score_continuations``) so that tests can
swap them for stubs and check each metric exactly, without a trained model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..data.calibration import TokenizedExample, make_batches, pad_token_id_for, tokenize_example
from ..data.tasks import Example
from ..modeling import input_device


@dataclass
class EvalResult:
    """One task's score and the per-example record behind it (kept so that failures can be inspected).

    ``accuracy_norm`` is set only where the task has a length-normalised variant (HellaSwag).
    """

    task: str
    n: int
    accuracy: float
    accuracy_norm: float | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    """Every numeric metric by name (``accuracy``, the likelihood metrics, ...): what sweeps and reports read."""

    @property
    def correct(self) -> int:
        return sum(bool(p.get("correct")) for p in self.predictions)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def source_of(row: Mapping[str, Any], index: int) -> str:
    """Where a row came from: ``load_task_rows`` records it under ``_source``; otherwise its position."""
    return str(row.get("_source", f"row:{index}"))


def gold_answers(rows: Sequence[Mapping[str, Any]], extract: Callable[[str], Any], missing: str) -> list[Any]:
    """Each row's gold answer (``extract`` of its ``answer``); a row without one is an error naming the row."""
    golds = []
    for i, row in enumerate(rows):
        gold = extract(str(row["answer"]))
        if gold is None:
            raise ValueError(f"{source_of(row, i)}: {missing}: {row['answer']!r}")
        golds.append(gold)
    return golds


def accuracy_result(task: str, predictions: list[dict[str, Any]], metadata: dict[str, Any]) -> EvalResult:
    """The result of per-row predictions that each say whether they are ``correct``."""
    n = len(predictions)
    return EvalResult(
        task=task,
        n=n,
        accuracy=sum(p["correct"] for p in predictions) / n,
        predictions=predictions,
        metadata=metadata,
    )


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Dropout off and no autograd for the evaluation, then the caller's training mode back."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def progress_bar(enabled: bool, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def cut_at(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest of ``stops`` (all of it when none occurs)."""
    end = len(text)
    for stop in stops:
        found = text.find(stop)
        if found != -1:
            end = min(end, found)
    return text[:end]


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a generation: the tokenizer's eos and the model's generation-config eos (may be a list)."""
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


class _StopOnStrings(StoppingCriteria):
    """Stops a sequence once its generated text holds a stop string: only compute, the text is cut afterwards.

    (``generate(stop_strings=...)`` would do the same, but it rebuilds a vocabulary-sized table on every call.)
    """

    def __init__(self, tokenizer: Any, prompt_len: int, stops: Sequence[str]) -> None:
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, tuple(stops)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        done = [any(stop in text for stop in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, stops: Sequence[str] = ()
) -> list[str]:
    """Greedy continuations of one batch of prompts, decoded up to (not including) the first eos.

    Prompts are tokenised as fine-tuning tokenised them (with the tokenizer's special tokens) and LEFT-padded,
    so every row's next token sits in the last column; the attention mask hides the padding, which keeps a
    batched continuation equal to the unbatched one. The tokenizer's ``padding_side`` is left untouched.
    """
    ids = [tokenize_example(Example(p, "", f"prompt {i}"), tokenizer, None).input_ids for i, p in enumerate(prompts)]
    width = max(len(row) for row in ids)
    pad_id = pad_token_id_for(tokenizer)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for b, row in enumerate(ids):
        input_ids[b, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, width - len(row) :] = 1
    device = input_device(model)
    eos_ids = _eos_ids(model, tokenizer)
    kwargs: dict[str, Any] = {}
    if stops:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnStrings(tokenizer, width, stops)])
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
        **kwargs,
    )
    texts = []
    for row in output[:, width:].tolist():
        end = next((i for i, token in enumerate(row) if token in eos_ids), len(row))
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return texts


def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    stops: Sequence[str] = (),
    progress: bool = True,
    label: str = "generating",
) -> list[str]:
    """Greedy continuations of all ``prompts`` in their order, batched longest-first to waste less on padding."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    with eval_mode(model), progress_bar(progress, label) as bar:
        task = bar.add_task(label, total=len(prompts))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            outputs = _generate(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens, stops)
            for i, text in zip(chunk, outputs, strict=True):
                texts[i] = text
            bar.update(task, advance=len(chunk))
    return texts


def encode_pair(tokenizer: Any, context: str, continuation: str, source: str) -> TokenizedExample:
    """Context and continuation as lm-evaluation-harness's ``_encode_pair`` cuts them: trailing spaces of the
    context move to the continuation, the context is encoded alone (with the tokenizer's special tokens, as
    ``--model_args add_bos_token=True``) and the continuation is what encoding both together adds after it, so
    a merge across the boundary is scored as the harness scores it."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = [int(i) for i in tokenizer(context)["input_ids"]]
    whole_ids = [int(i) for i in tokenizer(context + continuation)["input_ids"]]
    continuation_ids = whole_ids[len(context_ids) :]
    if not continuation_ids:
        raise ValueError(f"{source}: the continuation tokenizes to no tokens")
    return TokenizedExample(
        context_ids + continuation_ids, [False] * len(context_ids) + [True] * len(continuation_ids), source
    )


def continuation_logprobs(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    batch_size: int,
    progress: bool = True,
    label: str = "scoring",
) -> list[torch.Tensor]:
    """Log-probability of each continuation token given everything before it, one float32 tensor per pair.

    Pairs are tokenised as the harness does (``encode_pair``) and batches are right-padded with only the
    continuation tokens counted (``make_batches(count_tokens="completion")``).
    """
    tokenized = [encode_pair(tokenizer, ctx, cont, f"pair {i}") for i, (ctx, cont) in enumerate(pairs)]
    batches = make_batches(
        tokenized, batch_size=batch_size, pad_token_id=pad_token_id_for(tokenizer), count_tokens="completion"
    )
    out: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    device = input_device(model)
    with eval_mode(model), progress_bar(progress, label) as bar:
        task = bar.add_task(label, total=len(pairs))
        for batch in batches:
            logits = model(
                input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False
            ).logits
            # Token t is predicted at position t - 1; only the continuation's positions are scored.
            mask = batch.count_mask[:, 1:].to(logits.device)
            targets = batch.input_ids[:, 1:].to(logits.device)[mask]
            logprobs_N = logits[:, :-1][mask].float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]
            per_row = torch.split(logprobs_N.cpu(), mask.sum(1).tolist())  # mask rows are in row-major order
            for b, i in enumerate(batch.example_index.tolist()):
                out[i] = per_row[b]
            bar.update(task, advance=len(batch.example_index))
    return out


def score_continuations(
    model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int, progress: bool = True
) -> list[float]:
    """Sum of log-probabilities of each continuation's tokens given its context, one float per pair (the
    harness's ``loglikelihood``)."""
    return [float(t.double().sum()) for t in continuation_logprobs(model, tokenizer, pairs, batch_size, progress)]
