"""Expert-parallel (EP) planning from a config alone: what each rank of transformers' EP engine holds.

The engine (``DistributedConfig(ep_size=..., fsdp_size=...)``, transformers 5.2x) places experts by one rule,
which :func:`engine_owner_E` reproduces: every ``grouped_gemm`` expert tensor is ``Shard(0)`` on the ``ep``
axis, so EP rank ``p`` owns the contiguous block ``[p * E/ep, (p + 1) * E/ep)``
(``transformers/distributed/expert_parallel.py`` ``MoEParamShard.shard_param`` L100-112; the all-to-all
dispatch relies on it, "each rank owns a contiguous range of experts", L214-215; ``AllReduceEP`` computes
the owner as ``top_k_index // num_local_experts``, L290). The expert mesh is ``(pp, dp_replicate, efsdp, ep)``
with ``ep`` innermost (``transformers/distributed/utils.py`` ``initialize_distributed_mesh`` L354-363), so
global rank ``g`` is EP rank ``g % ep`` and ranks ``g, g + ep, ...`` (the efsdp group) FSDP-shard the same
experts. Observed on two gloo processes: rank 0 held experts 0-3 and rank 1 experts 4-7 of 8.

Hot experts concentrate tokens, so where they land sets each rank's LoRA memory and routed-token load;
:func:`spread_owner_LE` is the alternative placement (round-robin by hotness) the plan compares against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..routing_stats import resolve_k
from .plan import load_config
from .sieve.config import SieveLoraConfig
from .sieve.memory import sieve_experts_saved_bytes
from .sieve.plan import plan_adapters

__all__ = ["engine_owner_E", "ep_plan_table", "hot_spread", "plan_ep", "spread_owner_LE"]

OPTIMIZER_STATES = 2  # AdamW: exp_avg and exp_avg_sq, in the parameter dtype (as memory.training_state_bytes)


def engine_owner_E(num_experts: int, ep_size: int) -> np.ndarray:
    """EP rank owning each expert under transformers' engine: contiguous blocks of ``E / ep``."""
    if ep_size < 1 or num_experts % ep_size:
        # the engine's own refusal: expert_parallel.py L103-107
        raise ValueError(f"--ep-size: cannot evenly shard {num_experts} experts across {ep_size} expert-parallel ranks")
    return np.arange(num_experts) // (num_experts // ep_size)


def spread_owner_LE(scores_LE: np.ndarray, ep_size: int) -> np.ndarray:
    """Round-robin by hotness: per layer, the i-th hottest expert goes to rank ``i % ep`` (E/ep each, as the
    engine requires). The engine cannot place experts this way itself; permuting the expert dimension of the
    expert tensors and the router's output rows before loading gives it the same function with this layout."""
    scores_LE = np.asarray(scores_LE)
    engine_owner_E(scores_LE.shape[1], ep_size)  # same divisibility rule
    order_LE = np.argsort(-scores_LE, axis=1, kind="stable")
    owner_LE = np.empty_like(order_LE)
    rows = np.arange(scores_LE.shape[0])[:, None]
    owner_LE[rows, order_LE] = np.arange(scores_LE.shape[1])[None, :] % ep_size
    return owner_LE


