"""LoRA on the hot experts of fused (3D-parameter) MoE expert modules, computed in activation space.

transformers v5 stores the experts of a layer as 3D tensors and dispatches their forward through
``ALL_EXPERTS_FUNCTIONS`` on ``config._experts_implementation``. MoE-Sieve adapts only the most-routed
experts of each layer (paper §4, Step 3), so the update cannot be a per-``nn.Linear`` PEFT adapter: it lives
in an :class:`ExpertLoRA` attached as ``experts.sieve_lora`` and is applied by
:func:`sieve_lora_experts_forward`, registered as the ``"sieve_lora"`` experts implementation. Only the
rows routed to selected experts enter the LoRA matmuls, so cold experts cost exactly the base forward.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...arch.layers import global_num_experts

__all__ = [
    "SIEVE_EXPERTS_IMPLEMENTATION",
    "ExpertLoRA",
    "compile_config",
    "grouped_mm",
    "is_fused_experts",
    "iter_fused_experts",
    "register_sieve_experts_implementation",
    "restore_experts_implementation",
    "sieve_lora_experts_forward",
    "use_sieve_experts",
]

SIEVE_EXPERTS_IMPLEMENTATION = "sieve_lora"

_NATIVE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _native_strides_ok(t: torch.Tensor) -> bool:
    """The grouped GEMM kernels need 16-byte aligned data and one unit stride among the last two dims."""
    if not torch.compiler.is_compiling() and t.data_ptr() % 16:  # fake tensors under compile have no data
        return False
    align = 16 // t.element_size()
    s_in, s_out = t.stride(-2), t.stride(-1)
    if s_in == 1 and s_out >= max(1, t.shape[-2]):
        return s_out % align == 0
    if s_out == 1 and s_in >= max(1, t.shape[-1]):
        return s_in % align == 0
    return False


@functools.cache
def _cpu_grouped_mm_available() -> bool:
    """Whether this torch has a CPU ``grouped_mm`` kernel (probed once: older builds raise)."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        F.grouped_mm(torch.zeros(4, 4), torch.zeros(1, 4, 4), offs=torch.tensor([4], dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _cpu_native_grouped_mm_ok(x_S: torch.Tensor, w_GIO: torch.Tensor, offsets_G: torch.Tensor) -> bool:
    """CPU's native op is the same per-group ``mm`` as the loop (bitwise equal), run as one op.

    It needs 16-byte aligned rows of ``x``, ``w`` and the output, and it leaves rows past the last offset
    uninitialised, so it is taken only when those hold and the groups cover every row; each call (forward or
    backward) checks its own operands.
    """
    if x_S.device.type != "cpu" or w_GIO.dtype not in _NATIVE_DTYPES or not _cpu_grouped_mm_available():
        return False
    if (w_GIO.shape[-1] * w_GIO.element_size()) % 16:
        return False
    if not (_native_strides_ok(x_S) and _native_strides_ok(w_GIO)):
        return False
    return offsets_G.numel() > 0 and int(offsets_G[-1]) == x_S.shape[0]


