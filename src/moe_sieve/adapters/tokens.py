"""Untrained-token guard: find completion tokens whose vocabulary rows were never trained, and train just those rows.

A token that never occurred in pretraining keeps an input-embedding row near its initialisation, and its output
(``lm_head``) row is only ever pushed down, never up. LoRA on attention and experts cannot give such a token a
useful output row, so a completion that contains it (GSM8K's ``####``, a chat template's ``<|im_end|>`` on a base
checkpoint) keeps a nearly flat distribution at that position, which then dominates the loss.

Detection rule (:func:`find_untrained_tokens`): a token is untrained when the L2 norm of its input-embedding row or
of its output row is below ``ratio`` (default 0.5) times the median row norm of that matrix. Trained rows grow away
from the small initialisation (std ``initializer_range``) while untrained ones keep it, so the norms split into two
groups; on the embedded model the never-seen tokens sit at 0.27-0.40 x the median input norm and 0.42-0.60 x the
median output norm, the trained ones above 0.6 and 0.7. All-zero rows (Llama-3's reserved tokens, the case
Unsloth's ``fix_untrained_tokens`` tests with ``max(row) <= eps``) fall under the same rule. The median assumes most
of the vocabulary is trained; a checkpoint whose vocabulary is mostly unused would need a smaller ``ratio``.

Training (:class:`TokenRowsEmbedding`, :class:`TokenRowsHead`): the chosen rows get additive deltas, zero at the
start, ``[n_tokens, hidden]`` per matrix; the base weights stay frozen. With tied embeddings one delta serves both
(as PEFT's ``TrainableTokensLayer`` does). PEFT's ``trainable_tokens_delta`` holds the replacement rows
(base row + delta) instead; the PEFT export writes those.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..arch import UnsupportedModelError
from .methods import AdaptedModule, get_adapter_method

__all__ = [
    "DEFAULT_NORM_RATIO",
    "TokenRowsEmbedding",
    "TokenRowsHead",
    "UntrainedToken",
    "attach_token_rows",
    "completion_token_counts",
    "find_untrained_tokens",
    "parse_train_tokens",
    "train_token_rows",
]

DEFAULT_NORM_RATIO = 0.5
IGNORE_INDEX = -100
_CHUNK_ROWS = 8192
_LISTED = 8  # tokens named in the one-line warning


@dataclass(frozen=True)
class UntrainedToken:
    """One completion token with an untrained row: its norms relative to the median row norm of each matrix."""

    token_id: int
    text: str
    count: int
    input_ratio: float
    output_ratio: float | None  # None: tied embeddings (the input row is the output row) or no output head

    def __str__(self) -> str:
        return f"{self.text!r} (id {self.token_id})"


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of every row in float32, a chunk at a time (no full-precision copy of a large vocabulary)."""
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):  # sharded at load time (expert parallelism): a collective, every rank calls it
        weight = weight.full_tensor()
    with torch.no_grad():
        return torch.cat(
            [weight[i : i + _CHUNK_ROWS].float().norm(dim=1).cpu() for i in range(0, weight.shape[0], _CHUNK_ROWS)]
        )


def _median(norms: torch.Tensor) -> float:
    """The usual median (the mean of the two middle values for an even count; torch's median takes the lower)."""
    return max(float(np.median(norms.numpy())), 1e-12)


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, (TokenRowsEmbedding, TokenRowsHead)) else module


