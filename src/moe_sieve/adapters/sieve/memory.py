"""Memory a training step is expected to hold, from shapes, so GPU peak numbers can be checked.

Two parts: the parameter / gradient / AdamW state bytes of a model (exact, from its tensors), and the
activations the ``sieve_lora`` experts forward keeps for the backward (exact for that code path, from
the token count, the routing and the layer shape). :class:`SavedTensorMeter` measures the latter on real
tensors (autograd's saved-tensor hooks), which is how the formula is tested.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["SavedTensorMeter", "sieve_experts_saved_bytes", "training_state_bytes"]


def _nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def sieve_experts_saved_bytes(
    *,
    num_tokens: int,
    top_k: int,
    hidden_size: int,
    intermediate_size: int,
    num_experts: int,
    dtype: torch.dtype = torch.bfloat16,
    has_gate: bool = True,
    rows_selected: int = 0,
    num_selected: int = 0,
    r: int = 0,
    lora_dtype: torch.dtype | None = None,
) -> dict[str, int]:
    """Bytes one ``sieve_lora`` experts call keeps for the backward, by part (and ``"total"``).

    Assumes a training step where the hidden states and routing weights need gradients (LoRA upstream and
    on the router), frozen expert weights, LoRA dropout off, no expert bias / post-expert norm / expert
    parallelism, and the default gate ``act(gate) * up``. ``rows_selected`` is the number of (token, k)
    rows routed to the ``num_selected`` adapted experts (all ``T*K`` rows when every expert is adapted).
    Parameter tensors themselves are not counted; tensors derived from LoRA factors are (``lora_factors``).
    """
    b = _nbytes(dtype)
    bl = _nbytes(lora_dtype or dtype)
    rows = num_tokens * top_k
    inter, hid = intermediate_size, hidden_size
    width_in = (2 if has_gate else 1) * inter
    parts = {
        # perm and inverse perm (int64), the expert offsets (int32)
        "index": 2 * 8 * rows + 4 * num_experts,
        # gate_up pre-activation (kept by the gate), act(gate) (kept by the product), the (token, k)-ordered
        # expert outputs and the routing weights (both kept by the weighted K-sum's bmm)
        "base": rows * width_in * b + (rows * inter * b if has_gate else 0) + rows * hid * b + rows * b,
        "lora": 0,
        "lora_factors": 0,
    }
    if num_selected:
        all_rows = num_selected == num_experts
        sel = rows if all_rows else rows_selected
        ranks_in = 2 * r if has_gate else r
        # LoRA inputs (x rows, h rows) and rank-r intermediates; row index of the selected rows (int64)
        parts["lora"] = sel * (hid + ranks_in + inter + r) * bl + (0 if all_rows else 8 * sel)
        if not all_rows:
            parts["index"] += 4 * num_selected
        # [A_gate; A_up] stacked, s * blockdiag(B_gate, B_up), s * B_down (A_up alone without a gate)
        n = num_selected
        stacked_a = n * ranks_in * hid if has_gate else 0
        b_in = n * ranks_in * width_in if has_gate else n * inter * r
        parts["lora_factors"] = (stacked_a + b_in + n * hid * r) * bl
    parts["total"] = sum(parts.values())
    return parts


def training_state_bytes(model: nn.Module, optimizer_states: int = 2) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes (AdamW: ``optimizer_states=2``, exp_avg and exp_avg_sq
    in each trainable parameter's dtype; its scalar ``step`` lives on the host)."""
    frozen = trainable = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel() * p.element_size()
        else:
            frozen += p.numel() * p.element_size()
    parts = {
        "frozen_params": frozen,
        "trainable_params": trainable,
        "grads": trainable,
        "optimizer_states": optimizer_states * trainable,
    }
    parts["total"] = sum(parts.values())
    return parts


class SavedTensorMeter:
    """Counts the distinct storages autograd saves for the backward inside ``with meter:``.

    Storages of ``exclude`` tensors (the parameters) are skipped, so the count is activation memory.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._exclude and ptr not in self._seen:
            self._seen[ptr] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
