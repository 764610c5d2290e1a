"""Routed-PEFT modules: a bank of N bottleneck adapters, the block-level S/D/R adapter and the per-expert E adapter.

Every adapter maps the FFN input ``x`` (D) through a bottleneck of width ``r`` back to D and its output is added
to the FFN output. The N adapters of a bank are stored as stacked ``[N, r, D]`` / ``[N, D, r]`` factors so that
D's sum is one pair of GEMMs and R's and E's routed rows go through :func:`~moe_sieve.adapters.sieve.experts.grouped_mm`
(rows sorted by adapter, one grouped GEMM per factor), the same machinery as Sieve LoRA on fused experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..sieve.experts import grouped_mm
from .config import RoutedAdapterConfig

__all__ = ["AdapterBank", "RoutedBlockAdapter", "RoutedExpertAdapter", "load_balancing_terms", "route_top_k"]


class AdapterBank(nn.Module):
    """N bias-free adapters of one type. ``lora``: ``s B A dropout(x)``; ``parallel``: ``W2 SiLU(dropout(W1 x))``.

    Parameter names follow the released code (``lora_A``/``lora_B``, ``adapter_w1``/``adapter_w2``), each with a
    leading adapter dimension; ``A``/``W1`` is ``[N, r, D]`` and ``B``/``W2`` ``[N, D, r]`` (``nn.Linear`` layout).
    """

    def __init__(
        self,
        num_adapters: int,
        hidden_size: int,
        config: RoutedAdapterConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_adapters, self.hidden_size, self.r = num_adapters, hidden_size, config.r
        self.adapter_type = config.adapter_type
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout)
        self.init = config.init
        names = ("lora_A", "lora_B") if self.adapter_type == "lora" else ("adapter_w1", "adapter_w2")
        self.first_name, self.second_name = names
        kw = {"dtype": dtype, "device": device}
        setattr(self, names[0], nn.Parameter(torch.empty(num_adapters, config.r, hidden_size, **kw)))
        setattr(self, names[1], nn.Parameter(torch.empty(num_adapters, hidden_size, config.r, **kw)))
        if not self.first.is_meta:
            self.reset_parameters()

    @property
    def first(self) -> nn.Parameter:
        return getattr(self, self.first_name)

    @property
    def second(self) -> nn.Parameter:
        return getattr(self, self.second_name)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``zero``: A as an ``nn.Linear`` weight, B = 0 (logits unchanged). ``perft``: the released code's
        ``A ~ N(0, 2/r)``, ``B ~ N(0, 1e-12)`` (std 1e-6), near but not exactly a no-op."""
        if self.init == "perft":
            self.first.normal_(0.0, math.sqrt(2.0 / self.r))
            self.second.normal_(0.0, 1e-6)
            return
        for slice_rD in self.first:
            nn.init.kaiming_uniform_(slice_rD, a=math.sqrt(5))
        self.second.zero_()

    def _inner(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.scaling if self.adapter_type == "lora" else F.silu(self.dropout(h))

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x) if self.adapter_type == "lora" else x

    def dense_sum(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``sum_j adapter_j(x)`` for every row: the N adapters side by side are one ``D -> N r -> D`` bottleneck."""
        n, r, d = self.num_adapters, self.r, self.hidden_size
        h_TM = self._input(x_TD.to(self.first.dtype)) @ self.first.reshape(n * r, d).t()
        return self._inner(h_TM) @ self.second.permute(1, 0, 2).reshape(d, n * r).t()

    def grouped(self, x_SD: torch.Tensor, offsets_N: torch.Tensor) -> torch.Tensor:
        """Row ``i`` through adapter ``g`` where rows ``[offsets[g-1], offsets[g])`` belong to adapter ``g``."""
        h_Sr = grouped_mm(self._input(x_SD), self.first.transpose(1, 2), offsets_N)
        return grouped_mm(self._inner(h_Sr), self.second.transpose(1, 2), offsets_N)

    def single(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """Adapter ``slot`` on ``x`` (any leading shape), for experts stored as an ``nn.ModuleList``."""
        h = self._input(x.to(self.first.dtype)) @ self.first[slot].t()
        return self._inner(h) @ self.second[slot].t()

    def extra_repr(self) -> str:
        return f"{self.adapter_type} x{self.num_adapters}, D={self.hidden_size}, r={self.r}, scaling={self.scaling:g}"


def route_top_k(
    logits_TN: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over the N adapters (at least fp32), top-K, optional renormalisation: ``(probs, weights, index)``."""
    probs_TN = torch.softmax(logits_TN, dim=-1, dtype=torch.promote_types(logits_TN.dtype, torch.float32))
    weights_TK, index_TK = torch.topk(probs_TN, top_k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return probs_TN, weights_TK, index_TK


def load_balancing_terms(
    probs_TN: torch.Tensor, index_TK: torch.Tensor, mask_T: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-layer sums of the Switch loss: ``(sum of router probabilities [N], assignments [N], tokens)``.

    Pooled over layers these give ``N * sum_j f_j P_j`` exactly as transformers' ``load_balancing_loss_func``
    (used by the released code): ``f_j`` the share of tokens with adapter j among their top-K, ``P_j`` the mean
    probability; padding tokens excluded.
    """
    num_adapters = probs_TN.shape[-1]
    if mask_T is not None:
        probs_TN, index_TK = probs_TN[mask_T], index_TK[mask_T]
    assigned_N = torch.bincount(index_TK.reshape(-1), minlength=num_adapters).to(probs_TN.dtype)
    return probs_TN.sum(0), assigned_N, torch.tensor(float(probs_TN.shape[0]), device=probs_TN.device)


class RoutedBlockAdapter(nn.Module):
    """S, D or R beside one MoE block: ``y = MoE(x) + Delta(x)``.

    S/D: ``Delta(x) = sum_j adapter_j(x)``. R: ``Delta(x) = sum_{j in topK(G~(x))} g_j(x) adapter_j(x)`` with
    ``G~ = softmax(W_r x)``, ``W_r`` a new bias-free ``[N, D]`` router; the (token, k) pairs are sorted by adapter
    and each factor is one grouped GEMM.
    """

    def __init__(
        self,
        hidden_size: int,
        config: RoutedAdapterConfig,
        *,
        renormalize: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.variant = config.variant
        self.top_k = config.top_k
        self.renormalize = renormalize
        self.base_router_weights = config.base_router_weights
        self.bank = AdapterBank(config.num_adapters, hidden_size, config, dtype=dtype, device=device)
        if self.variant == "R":
            self.router = nn.Linear(hidden_size, config.num_adapters, bias=False, dtype=dtype, device=device)
        else:
            self.register_module("router", None)
        self.last_terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.base_weights_TK: torch.Tensor | None = None  # set by the quirk's tap on the base routing

    def forward(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
        if self.router is None:
            return self.bank.dense_sum(x_TD)
        num_tokens, num_adapters, top_k = x_TD.shape[0], self.bank.num_adapters, self.top_k
        probs_TN, weights_TK, index_TK = route_top_k(
            self.router(x_TD.to(self.router.weight.dtype)), top_k, self.renormalize
        )
        self.last_terms = load_balancing_terms(probs_TN, index_TK, mask_T)
        if self.base_router_weights:
            if self.base_weights_TK is None or self.base_weights_TK.shape[-1] < top_k:
                raise ValueError("base_router_weights needs the base router's top-k >= the adapters' top-K")
            weights_TK = self.base_weights_TK[:, :top_k].to(weights_TK.dtype)
        adapter_ids_S, perm_S = torch.sort(index_TK.reshape(-1))
        x_SD = x_TD[perm_S // top_k]
        weights_S = weights_TK.reshape(-1)[perm_S]
        offsets_N = torch.cumsum(torch.bincount(adapter_ids_S, minlength=num_adapters), 0, dtype=torch.int32)
        out_SD = self.bank.grouped(x_SD, offsets_N) * weights_S.unsqueeze(-1).to(self.bank.first.dtype)
        inv_perm_S = torch.empty_like(perm_S)
        inv_perm_S[perm_S] = torch.arange(perm_S.numel(), device=perm_S.device)
        return out_SD[inv_perm_S].view(num_tokens, top_k, -1).sum(dim=1)


class RoutedExpertAdapter(nn.Module):
    """E: one adapter per adapted routed expert, ``y = sum_i G_i(x) (E_i(x) + adapter_i(x))`` with G the frozen
    router's weights. Fused experts call :meth:`expert_update` inside their grouped forward (rows already
    sorted by expert); ModuleList experts call :meth:`bank.single` from a hook on each adapted expert."""

    def __init__(
        self,
        expert_ids: Sequence[int],
        num_experts: int,
        hidden_size: int,
        config: RoutedAdapterConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        ids = sorted({int(e) for e in expert_ids})
        if not ids or ids[0] < 0 or ids[-1] >= num_experts:
            raise ValueError(f"expert ids must be a non-empty subset of [0, {num_experts}), got {ids}")
        self.num_experts = num_experts
        self.selected_experts: tuple[int, ...] = tuple(ids)
        self.bank = AdapterBank(len(ids), hidden_size, config, dtype=dtype, device=device)
        expert_ids_n = torch.tensor(ids, dtype=torch.long, device=device)
        slot_of_expert = torch.full((num_experts,), -1, dtype=torch.long, device=device)
        if not expert_ids_n.is_meta:
            slot_of_expert[expert_ids_n] = torch.arange(len(ids), device=device)
        self.register_buffer("expert_ids", expert_ids_n, persistent=False)
        self.register_buffer("slot_of_expert", slot_of_expert, persistent=False)
        self.all_experts = len(ids) == num_experts

    def expert_update(
        self,
        out_SD: torch.Tensor,
        x_SD: torch.Tensor,
        expert_ids_S: torch.Tensor,
        tokens_per_expert_E: torch.Tensor,
        sentinel_S1: torch.Tensor | None,
    ) -> torch.Tensor:
        """Add ``adapter_e(x)`` to each sorted row's expert output before the routing weight is applied."""
        if self.all_experts and sentinel_S1 is None:
            offsets_n = torch.cumsum(tokens_per_expert_E, dim=0, dtype=torch.int32)
            return out_SD + self.bank.grouped(x_SD, offsets_n).to(out_SD.dtype)
        selected_S = self.slot_of_expert[expert_ids_S] >= 0
        if sentinel_S1 is not None:
            selected_S &= ~sentinel_S1.squeeze(-1)
        rows_R = selected_S.nonzero().squeeze(-1)
        if rows_R.numel() == 0:
            return out_SD
        offsets_n = torch.cumsum(tokens_per_expert_E[self.expert_ids], dim=0, dtype=torch.int32)
        return out_SD.index_add(0, rows_R, self.bank.grouped(x_SD[rows_R], offsets_n).to(out_SD.dtype))

    def extra_repr(self) -> str:
        return f"experts={list(self.selected_experts)} of {self.num_experts}"