def _matrices(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The input-embedding weight and the output-head weight (None when tied to the input or absent)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None or not isinstance(getattr(_base(embed), "weight", None), torch.Tensor):
        raise UnsupportedModelError(f"{type(model).__name__} has no input-embedding weight to check")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    input_W = _base(embed).weight
    output_W = getattr(_base(head), "weight", None) if head is not None else None
    if output_W is not None and _same_tensor(output_W, input_W):
        output_W = None
    return input_W, output_W


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    if isinstance(a, DTensor) or isinstance(b, DTensor):
        return a is b
    return a is b or (a.shape == b.shape and a.device == b.device and a.data_ptr() == b.data_ptr())


def is_tied(model: nn.Module) -> bool:
    """Whether the output head reads the input-embedding weight itself (tied embeddings)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return False
    return _same_tensor(_base(head).weight, _base(model.get_input_embeddings()).weight)


def completion_token_counts(labels_rows: Iterable[Sequence[int]]) -> Counter:
    """How often each token id is a training target (``labels`` other than -100) in the SFT rows."""
    counts: Counter = Counter()
    for row in labels_rows:
        counts.update(tok for tok in row if tok != IGNORE_INDEX)
    return counts


def _token_text(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return str(token_id)
    text = tokenizer.decode([token_id])
    return text if text else str(tokenizer.convert_ids_to_tokens(token_id))


def find_untrained_tokens(
    model: nn.Module,
    token_ids: Mapping[int, int] | Iterable[int],
    tokenizer: Any = None,
    *,
    ratio: float = DEFAULT_NORM_RATIO,
) -> list[UntrainedToken]:
    """The tokens among ``token_ids`` (ids, or id -> count) whose input or output row norm is below ``ratio`` x
    that matrix's median row norm; most frequent first."""
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    counts = dict(token_ids) if isinstance(token_ids, Mapping) else dict.fromkeys(token_ids, 1)
    input_W, output_W = _matrices(model)
    rows = input_W.shape[0] if output_W is None else min(input_W.shape[0], output_W.shape[0])
    input_N = row_norms(input_W)
    input_R = input_N / _median(input_N[:rows])
    output_R = None
    if output_W is not None:
        output_N = row_norms(output_W)
        output_R = output_N / _median(output_N[:rows])
    found = []
    for token_id, count in counts.items():
        if not 0 <= int(token_id) < rows:
            continue
        ri = float(input_R[token_id])
        ro = None if output_R is None else float(output_R[token_id])
        if ri < ratio or (ro is not None and ro < ratio):
            found.append(UntrainedToken(int(token_id), _token_text(tokenizer, int(token_id)), int(count), ri, ro))
    return sorted(found, key=lambda t: (-t.count, t.token_id))


# --- the trainable rows ---------------------------------------------------------------------------------------


def _index_buffers(module: nn.Module, token_ids: Sequence[int], vocab: int, device: torch.device) -> None:
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=device)
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(
            f"token ids {list(token_ids)[:8]} must be non-empty and within the vocabulary (0..{vocab - 1})"
        )
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"token ids {list(token_ids)} repeat")
    module.register_buffer("token_ids", ids, persistent=False)