def _can_use_native_grouped_mm(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Native grouped GEMM (with its own autograd) only on CUDA with half/float dtypes.

    Under ``torch.compile`` inductor lowers the native op for bf16 only (as in transformers' own check). CPU goes
    through the custom op, which runs torch's CPU kernel inside where that is exact.
    """
    if w.device.type != "cuda" or w.dtype not in _NATIVE_DTYPES:
        return False
    if torch.compiler.is_compiling() and w.dtype != torch.bfloat16:
        return False
    major, minor = torch.cuda.get_device_capability(w.device)
    if hasattr(F, "grouped_mm"):
        if (major, minor) < (8, 0):
            return False
    elif not (hasattr(torch, "_grouped_mm") and w.dtype == torch.bfloat16 and major == 9):
        return False
    return _native_strides_ok(x) and _native_strides_ok(w)


# The loop fallback is a custom op so that torch.compile(fullgraph=True) treats it as one opaque node
# (its ``offsets.tolist()`` would otherwise be a data-dependent graph break), as transformers does.
@torch.library.custom_op("moe_sieve::grouped_mm_loop", mutates_args=())
def _grouped_mm_loop(x_S: torch.Tensor, w_GIO: torch.Tensor, offsets_G: torch.Tensor) -> torch.Tensor:
    if _cpu_native_grouped_mm_ok(x_S, w_GIO, offsets_G):
        return F.grouped_mm(x_S, w_GIO, offs=offsets_G.to(torch.int32))
    out = x_S.new_zeros(x_S.shape[0], w_GIO.shape[-1])
    start = 0
    for g, end in enumerate(offsets_G.tolist()):  # one host sync
        if end > start:
            torch.mm(x_S[start:end], w_GIO[g], out=out[start:end])
            start = end
    return out


@_grouped_mm_loop.register_fake
def _(x_S: torch.Tensor, w_GIO: torch.Tensor, offsets_G: torch.Tensor) -> torch.Tensor:
    return x_S.new_empty(x_S.shape[0], w_GIO.shape[-1])


@torch.library.custom_op("moe_sieve::grouped_mm_loop_weight_grad", mutates_args=())
def _grouped_mm_loop_weight_grad(x_S: torch.Tensor, grad_SO: torch.Tensor, offsets_G: torch.Tensor) -> torch.Tensor:
    grad_GIO = x_S.new_zeros(offsets_G.shape[0], x_S.shape[-1], grad_SO.shape[-1])
    start = 0
    for g, end in enumerate(offsets_G.tolist()):
        if end > start:
            torch.mm(x_S[start:end].T, grad_SO[start:end], out=grad_GIO[g])
            start = end
    return grad_GIO


@_grouped_mm_loop_weight_grad.register_fake
def _(x_S: torch.Tensor, grad_SO: torch.Tensor, offsets_G: torch.Tensor) -> torch.Tensor:
    return x_S.new_empty(offsets_G.shape[0], x_S.shape[-1], grad_SO.shape[-1])


def _grouped_mm_loop_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    # Like native autograd: keep x only for dW and w only for dx (a frozen weight's input is not kept).
    x_S, w_GIO, offsets_G = inputs
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ctx.save_for_backward(x_S if need_w else None, w_GIO if need_x else None, offsets_G)


def _grouped_mm_loop_backward(ctx: Any, grad_SO: torch.Tensor) -> tuple:
    x_S, w_GIO, offsets_G = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:  # rows past the end got zeros in the forward, so their grad is zero too
        grad_x = _grouped_mm_loop(grad_SO.contiguous(), w_GIO.transpose(-2, -1), offsets_G)
    if ctx.needs_input_grad[1]:  # frozen base weights skip their dW entirely
        grad_w = _grouped_mm_loop_weight_grad(x_S, grad_SO.contiguous(), offsets_G)
    return grad_x, grad_w, None


_grouped_mm_loop.register_autograd(_grouped_mm_loop_backward, setup_context=_grouped_mm_loop_setup)


def grouped_mm(x_S: torch.Tensor, w_GIO: torch.Tensor, offsets_G: torch.Tensor) -> torch.Tensor:
    """Row-grouped ``x @ w[g]``: rows ``[offsets[g-1], offsets[g])`` use ``w[g]``.

    ``x_S`` is [S, in] (cast to ``w``'s dtype), ``w_GIO`` [G, in, out], ``offsets_G`` int32 cumulative ends.
    Uses ``torch.nn.functional.grouped_mm`` on CUDA (rows past the end are then left uninitialised), else a
    custom op (rows past the end are 0) that skips the weight gradient of frozen weights and stays one node under
    ``torch.compile``; on CPU it runs torch's one-op kernel where rows are aligned and covered, else a loop of
    ``mm``s.
    """
    x_S = x_S.to(w_GIO.dtype)
    if _can_use_native_grouped_mm(x_S, w_GIO):
        offsets_G = offsets_G.to(torch.int32)
        if hasattr(F, "grouped_mm"):
            return F.grouped_mm(x_S, w_GIO, offs=offsets_G)
        return torch._grouped_mm(x_S, w_GIO, offs=offsets_G)
    return _grouped_mm_loop(x_S, w_GIO, offsets_G)


class _GatherTokens(torch.autograd.Function):
    """``hidden_TH[token_S]`` for the expert-sorted rows; the backward sums each token's K row gradients
    through the inverse permutation (a gather + K-sum: no sorted ``index_put_`` accumulate, deterministic)."""

    @staticmethod
    def forward(ctx: Any, hidden_TH: torch.Tensor, token_S: torch.Tensor, inv_perm_S: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inv_perm_S)
        ctx.num_tokens = hidden_TH.shape[0]
        return hidden_TH.index_select(0, token_S)

    @staticmethod
    def backward(ctx: Any, grad_SH: torch.Tensor) -> tuple:
        (inv_perm_S,) = ctx.saved_tensors
        grad_TKH = grad_SH.index_select(0, inv_perm_S).view(ctx.num_tokens, -1, grad_SH.shape[-1])
        return grad_TKH.sum(dim=1), None, None


class _PermuteRows(torch.autograd.Function):
    """``x[index]`` for a permutation ``index`` whose inverse is ``inverse``: the backward is a gather too."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _SelectRows(torch.autograd.Function):
    """``x[rows]`` for distinct ``rows``; the backward writes into zeros with ``index_copy_`` (no sort, no atomics)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rows_R: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows_R)
        ctx.num_rows = x.shape[0]
        return x.index_select(0, rows_R)

    @staticmethod
    def backward(ctx: Any, grad_R: torch.Tensor) -> tuple:
        (rows_R,) = ctx.saved_tensors
        grad = grad_R.new_zeros(ctx.num_rows, *grad_R.shape[1:])
        return grad.index_copy_(0, rows_R, grad_R), None


class ExpertLoRA(nn.Module):
    """Per-expert LoRA factors (gate, up, down) for the selected experts of one fused experts module.

    Each selected expert gets its own rank-``r`` factors per projection, as if every expert were three
    ``nn.Linear`` layers wrapped by PEFT: ``A`` maps in -> r and ``B`` maps r -> out, ``W' = W + s B A``
    with ``s = alpha / r``. Unselected experts own no parameters at all.
    """

    def __init__(
        self,
        expert_ids: Sequence[int],
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        has_gate: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        *,
        is_transposed: bool = False,
        is_concatenated: bool = True,
    ) -> None:
        super().__init__()
        ids = sorted({int(e) for e in expert_ids})
        if ids and (ids[0] < 0 or ids[-1] >= num_experts):
            raise ValueError(f"expert ids must lie in [0, {num_experts}), got {ids}")
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.num_experts = num_experts
        self.first_expert = 0  # global id of local expert 0 (expert parallelism: the rank's block start)
        self.selected_experts: tuple[int, ...] = tuple(ids)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.r = r
        self.alpha = float(alpha)
        self.scaling = self.alpha / r
        self.has_gate = has_gate
        self.is_transposed = is_transposed
        self.is_concatenated = is_concatenated
        self.dropout = nn.Dropout(dropout)

        n, hid, inter = len(ids), hidden_size, intermediate_size
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        if has_gate:
            self.gate_A = nn.Parameter(torch.empty(n, r, hid, **kw))
            self.gate_B = nn.Parameter(torch.empty(n, inter, r, **kw))
        else:
            self.register_parameter("gate_A", None)
            self.register_parameter("gate_B", None)
        self.up_A = nn.Parameter(torch.empty(n, r, hid, **kw))
        self.up_B = nn.Parameter(torch.empty(n, inter, r, **kw))
        self.down_A = nn.Parameter(torch.empty(n, r, inter, **kw))
        self.down_B = nn.Parameter(torch.empty(n, hid, r, **kw))

        expert_ids = torch.tensor(ids, dtype=torch.long, device=device)
        slot_of_expert = torch.full((num_experts,), -1, dtype=torch.long, device=device)
        slot_of_expert[expert_ids] = torch.arange(n, device=device)
        self.register_buffer("expert_ids", expert_ids, persistent=False)
        self.register_buffer("slot_of_expert", slot_of_expert, persistent=False)
        self.reset_parameters()

    @classmethod
    def for_experts(
        cls,
        experts: nn.Module,
        expert_ids: Sequence[int],
        r: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        dtype: torch.dtype | None = None,
    ) -> ExpertLoRA:
        """Size the factors from a decorated experts module's own parameters and layout flags."""
        has_gate = getattr(experts, "has_gate", True)
        is_transposed = getattr(experts, "is_transposed", False)
        w_in = experts.gate_up_proj if has_gate else experts.up_proj
        down = experts.down_proj
        num_experts = global_num_experts(experts) or int(down.shape[0])
        if is_transposed:
            intermediate_size, hidden_size = down.shape[1], down.shape[2]
        else:
            hidden_size, intermediate_size = down.shape[1], down.shape[2]
        in_out = (2 if has_gate else 1) * intermediate_size, hidden_size
        expected = (num_experts, *(reversed(in_out) if is_transposed else in_out))
        if tuple(w_in.shape) != expected or down.shape[0] != num_experts:
            raise ValueError(
                f"unexpected experts layout: {'gate_up_proj' if has_gate else 'up_proj'} "
                f"{tuple(w_in.shape)} (expected {expected}), down_proj {tuple(down.shape)}"
            )
        return cls(
            expert_ids,
            num_experts,
            hidden_size,
            intermediate_size,
            r,
            alpha,
            dropout,
            has_gate=has_gate,
            dtype=dtype or down.dtype,
            device=down.device,
            is_transposed=is_transposed,
            is_concatenated=getattr(experts, "is_concatenated", True),
        )

    def with_experts(self, expert_ids: Sequence[int], num_experts: int) -> ExpertLoRA:
        """A new ExpertLoRA (freshly initialised) with this one's shapes, rank, dtype and layout, for other experts."""
        return ExpertLoRA(
            expert_ids,
            num_experts,
            self.hidden_size,
            self.intermediate_size,
            self.r,
            self.alpha,
            self.dropout.p,
            has_gate=self.has_gate,
            dtype=self.up_A.dtype,
            device=self.up_A.device,
            is_transposed=self.is_transposed,
            is_concatenated=self.is_concatenated,
        )

    @property
    def num_selected(self) -> int:
        return self.expert_ids.numel()

    def _factors(self) -> Iterator[tuple[str, nn.Parameter, nn.Parameter]]:
        names = ("gate", "up", "down") if self.has_gate else ("up", "down")
        for name in names:
            yield name, getattr(self, f"{name}_A"), getattr(self, f"{name}_B")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's default init: each expert's ``A`` as an ``nn.Linear`` weight, ``B`` zero (no-op update)."""
        for _, lora_A, lora_B in self._factors():
            for a_slice in lora_A:
                nn.init.kaiming_uniform_(a_slice, a=math.sqrt(5))
            lora_B.zero_()

    def _dropout_active(self) -> bool:
        return self.training and self.dropout.p > 0

    def _low_rank(
        self, x_R: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, offsets_n: torch.Tensor
    ) -> torch.Tensor:
        a_R = grouped_mm(x_R, lora_A.transpose(1, 2), offsets_n)
        return grouped_mm(a_R, (lora_B * self.scaling).transpose(1, 2), offsets_n)

    def _gate_up_B(self) -> torch.Tensor:
        """``s * blockdiag(B_gate, B_up)`` as [n, 2r, 2I] in the module's column order (gate|up or interleaved).

        One grouped GEMM with it writes the whole gate_up update: no per-half GEMMs, slices or ``cat`` of
        activations; it costs twice the B FLOPs, which are r/H of the base GEMM's.
        """
        gate_rI = (self.gate_B * self.scaling).transpose(1, 2)
        up_rI = (self.up_B * self.scaling).transpose(1, 2)
        zeros = torch.zeros_like(gate_rI)
        if self.is_concatenated:
            top, bottom = torch.cat([gate_rI, zeros], dim=-1), torch.cat([zeros, up_rI], dim=-1)
        else:
            top = torch.stack([gate_rI, zeros], dim=-1).flatten(-2)
            bottom = torch.stack([zeros, up_rI], dim=-1).flatten(-2)
        return torch.cat([top, bottom], dim=1)

    def gate_up_update(self, x_R: torch.Tensor, offsets_n: torch.Tensor) -> torch.Tensor:
        """``s B A x`` for the gate_up (or up) pre-activation, columns in the experts module's order.

        ``x_R`` holds the rows routed to selected experts, grouped by slot with cumulative ends ``offsets_n``.
        Without dropout gate and up share one GEMM over the stacked ``A``s (reading ``x_R`` once) and one
        over the block-diagonal ``B``s.
        """
        if not self.has_gate:
            return self._low_rank(self.dropout(x_R), self.up_A, self.up_B, offsets_n)
        if self._dropout_active():
            gate_R = self._low_rank(self.dropout(x_R), self.gate_A, self.gate_B, offsets_n)
            up_R = self._low_rank(self.dropout(x_R), self.up_A, self.up_B, offsets_n)
            if self.is_concatenated:
                return torch.cat([gate_R, up_R], dim=-1)
            return torch.stack([gate_R, up_R], dim=-1).flatten(-2)
        stacked_A = torch.cat([self.gate_A, self.up_A], dim=1).transpose(1, 2)  # [n, H, 2r]
        return grouped_mm(grouped_mm(x_R, stacked_A, offsets_n), self._gate_up_B(), offsets_n)

    def down_update(self, h_R: torch.Tensor, offsets_n: torch.Tensor) -> torch.Tensor:
        """``s B A h`` for the down projection of the rows routed to selected experts."""
        return self._low_rank(self.dropout(h_R), self.down_A, self.down_B, offsets_n)

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """Dense ``s B A`` per selected expert in the experts module's storage layout, for merging.

        ``experts.<name>[expert_ids] += delta[name]`` folds the adapter into the base weights.
        """

        def dense(name: str) -> torch.Tensor:
            return self.scaling * torch.bmm(getattr(self, f"{name}_B"), getattr(self, f"{name}_A"))

        if self.has_gate:
            gate, up = dense("gate"), dense("up")  # [n, I, H] each, (out, in)
            if self.is_concatenated:
                first = torch.cat([gate, up], dim=1)
            else:
                first = torch.stack([gate, up], dim=2).flatten(1, 2)
            first_name = "gate_up_proj"
        else:
            first, first_name = dense("up"), "up_proj"
        down = dense("down")  # [n, H, I]
        if self.is_transposed:
            first, down = first.transpose(1, 2), down.transpose(1, 2)
        return {first_name: first.contiguous(), "down_proj": down.contiguous()}

    def extra_repr(self) -> str:
        return (
            f"experts={self.expert_ids.tolist()} of {self.num_experts}, r={self.r}, alpha={self.alpha:g}, "
            f"has_gate={self.has_gate}, is_transposed={self.is_transposed}, "
            f"is_concatenated={self.is_concatenated}"
        )


class _AddRows(torch.autograd.Function):
    """``out.index_add_(0, rows, src)`` in place; unlike autograd's ``index_add_`` it does not keep ``src``
    (an S_sel x out activation per projection) alive for the backward, only the row index."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, rows_R: torch.Tensor, src_R: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows_R)
        out.index_add_(0, rows_R, src_R.to(out.dtype))
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (rows_R,) = ctx.saved_tensors
        return grad, None, grad.index_select(0, rows_R)


def sieve_lora_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Experts forward (base + ``self.sieve_lora``, or base alone) for any ``@use_experts_implementation`` module.

    (token, k) pairs are sorted by expert once, each projection is one grouped GEMM over them, and one
    inverse-permutation gather plus one batched GEMM applies the routing weights and sums over k. The LoRA
    update is added in activation space to the rows of selected experts only (gathered once per call), so
    ``W + s B A`` is never materialised and cold experts add no work. Expert-parallel sentinel rows are
    masked only when the module is expert-parallel; without LoRA this is a drop-in base experts backend.
    """
    lora: ExpertLoRA | None = getattr(self, "sieve_lora", None)
    num_experts = self.num_experts
    has_gate = self.has_gate
    is_transposed = self.is_transposed
    has_bias = self.has_bias
    out_shape = hidden_states.shape
    hidden_TH = hidden_states.reshape(-1, out_shape[-1])
    num_top_k = top_k_index.shape[-1]
    top_k_index_TK = top_k_index.reshape(-1, num_top_k)
    num_tokens = hidden_TH.shape[0]
    top_k_weights_TK = top_k_weights.reshape(num_tokens, -1)
    if top_k_weights_TK.shape[-1] != num_top_k and top_k_weights_TK.shape[-1] == num_experts:
        top_k_weights_TK = top_k_weights_TK.gather(-1, top_k_index_TK.clamp(max=num_experts - 1))
    device = hidden_TH.device
    w_in = self.gate_up_proj if has_gate else self.up_proj
    compute_dtype = w_in.dtype

    expert_ids_S, perm_S = torch.sort(top_k_index_TK.reshape(-1))
    inv_perm_S = torch.empty_like(perm_S)
    inv_perm_S[perm_S] = torch.arange(perm_S.numel(), device=device)
    # Cast on the T token rows, before the gather makes S = T*K of them (a no-op when dtypes agree).
    x_S = _GatherTokens.apply(hidden_TH.to(compute_dtype), perm_S // num_top_k, inv_perm_S)
    histc_input = expert_ids_S.float() if device.type in ("cpu", "mps") else expert_ids_S.int()
    tokens_per_expert_E = torch.histc(histc_input, bins=num_experts, min=0, max=num_experts - 1)
    offsets_E = torch.cumsum(tokens_per_expert_E, dim=0, dtype=torch.int32)

    # Expert-parallel sentinels (ids >= num_experts) sort to the tail, past offsets_E[-1]: the grouped GEMM
    # skips them, and masking zeroes their uninitialised rows. transformers 5.17 always did this (the 14%
    # ``masked_fill`` of issue 12's profile); 5.23 sets ``_is_expert_parallel`` and we skip it without EP.
    sentinel_S1 = None
    if getattr(self, "_is_expert_parallel", True):
        sentinel_S1 = (expert_ids_S >= num_experts).unsqueeze(-1)
        expert_ids_S = expert_ids_S.clamp(max=num_experts - 1)
        x_S.masked_fill_(sentinel_S1, 0.0)

    sel_rows_R = offsets_n = None
    lora_on_all_rows = False
    if lora is not None and lora.num_selected > 0:
        if lora.num_selected == num_experts and sentinel_S1 is None:
            lora_on_all_rows, offsets_n = True, offsets_E  # every row is selected: no gather, no host sync
        else:
            selected_S = lora.slot_of_expert[expert_ids_S] >= 0
            if sentinel_S1 is not None:
                selected_S &= ~sentinel_S1.squeeze(-1)
            sel_rows_R = selected_S.nonzero().squeeze(-1)  # data-dependent size: one host sync
            offsets_n = torch.cumsum(tokens_per_expert_E[lora.expert_ids], dim=0, dtype=torch.int32)

    proj_S = grouped_mm(x_S, w_in if is_transposed else w_in.transpose(-2, -1), offsets_E)
    if has_bias:
        proj_S.add_((self.gate_up_proj_bias if has_gate else self.up_proj_bias)[expert_ids_S])
    if sentinel_S1 is not None:
        proj_S.masked_fill_(sentinel_S1, 0.0)
    if lora_on_all_rows:
        proj_S.add_(lora.gate_up_update(x_S, offsets_n).to(proj_S.dtype))
    elif sel_rows_R is not None:
        proj_S = _AddRows.apply(proj_S, sel_rows_R, lora.gate_up_update(_SelectRows.apply(x_S, sel_rows_R), offsets_n))
    h_S = self._apply_gate(proj_S) if has_gate else self.act_fn(proj_S)

    out_S = grouped_mm(h_S, self.down_proj if is_transposed else self.down_proj.transpose(-2, -1), offsets_E)
    if has_bias:
        out_S.add_(self.down_proj_bias[expert_ids_S])
    if sentinel_S1 is not None:
        out_S.masked_fill_(sentinel_S1, 0.0)
    if lora_on_all_rows:
        out_S.add_(lora.down_update(h_S, offsets_n).to(out_S.dtype))
    elif sel_rows_R is not None:
        out_S = _AddRows.apply(out_S, sel_rows_R, lora.down_update(_SelectRows.apply(h_S, sel_rows_R), offsets_n))
    if getattr(self, "has_post_expert_norm", False):
        out_S = self.post_expert_norm(out_S)
    routed = getattr(self, "routed_adapter", None)  # Routed-PEFT variant E: adapter_e(x) beside expert e
    if routed is not None:
        out_S = routed.expert_update(out_S, x_S, expert_ids_S, tokens_per_expert_E, sentinel_S1)
    if sentinel_S1 is not None:  # sentinel rows may hold NaN (uninitialised * 0 would stay NaN)
        out_S = out_S.masked_fill(sentinel_S1, 0.0)

    # Back to (token, k) order, then weight and sum over k in one batched GEMM (fp32-accumulated, deterministic).
    out_TKH = _PermuteRows.apply(out_S, inv_perm_S, perm_S).view(num_tokens, num_top_k, -1)
    weights_T1K = top_k_weights_TK.to(out_TKH.dtype).unsqueeze(1)
    final_TH = torch.bmm(weights_T1K, out_TKH).squeeze(1)
    return final_TH.to(hidden_states.dtype).reshape(out_shape)


def compile_config() -> Any:
    """The dynamo settings under which the ``sieve_lora`` forward compiles with ``fullgraph=True``.

    The rows routed to selected experts have a data-dependent count (``nonzero``), a graph break unless
    dynamo captures dynamic-output-shape ops as unbacked sizes (torch's standard switch for MoE routing).
    Use as ``with compile_config(): torch.compile(model, fullgraph=True)(...)``.
    """
    return torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True)


def register_sieve_experts_implementation() -> None:
    """Make ``"sieve_lora"`` a valid ``config._experts_implementation`` everywhere (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if hasattr(ALL_EXPERTS_FUNCTIONS, "register"):
        ALL_EXPERTS_FUNCTIONS.register(SIEVE_EXPERTS_IMPLEMENTATION, sieve_lora_experts_forward)
    else:
        ALL_EXPERTS_FUNCTIONS[SIEVE_EXPERTS_IMPLEMENTATION] = sieve_lora_experts_forward


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module dispatched through ``ALL_EXPERTS_FUNCTIONS``."""
    if not all(hasattr(module, flag) for flag in ("has_gate", "is_transposed", "config", "num_experts")):
        return False
    w_in = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
    down = getattr(module, "down_proj", None)
    return isinstance(w_in, torch.Tensor) and w_in.dim() == 3 and isinstance(down, torch.Tensor)


def iter_fused_experts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(qualified name, module)`` for every fused experts module of ``model``."""
    for name, module in model.named_modules():
        if is_fused_experts(module):
            yield name, module


def _set_experts_implementation(config: Any, value: str | None) -> None:
    # The internal attribute leaves sibling sub-configs (vision towers, ...) untouched.
    if hasattr(config, "_experts_implementation_internal"):
        config._experts_implementation_internal = value
    else:
        config._experts_implementation = value


def use_sieve_experts(model: nn.Module) -> dict[str, str | None]:
    """Route every fused experts module of ``model`` through ``sieve_lora``; return what to restore.

    The setting is read from each experts module's own ``config`` (sub-configs are separate objects), so it
    is set there rather than through ``model.config``. Returns ``{experts module name: previous value}``.
    """
    register_sieve_experts_implementation()
    found = list(iter_fused_experts(model))
    if not found:
        raise ValueError("model has no fused experts modules (transformers @use_experts_implementation)")
    previous = {name: module.config._experts_implementation for name, module in found}
    for _, module in found:
        _set_experts_implementation(module.config, SIEVE_EXPERTS_IMPLEMENTATION)
    return previous


def restore_experts_implementation(model: nn.Module, previous: dict[str, str | None]) -> None:
    """Undo :func:`use_sieve_experts` with the mapping it returned."""
    for name, value in previous.items():
        _set_experts_implementation(model.get_submodule(name).config, value)