def hot_spread(counts_LE: np.ndarray, k: int, ep_size: int, owner_LE: np.ndarray | None = None) -> dict[str, Any]:
    """How the top-``k`` experts of each layer (by ``counts_LE``) and their routed rows land on the EP ranks.

    ``owner_LE`` defaults to the engine's placement. Returns per-layer-per-rank hot counts (``hot_LR``), the
    share of each layer's routed (token, k) rows that each rank's experts receive (``rows_LR``) and that its
    hot experts receive (``hot_rows_LR``), and summaries: ``max_hot`` (most hot experts on one rank in any
    layer, vs the even ``k / ep``), ``max_rows`` (largest share of a layer's rows on one rank, vs ``1 / ep``).
    """
    counts_LE = np.asarray(counts_LE, dtype=np.float64)
    num_layers, num_experts = counts_LE.shape
    if owner_LE is None:
        owner_LE = np.broadcast_to(engine_owner_E(num_experts, ep_size), counts_LE.shape)
    hot_LE = np.zeros(counts_LE.shape, dtype=bool)
    top_LE = np.argsort(-counts_LE, axis=1, kind="stable")[:, :k]
    hot_LE[np.arange(num_layers)[:, None], top_LE] = True
    share_LE = counts_LE / np.maximum(counts_LE.sum(axis=1, keepdims=True), 1.0)
    hot_LR = np.zeros((num_layers, ep_size), dtype=np.int64)
    rows_LR = np.zeros((num_layers, ep_size))
    hot_rows_LR = np.zeros((num_layers, ep_size))
    for layer in range(num_layers):
        np.add.at(hot_LR[layer], owner_LE[layer], hot_LE[layer].astype(np.int64))
        np.add.at(rows_LR[layer], owner_LE[layer], share_LE[layer])
        np.add.at(hot_rows_LR[layer], owner_LE[layer], share_LE[layer] * hot_LE[layer])
    return {
        "hot_LR": hot_LR,
        "rows_LR": rows_LR,
        "hot_rows_LR": hot_rows_LR,
        "even_hot": k / ep_size,
        "max_hot": int(hot_LR.max()),
        "mean_max_hot": float(hot_LR.max(axis=1).mean()),
        "max_rows": float(rows_LR.max()),
        "mean_max_rows": float(rows_LR.max(axis=1).mean()),
        "hot_total_R": hot_LR.sum(axis=0),
    }


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"--dtype: not a torch dtype: {name!r}")
    return dtype


def _expert_shapes(config: Any, trust_remote_code: bool) -> dict[str, Any]:
    """Dense/expert parameter split and the per-layer expert shape, from the meta model."""
    from ..arch import find_moe_layers
    from .plan import meta_model
    from .sieve.experts import iter_fused_experts

    model = meta_model(config, trust_remote_code)
    fused = list(iter_fused_experts(model))
    if not fused:
        raise ValueError(
            f"{getattr(config, 'model_type', config)}: no fused experts module, which the EP engine shards"
        )
    expert_params = sum(p.numel() for _, m in fused for p in m.parameters(recurse=False))
    total = sum(p.numel() for p in model.parameters())
    _, first = fused[0]
    down = first.down_proj
    inter, hidden = (down.shape[1], down.shape[2]) if first.is_transposed else (down.shape[2], down.shape[1])
    layers = find_moe_layers(model)
    # FSDP all-gathers one unit at a time: a decoder layer (its dense part whole, its E/ep local experts over
    # efsdp) or a top-level module such as the embedding
    layer_dense: dict[str, int] = {}
    layer_experts: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[: parts.index("layers") + 2]) if "layers" in parts else name
        into = layer_experts if ".experts." in name else layer_dense
        into[key] = into.get(key, 0) + p.numel()
    units = {key: (dense, layer_experts.get(key, 0)) for key, dense in layer_dense.items()}
    return {
        "total": total,
        "experts": expert_params,
        "dense": total - expert_params,
        "units": units,
        "hidden": int(hidden),
        "inter": int(inter),
        "has_gate": bool(getattr(first, "has_gate", True)),
        "num_experts": layers[0].num_experts,
        "top_k": int(getattr(config, "num_experts_per_tok", 0) or getattr(config, "moe_topk", 0)),
        "moe_layers": len(layers),
    }


FLASH_LIKE = "moe_sieve_saved_bytes_attention"