class TokenRowsEmbedding(nn.Module):
    """``embedding(x) + token_delta[slot(x)]`` around a frozen ``nn.Embedding``: only the listed rows change.

    The lookup goes through a per-vocabulary slot table (the last slot is a zero row), so no copy of the embedding
    matrix is made in the forward.
    """

    def __init__(self, base_layer: nn.Embedding, token_ids: Sequence[int]):
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        _index_buffers(self, token_ids, weight.shape[0], weight.device)
        n = self.token_ids.numel()
        slot = torch.full((weight.shape[0],), n, dtype=torch.long, device=weight.device)
        slot[self.token_ids] = torch.arange(n, device=weight.device)
        self.register_buffer("slot_of", slot, persistent=False)
        self.token_delta = nn.Parameter(torch.zeros(n, weight.shape[1], device=weight.device, dtype=weight.dtype))

    @property
    def weight(self) -> torch.Tensor:
        """The effective embedding matrix (a copy; the forward never builds it)."""
        base = self.base_layer.weight
        return base.index_add(0, self.token_ids, self.token_delta.to(base.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(input_ids)
        rows = torch.cat([self.token_delta, self.token_delta.new_zeros(1, self.token_delta.shape[1])])
        delta = F.embedding(self.slot_of[input_ids], rows)
        scale = getattr(self.base_layer, "embed_scale", None)  # scaled embeddings (Gemma) scale the row too
        if scale is not None:
            delta = delta * scale.to(delta.dtype) if torch.is_tensor(scale) else delta * scale
        return out + delta.to(out.dtype)

    def merged(self) -> nn.Embedding:
        """The base layer with the deltas added to its rows (the wrapper is not used afterwards)."""
        with torch.no_grad():
            weight = self.base_layer.weight
            weight.index_add_(0, self.token_ids, self.token_delta.to(weight.dtype))
        return self.base_layer


class TokenRowsHead(nn.Module):
    """``head(h)`` plus ``h @ token_delta^T`` on the listed vocabulary columns, around a frozen ``nn.Linear``.

    With tied embeddings the delta is the input embedding's (``tied``), kept out of this module's parameters so
    it is saved once. ``weight`` gives the effective matrix for code that reads the head weight directly (the
    fused cross-entropy kernels).
    """

    def __init__(self, base_layer: nn.Linear, token_ids: Sequence[int], tied: TokenRowsEmbedding | None = None):
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        _index_buffers(self, token_ids, weight.shape[0], weight.device)
        self._tied = [tied] if tied is not None else []  # a list: not registered as a submodule
        if tied is None:
            self.token_delta = nn.Parameter(
                torch.zeros(self.token_ids.numel(), weight.shape[1], device=weight.device, dtype=weight.dtype)
            )
        elif not torch.equal(tied.token_ids.cpu(), self.token_ids.cpu()):
            raise ValueError("a tied head must train the same token rows as the input embedding")
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    @property
    def tied(self) -> TokenRowsEmbedding | None:
        return self._tied[0] if self._tied else None

    @property
    def delta(self) -> torch.Tensor:
        return self.tied.token_delta if self.tied is not None else self.token_delta

    @property
    def weight(self) -> torch.Tensor:
        base = self.base_layer.weight
        return base.index_add(0, self.token_ids, self.delta.to(base.dtype))

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(hidden)
        delta = self.delta
        extra = F.linear(hidden.to(delta.dtype), delta)
        # in place: the linear's backward needs its input and weight, not its output
        return out.index_add_(out.dim() - 1, self.token_ids, extra.to(out.dtype))

    def merged(self) -> nn.Linear:
        if self.tied is None:
            with torch.no_grad():
                weight = self.base_layer.weight
                weight.index_add_(0, self.token_ids, self.token_delta.to(weight.dtype))
        return self.base_layer


def _module_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def token_row_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The token-row wrappers of ``model`` by module name (input embedding first)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (TokenRowsEmbedding, TokenRowsHead))
    }


def attach_token_rows(model: nn.Module, state: Any, token_ids: Sequence[int]) -> list[tuple[str, nn.Parameter]]:
    """Wrap the input embedding and the output head so the rows of ``token_ids`` train; records them on ``state``
    (a :class:`~moe_sieve.adapters.sieve.model.SieveState`). Returns the new ``(module name, parameter)`` pairs."""
    token_ids = sorted({int(t) for t in token_ids})
    if not token_ids:
        return []
    if token_row_modules(model):
        raise ValueError("this model already trains token rows")
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if type(embed) is not nn.Embedding:
        raise UnsupportedModelError(
            f"token rows: the input embedding of {type(model).__name__} is {type(embed).__name__}, not an "
            "nn.Embedding; train without --train-tokens"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and type(head) is not nn.Linear:
        raise UnsupportedModelError(
            f"token rows: the output head of {type(model).__name__} is {type(head).__name__}, not an nn.Linear; "
            "train without --train-tokens"
        )
    tied = head is not None and _same_tensor(head.weight, embed.weight)
    embed_name = _module_name(model, embed)
    head_name = _module_name(model, head) if head is not None else None
    added: list[tuple[str, nn.Parameter]] = []
    wrapper = TokenRowsEmbedding(embed, token_ids)
    _replace(model, embed_name, wrapper)
    added.append((embed_name, wrapper.token_delta))
    if head is not None:
        head_wrapper = TokenRowsHead(head, token_ids, tied=wrapper if tied else None)
        _replace(model, head_name, head_wrapper)
        if not tied:
            added.append((head_name, head_wrapper.token_delta))
    for name, param in added:
        param.requires_grad_(True)
        state.modules.append(AdaptedModule("tokens", None, name, param.numel()))
    state.config = replace(state.config, tokens=tuple(token_ids))
    return added


def merge_token_rows(model: nn.Module) -> None:
    """Fold the token deltas into the embedding (and untied head) rows and remove the wrappers, in place."""
    for name, module in list(token_row_modules(model).items()):
        _replace(model, name, module.merged())


def unwrap_token_rows(model: nn.Module) -> None:
    """Put the untouched base layers back (for a bare copy of an adapted model)."""
    for name, module in list(token_row_modules(model).items()):
        _replace(model, name, module.base_layer)


# --- the option and the train hook -----------------------------------------------------------------------------


def parse_train_tokens(spec: str, tokenizer: Any, detected: Sequence[int], vocab: int) -> list[int]:
    """``--train-tokens``: none, auto (the detected ids), or a comma list of tokens, ids and ``auto``.

    A list item is a token id, a vocabulary entry (``<|im_end|>``, ``Ġ42``), or a text that encodes to exactly
    one token (``#``, `` 42``). A comma itself must be given by its id.
    """
    spec = (spec or "none").strip()
    if spec == "none":
        return []
    ids: list[int] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            raise ValueError(f"--train-tokens {spec!r}: empty item (give a comma itself by its id)")
        if item == "none":
            raise ValueError(f"--train-tokens {spec!r}: 'none' cannot be combined with other items")
        if item == "auto":
            ids += list(detected)
        elif item.isdigit():
            ids.append(int(item))
        else:
            ids.append(_single_token(item, tokenizer, spec))
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"--train-tokens {spec!r}: token ids {bad} are outside the vocabulary (0..{vocab - 1})")
    return sorted(set(ids))


def _single_token(item: str, tokenizer: Any, spec: str) -> int:
    if tokenizer is None:
        raise ValueError(f"--train-tokens {spec!r}: {item!r} needs a tokenizer (or give the token id)")
    vocab = tokenizer.get_vocab()
    if item in vocab:
        return int(vocab[item])
    encoded = tokenizer(item, add_special_tokens=False)["input_ids"]
    if len(encoded) != 1:
        raise ValueError(
            f"--train-tokens {spec!r}: {item!r} is {len(encoded)} tokens {encoded}, not one; give a single token "
            "(as in the vocabulary) or its id"
        )
    return int(encoded[0])


def _listing(tokens: Sequence[UntrainedToken]) -> str:
    shown = ", ".join(f"{t} x{t.count}" for t in tokens[:_LISTED])
    return shown + (f" (+{len(tokens) - _LISTED} more)" if len(tokens) > _LISTED else "")


def train_token_rows(
    model: nn.Module,
    tokenizer: Any,
    labels_rows: Iterable[Sequence[int]],
    spec: str = "none",
    *,
    method: str = "sieve",
    log: bool = True,
    ratio: float = DEFAULT_NORM_RATIO,
) -> list[int]:
    """``train``'s hook, after the adapter is attached: check the completion tokens for untrained rows, warn once
    (one stderr line) about those left untrained, and attach trainable rows for the tokens ``spec`` names.
    Returns the trained token ids."""
    found = find_untrained_tokens(model, completion_token_counts(labels_rows), tokenizer, ratio=ratio)
    input_W, _ = _matrices(model)
    ids = parse_train_tokens(spec, tokenizer, [t.token_id for t in found], input_W.shape[0])
    adapter_method = get_adapter_method(method)
    if ids and not adapter_method.token_rows:
        raise ValueError(
            f"--train-tokens needs --method sieve ({adapter_method.label} adapters hold no token rows), got {method}"
        )
    left = [t for t in found if t.token_id not in set(ids)]
    if log and left:
        fix = "--train-tokens auto" if adapter_method.token_rows else "--method sieve --train-tokens auto"
        print(
            f"moe-sieve: warning: {len(left)} completion token{'s' if len(left) != 1 else ''} with an untrained "
            f"embedding or output row (norm < {ratio:g} x median), which LoRA cannot learn: {_listing(left)}; "
            f"{fix} trains just these rows",
            file=sys.stderr,
        )
    if ids:
        attach_token_rows(model, model.moe_sieve, ids)
        if log:
            names = ", ".join(f"{_token_text(tokenizer, i)!r} (id {i})" for i in ids[:_LISTED])
            more = f" (+{len(ids) - _LISTED} more)" if len(ids) > _LISTED else ""
            print(
                f"moe-sieve: training the embedding and output rows of {len(ids)} tokens: {names}{more}",
                file=sys.stderr,
            )
    elif log and spec.strip() == "auto":
        print("moe-sieve: --train-tokens auto: no completion token has an untrained row; none trained", file=sys.stderr)
    return ids