class _FlashLikeAttention(torch.autograd.Function):
    """Attention as flash attention's autograd sees it (query, key, value, output, fp32 log-sum-exp saved), for
    measuring on the meta device; it computes nothing and has no backward."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        raise RuntimeError("measurement only: the flash-like stand-in has no backward")


def _flash_like_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    return _FlashLikeAttention.apply(query, key, value).transpose(1, 2), None


def _register_flash_like_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(FLASH_LIKE, _flash_like_attention)


def dense_measurement_model(model: torch.nn.Module, lora: SieveLoraConfig) -> torch.nn.Module:
    """``model`` (in place) as :func:`dense_saved_bytes` measures it: sieve LoRA on everything but the routed
    experts (router weights trained, as under EP), attention as flash attention keeps it instead of the CPU math
    path's copies, and the experts' forward replaced by a stand-in whose own saves are not counted."""
    from torch.autograd.graph import saved_tensors_hooks

    from .sieve.experts import iter_fused_experts
    from .sieve.model import apply_sieve_lora

    _register_flash_like_attention()
    model.config._attn_implementation = FLASH_LIKE
    apply_sieve_lora(model, None, SieveLoraConfig(**{**lora.__dict__, "experts": "none", "router": "full"}))

    def experts_stand_in(hidden_states, top_k_index, top_k_weights):
        with saved_tensors_hooks(lambda t: t, lambda t: t):
            return hidden_states * top_k_weights.sum(-1, keepdim=True).to(hidden_states.dtype)

    for _, experts in iter_fused_experts(model):
        experts.forward = experts_stand_in
    return model


def dense_saved_bytes(
    config: Any, lora: SieveLoraConfig, dtype: str, trust_remote_code: bool = False
) -> dict[str, float]:
    """Bytes autograd saves for the backward outside the routed experts (attention, norms, router, shared experts,
    the head and the loss), with sieve LoRA attached, per token and fixed.

    Measured, not modelled: a forward of the adapted model on the meta device (no memory, no compute) under
    autograd's saved-tensor hooks, counting each saved activation once and no parameter. The experts' forward is
    replaced by a stand-in whose own saves are not counted (their activations are the separate, tested formula).
    Attention is counted as flash attention keeps it (query, key, value, output and the fp32 log-sum-exp). ``per_token``
    is the slope between 8 and 16 tokens (it includes the fp32 logits of a plain cross-entropy); ``fixed`` is what
    does not grow with tokens (e.g. a router weight cast to fp32).
    """
    from torch.autograd.graph import saved_tensors_hooks

    from .plan import meta_model

    model = dense_measurement_model(meta_model(config, trust_remote_code).to(_dtype(dtype)), lora)
    params = {id(p) for p in model.parameters()}

    def saved(tokens: int) -> int:
        seen: dict[int, torch.Tensor] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            base = t._base if t._base is not None else t
            if id(base) not in params and id(t) not in params:
                seen.setdefault(id(base), base)
            return t

        ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
        with saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
        return sum(t.numel() * t.element_size() for t in seen.values())

    small, large = saved(8), saved(16)
    per_token = (large - small) / 8
    return {"per_token": per_token, "fixed": max(small - 8 * per_token, 0.0)}


def plan_ep(
    model: str | Path | Any,
    k: str | int = "25%",
    ep_size: int = 2,
    fsdp_size: int | None = None,
    lora: SieveLoraConfig | None = None,
    *,
    micro_batch: int = 1,
    seq_len: int = 4096,
    dtype: str = "bfloat16",
    profile: Any = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Per-rank memory of sieve LoRA under transformers' EP engine (``ep_size`` x ``efsdp = fsdp / ep``).

    Base weights: dense parameters FSDP-sharded over ``fsdp`` and each EP rank's ``E/ep`` experts sharded over
    ``efsdp``, so every rank rests at ``total / fsdp`` (plus one gathered unit while it computes). Adapters:
    attention/router/shared LoRA sharded over ``fsdp``; a hot expert's factors live on the rank owning that
    expert (sharded over ``efsdp``); factors, gradients and AdamW's two states take the base ``dtype``, as
    sieve LoRA creates its factors in the experts' dtype. Activations: the experts' saved tensors on the rows
    the all-to-all delivers to a rank (:func:`~moe_sieve.adapters.sieve.memory.sieve_experts_saved_bytes`, top-1
    with unit weights as ``AllToAllEP`` calls the experts, expert_parallel.py L230-234) plus the sender's
    weighted combine (L248); attention and other dense activations are not included. With a ``profile`` the
    hot set and each rank's row share are measured; without one rows are even and the hot count per rank is
    ``k/ep`` on average, with the worst case ``min(k, E/ep)`` reported.
    """
    from transformers.distributed import DistributedConfig

    lora = lora or SieveLoraConfig()
    fsdp_size = fsdp_size or ep_size
    DistributedConfig(ep_size=ep_size, fsdp_size=fsdp_size)  # the engine's own mesh validation
    efsdp = fsdp_size // ep_size
    config = load_config(model, trust_remote_code) if isinstance(model, (str, Path)) else model
    shapes = _expert_shapes(config, trust_remote_code)
    num_experts, num_layers = shapes["num_experts"], shapes["moe_layers"]
    owner_E = engine_owner_E(num_experts, ep_size)
    k_int = resolve_k(k, num_experts)
    adapters = plan_adapters(config, k=k_int, lora=lora, trust_remote_code=trust_remote_code)
    groups = adapters["sieve_by_group"]
    per_expert = groups["experts"] // (k_int * num_layers)
    dense_adapter = adapters["sieve_params"] - groups["experts"]
    base_bytes = torch.empty((), dtype=_dtype(dtype)).element_size()

    if profile is not None:
        counts_LE = np.asarray(profile.counts_LE)
        if counts_LE.shape != (num_layers, num_experts):
            raise ValueError(f"--profile: counts {counts_LE.shape} do not fit the model's {(num_layers, num_experts)}")
        spread = hot_spread(counts_LE, k_int, ep_size)
        hot_LR, rows_LR, hot_rows_LR = spread["hot_LR"], spread["rows_LR"], spread["hot_rows_LR"]
    else:
        spread = None
        hot_LR = np.full((num_layers, ep_size), k_int / ep_size)
        rows_LR = np.full((num_layers, ep_size), 1.0 / ep_size)
        hot_rows_LR = rows_LR * k_int / num_experts

    tokens = micro_batch * seq_len  # per rank
    group_rows = ep_size * tokens * shapes["top_k"]  # (token, k) rows of one EP group per MoE layer
    b = base_bytes
    dense = dense_saved_bytes(config, lora, dtype, trust_remote_code)
    dense_bytes = int(round(dense["fixed"] + dense["per_token"] * tokens))
    ranks = []
    for rank in range(ep_size):
        hot = float(hot_LR[:, rank].sum())
        expert_adapter = per_expert * hot / efsdp
        adapter = dense_adapter / fsdp_size + expert_adapter
        acts = 0
        for layer in range(num_layers):
            rows = int(round(group_rows * rows_LR[layer, rank]))
            parts = sieve_experts_saved_bytes(
                num_tokens=rows,
                top_k=1,
                hidden_size=shapes["hidden"],
                intermediate_size=shapes["inter"],
                num_experts=num_experts // ep_size,
                dtype=_dtype(dtype),
                has_gate=shapes["has_gate"],
                rows_selected=int(round(group_rows * hot_rows_LR[layer, rank])),
                num_selected=int(round(hot_LR[layer, rank])),
                r=lora.r,
            )
            acts += parts["total"]  # tensors derived from the LoRA factors are saved per call, so they count
        combine = num_layers * tokens * shapes["top_k"] * (shapes["hidden"] + 1) * b
        ranks.append(
            {
                "ep_rank": rank,
                "global_ranks": [rank + ep_size * i for i in range(efsdp)],
                "experts": [int(np.flatnonzero(owner_E == rank)[0]), int(np.flatnonzero(owner_E == rank)[-1])],
                "base_bytes": b * shapes["total"] // fsdp_size,
                "gathered_unit_bytes": b
                * max(dense + experts // ep_size for dense, experts in shapes["units"].values()),
                "hot_experts": hot,
                "hot_experts_max_layer": float(hot_LR[:, rank].max()),
                "adapter_params": int(round(adapter)),
                "adapter_bytes": int(round(b * adapter)),
                "grad_bytes": int(round(b * adapter)),
                "optimizer_bytes": int(round(OPTIMIZER_STATES * b * adapter)),
                "activation_bytes": int(acts + combine),
                "dense_activation_bytes": dense_bytes,
                "row_share": float(rows_LR[:, rank].mean()),
            }
        )
    return {
        "model": str(model) if isinstance(model, (str, Path)) else type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "ep_size": ep_size,
        "fsdp_size": fsdp_size,
        "efsdp_size": efsdp,
        "world_size": fsdp_size,
        "dtype": dtype,
        "micro_batch": micro_batch,
        "seq_len": seq_len,
        "base_params": shapes["total"],
        "expert_params": shapes["experts"],
        "dense_params": shapes["dense"],
        "moe_layers": num_layers,
        "num_experts": num_experts,
        "top_k": shapes["top_k"],
        "k": k_int,
        "r": lora.r,
        "lora_params_per_expert": per_expert,
        "dense_saved_bytes_per_token": dense["per_token"],
        "dense_saved_bytes_fixed": dense["fixed"],
        "dense_adapter_params": dense_adapter,
        "sieve_params": adapters["sieve_params"],
        "measured": profile is not None,
        "worst_hot_per_layer": min(k_int, num_experts // ep_size),
        "spread": None if spread is None else _spread_summary(spread, np.asarray(profile.counts_LE), k_int, ep_size),
        "ranks": ranks,
    }


def _spread_summary(engine: dict[str, Any], counts_LE: np.ndarray, k: int, ep_size: int) -> dict[str, Any]:
    spread = hot_spread(counts_LE, k, ep_size, spread_owner_LE(counts_LE, ep_size))
    keys = ("even_hot", "max_hot", "mean_max_hot", "max_rows", "mean_max_rows")
    return {
        "engine": {key: engine[key] for key in keys} | {"hot_total_R": engine["hot_total_R"].tolist()},
        "round_robin": {key: spread[key] for key in keys} | {"hot_total_R": spread["hot_total_R"].tolist()},
    }


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:,.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:,.1f} MiB"


def ep_plan_table(result: dict[str, Any]) -> tuple[Any, list[str]]:
    """The per-rank table and the lines under it, for ``moe-sieve plan --ep-size``."""
    from rich.table import Table

    title = (
        f"{result['model']}: ep={result['ep_size']} x efsdp={result['efsdp_size']} (fsdp={result['fsdp_size']} ranks), "
        f"hot {result['k']}/{result['num_experts']} x {result['moe_layers']} layers, r={result['r']}, "
        f"{result['dtype']} base, micro-batch {result['micro_batch']} x {result['seq_len']} tokens"
    )
    table = Table(title=title)
    for column in (
        "EP rank (ranks)",
        "experts",
        "base",
        "+1 unit",
        "hot experts",
        "adapter",
        "+grad+AdamW",
        "expert acts",
        "dense acts",
        "rows",
    ):
        table.add_column(column, justify="right")
    for rank in result["ranks"]:
        first, last = rank["experts"]
        table.add_row(
            f"{rank['ep_rank']} ({','.join(map(str, rank['global_ranks']))})",
            f"{first}-{last}",
            _gib(rank["base_bytes"]),
            _gib(rank["gathered_unit_bytes"]),
            f"{rank['hot_experts']:g} (<={rank['hot_experts_max_layer']:g}/L)",
            f"{rank['adapter_params'] / 1e6:,.2f}M",
            _gib(rank["adapter_bytes"] + rank["grad_bytes"] + rank["optimizer_bytes"]),
            _gib(rank["activation_bytes"]),
            _gib(rank["dense_activation_bytes"]),
            f"{rank['row_share']:.3f}",
        )
    lines = [
        "base: weights at rest (dense FSDP-sharded over fsdp, the rank's E/ep experts over efsdp); +1 unit: one "
        "decoder layer all-gathered for compute; adapter: trainable params on the rank (hot experts' LoRA on "
        "their owner); rows: mean share of each layer's routed (token, k) rows that the rank's experts receive",
        "placement: transformers' engine, contiguous blocks of experts per EP rank "
        "(transformers/distributed/expert_parallel.py MoEParamShard, Shard(0) on the ep mesh)",
        "expert acts: the experts' saved tensors on the rows each rank receives, plus the all-to-all combine; "
        "dense acts: what autograd saves for everything else (attention, norms, router, shared experts, head and "
        "loss), measured on a meta forward of the adapted model; no gradient checkpointing",
    ]
    spread = result["spread"]
    if spread is None:
        lines.append(
            f"no --profile: hot experts per rank assumed even ({result['k'] / result['ep_size']:g}/layer); "
            f"worst case {result['worst_hot_per_layer']}/layer on one rank. Pass --profile to measure."
        )
    else:
        for name, s in (("engine placement", spread["engine"]), ("round-robin by hotness", spread["round_robin"])):
            lines.append(
                f"{name}: most hot experts on one rank in a layer {s['max_hot']} (even {s['even_hot']:g}, "
                f"mean over layers {s['mean_max_hot']:.2f}), largest routed-row share {s['max_rows']:.3f} "
                f"(even {1 / result['ep_size']:.3f}, mean over layers {s['mean_max_rows']:.3f}), "
                f"hot experts per rank {s['hot_total_R']}"
            )
    return table, lines
