"""Export Sieve LoRA adapters in the layouts serving engines read (vLLM, SGLang).

PEFT's own format (``peft_export``) keeps fused experts as ``target_parameters``; the engines read MoE LoRA
differently, and an adapter whose expert weights an engine does not recognise can load without error while
they are silently dropped. This module writes, per engine and model family, the layout the engine's loader
reads, from the adapted model's factors alone (no PEFT involved):

* 2D experts (vLLM models without ``is_3d_moe_weight``: OLMoE, Mixtral, Qwen2/Qwen3-MoE, DeepSeek-V2/V3, and
  ModuleList experts): one PEFT-style pair per expert and projection, with the checkpoint's projection names
  (``ArchSpec.serving_expert_projections``; Mixtral ``w1``/``w3``/``w2`` under ``block_sparse_moe``):
  ``base_model.model.model.layers.{L}.mlp.experts.{E}.gate_proj.lora_A.weight`` ``(r, hidden)`` and
  ``...lora_B.weight`` ``(intermediate, r)``. vLLM's ``PackedLoRALayerWeights.pack_moe`` asserts that every
  expert has all three projections and stacks them with one rank and one scaling, so the experts that were not
  selected get zero factors (exact: a zero ``B`` adds nothing) and every module must have the same rank.
* 3D experts (vLLM ``is_3d_moe_weight``: GPT-OSS): PEFT's ``target_parameters`` layout,
  ``experts.base_layer.lora_A/B`` = ``gate_up_proj`` and ``experts.lora_A/B`` = ``down_proj``, ``A`` as
  ``(E*R, in)`` expert-major, ``B`` as ``(out, R*E)`` with the expert fastest in ``B``'s columns, gate/up rows
  in the checkpoint's (interleaved) order. Our separate gate and up factors are one exact rank-``2r`` LoRA on
  ``gate_up_proj`` (``A = [A_gate; A_up]``, block-diagonal ``B``); vLLM's ``FusedMoE3DWithLoRA`` keeps one
  rank for the adapter, so every other module is zero-padded to rank ``2r`` and ``lora_alpha`` doubled (the
  scaling ``alpha / r`` is unchanged, the update exact).
* Trained token rows (``--train-tokens``) are refused: vLLM's loader (``vllm/lora/lora_model.py``
  ``from_lora_tensors`` -> ``utils.parse_fine_tuned_lora_name``) accepts only ``lora_A``/``lora_B``,
  ``lora_embedding_A/B`` and bias tensors and raises on PEFT's ``token_adapter.trainable_tokens_delta``; SGLang
  reads ``lora_A``/``lora_B`` pairs only.
* Routers: vLLM puts LoRA on a router only where the model's gate is its ``GateLinear``
  (``ArchSpec.serving_router_lora``); SGLang cannot put LoRA on router gates. Elsewhere the export is refused
  with the options that work. ``modules_to_save`` is never written (vLLM rejects it).

Checked in the engines' source (2026-11-24):

* vLLM 0.32.0 (PyPI wheel, read from the installed package and loaded by scripts/check_vllm_export.py):
  ``vllm/lora/lora_model.py`` (``from_local_checkpoint`` / ``from_lora_tensors``), ``vllm/lora/utils.py``
  (``parse_fine_tuned_lora_name``,
  ``process_packed_modules_mapping``: ``experts`` -> the per-expert names of ``get_expert_mapping`` unless
  ``is_3d_moe_weight``), ``vllm/lora/lora_weights.py`` (``pack_moe``: ``assert w1/w2/w3 is not None`` per
  expert, one rank per projection), ``vllm/lora/model_manager.py`` (``_create_merged_loras_inplace``,
  ``_stack_moe_lora_weights``: ``experts.base_layer`` = gate_up, reshape ``(E, -1, in)`` and
  ``(out, -1, E)``), ``vllm/lora/peft_helper.py`` (``modules_to_save`` only ``score``/``classifier``),
  ``vllm/model_executor/layers/fused_moe/layer.py`` (default ``ckpt_names`` gate_proj/down_proj/up_proj),
  ``vllm/model_executor/models/{olmoe,mixtral,qwen2_moe,qwen3_moe,deepseek_v2,gpt_oss}.py`` (``self.gate`` /
  ``self.router`` = ``GateLinear``, a ``ReplicatedLinear`` that ``ReplicatedLinearWithLoRA`` wraps; Mixtral
  ``block_sparse_moe`` with ``ckpt_names=("w1", "w2", "w3")``; only ``gpt_oss.py`` sets
  ``is_3d_moe_weight = True``).
* SGLang, ``python/sglang/srt/lora/utils.py`` at sgl-project/sglang 01235a1633d1
  (``get_normalized_target_modules``, ``_KNOWN_LORA_TARGET_MODULES``: no router gate; MoE ``gate_up_proj_moe``
  / ``down_proj_moe`` from the per-expert keys). Its 3D (GPT-OSS) expert layout was not verified, so that
  export is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .._io import atomic_dir, atomic_write_safetensors
from ..arch import find_moe_layers, get_arch
from .io import lora_state
from .peft_export import expert_factors, first_projection, router_delta
from .sieve.experts import ExpertLoRA
from .sieve.layer import LoraLinear
from .tokens import token_row_modules

__all__ = ["SERVING_ENGINES", "ServingExport", "export_serving_adapter", "serving_tensors"]

Engine = Literal["vllm", "sglang"]
SERVING_ENGINES: tuple[str, ...] = ("vllm", "sglang")
PREFIX = "base_model.model."
WEIGHTS_FILE = "adapter_model.safetensors"

# Leaf names SGLang's LoRA normalisation knows (utils.get_normalized_target_modules, _KNOWN_LORA_TARGET_MODULES,
# the MoE w1/w2/w3 keys); anything else would not be adapted there.
_SGLANG_LEAVES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"}
    | {"q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj"}
)
ROUTER_OFF_HINT = "export --format merged, or train with router LoRA off (--targets attention,shared,experts)"


@dataclass(frozen=True)
class _Pair:
    """One exported LoRA pair by its checkpoint module name; ``A`` (r, in), ``B`` (out, r)."""

    name: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    kind: str  # attention / shared / router / experts / experts-zero / experts-3d


@dataclass(frozen=True)
class ServingExport:
    """What was written: the directory, its weights file size and how much of it is zero padding."""

    path: Path
    engine: str
    rank: int
    lora_alpha: float
    tensors: int
    bytes: int
    zero_filled_experts: int
    sieve_bytes: int


def _checkpoint_names(model: nn.Module) -> dict[str, str]:
    """transformers MoE block name -> the block name in the engine's checkpoint (Mixtral: block_sparse_moe)."""
    spec = get_arch(model)
    if not spec.serving_moe_block:
        return {}
    renames = {}
    for layer in find_moe_layers(model, spec):
        parent, _, _ = layer.name.rpartition(".")
        renames[layer.name] = f"{parent}.{spec.serving_moe_block}" if parent else spec.serving_moe_block
    return renames


def _rename(name: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return name


def _expert_pairs(name: str, lora: ExpertLoRA, projections: tuple[str, str, str]) -> Iterator[_Pair]:
    """Per-expert pairs of fused experts, every expert (zeros for the unselected ones)."""
    gate_name, up_name, down_name = projections
    selected = {int(e): slot for slot, e in enumerate(lora.expert_ids.tolist())}
    factors = {"gate": (lora.gate_A, lora.gate_B), "up": (lora.up_A, lora.up_B), "down": (lora.down_A, lora.down_B)}
    for expert in range(lora.num_experts):
        slot = selected.get(expert)
        for part, leaf in (("gate", gate_name), ("up", up_name), ("down", down_name)):
            lora_A, lora_B = (t.detach() for t in factors[part])
            if slot is None:
                pair_A, pair_B, kind = lora_A.new_zeros(lora_A.shape[1:]), lora_B.new_zeros(lora_B.shape[1:]), "z"
            else:
                pair_A, pair_B, kind = lora_A[slot], lora_B[slot], "e"
            yield _Pair(
                f"{name}.{expert}.{leaf}",
                pair_A.contiguous(),
                pair_B.contiguous(),
                lora.scaling,
                "experts" if kind == "e" else "experts-zero",
            )


def _expert_3d_tensors(name: str, lora: ExpertLoRA) -> dict[str, torch.Tensor]:
    """PEFT ``target_parameters`` layout of one fused experts module (gate_up as ``base_layer``)."""
    tensors = {}
    for projection, key in ((first_projection(lora), f"{name}.base_layer"), ("down_proj", name)):
        sel_A, sel_B = expert_factors(lora, projection)
        rank, in_features, out_features = sel_A.shape[1], sel_A.shape[2], sel_B.shape[1]
        full_A = sel_A.new_zeros(lora.num_experts, rank, in_features)
        full_B = sel_B.new_zeros(out_features, rank, lora.num_experts)
        full_A[lora.expert_ids] = sel_A
        full_B[:, :, lora.expert_ids] = sel_B.permute(1, 2, 0)
        tensors[f"{key}.lora_A.weight"] = full_A.reshape(lora.num_experts * rank, in_features)
        tensors[f"{key}.lora_B.weight"] = full_B.reshape(out_features, rank * lora.num_experts)
    return tensors


def _pad_rank(tensor_A: torch.Tensor, tensor_B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of ``A`` and columns of ``B`` up to ``rank``: the same update at a larger rank."""
    extra = rank - tensor_A.shape[0]
    if extra == 0:
        return tensor_A, tensor_B
    return (
        torch.cat([tensor_A, tensor_A.new_zeros(extra, tensor_A.shape[1])]),
        torch.cat([tensor_B, tensor_B.new_zeros(tensor_B.shape[0], extra)], dim=1),
    )


def _pad_3d(tensor_A: torch.Tensor, tensor_B: torch.Tensor, num_experts: int, rank: int) -> tuple[Any, Any]:
    """Pad a folded ``(E*R, in)`` / ``(out, R*E)`` pair to rank ``rank`` per expert."""
    old = tensor_A.shape[0] // num_experts
    if old == rank:
        return tensor_A, tensor_B
    full_A = tensor_A.new_zeros(num_experts, rank, tensor_A.shape[1])
    full_A[:, :old] = tensor_A.reshape(num_experts, old, -1)
    full_B = tensor_B.new_zeros(tensor_B.shape[0], rank, num_experts)
    full_B[:, :old] = tensor_B.reshape(tensor_B.shape[0], old, num_experts)
    return full_A.reshape(num_experts * rank, -1), full_B.reshape(tensor_B.shape[0], rank * num_experts)


def serving_tensors(model: nn.Module, engine: Engine) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """The engine's adapter tensors (PEFT key names) and ``adapter_config.json`` fields for ``model``.

    Returns ``(tensors, config_fields, zero_filled_experts)``. Raises ``ValueError`` for what the engine cannot
    hold exactly (router LoRA it does not support, unequal ranks, modules it does not know), naming the option
    that works instead.
    """
    if engine not in SERVING_ENGINES:
        raise ValueError(f"unknown serving engine {engine!r}; choose one of {', '.join(SERVING_ENGINES)}")
    state = lora_state(model, engine)
    if token_row_modules(model):
        raise ValueError(
            f"{engine} cannot load trained token rows (--train-tokens: {len(state.config.tokens)} tokens; its LoRA "
            "loader reads lora_A/lora_B pairs only); export --format merged, or --format peft for PEFT"
        )
    spec = get_arch(model)
    layers = find_moe_layers(model, spec)
    router_names = {layer.router_name for layer in layers}
    renames = _checkpoint_names(model)
    r, alpha = state.config.r, float(state.config.alpha)
    scaling = alpha / r

    pairs: list[_Pair] = []
    fused: dict[str, ExpertLoRA] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            kind = "router" if name in router_names else "module"
            pairs.append(
                _Pair(name, module.lora_A.weight.detach(), module.lora_B.weight.detach(), module.scaling, kind)
            )
        delta = router_delta(module, name)
        if delta is not None:
            pairs.append(_Pair(name, delta.lora_A.detach(), delta.lora_B.detach(), delta.scaling, "router"))
        lora = getattr(module, "sieve_lora", None)
        if isinstance(lora, ExpertLoRA):
            if lora.r != r or abs(lora.scaling - scaling) > 1e-12 * max(1.0, scaling):
                raise ValueError(f"{name}: expert rank/alpha {lora.r}/{lora.alpha:g} differ from the adapter's {r}")
            fused[name] = lora
    if not pairs and not fused:
        raise ValueError("the model's Sieve state lists no adapted module")

    routers = [p.name for p in pairs if p.kind == "router"]
    if routers and engine not in spec.serving_router_lora:
        where = "router gates" if engine == "sglang" else f"the router of {spec.name} models"
        raise ValueError(
            f"{engine} cannot put LoRA on {where} ({routers[0]}, {len(routers)} in all); {ROUTER_OFF_HINT}"
        )

    # Zero-fill the unselected experts of ModuleList layers: the packing wants all experts, all projections.
    zero_filled = 0
    adapted = {p.name for p in pairs}
    for layer in layers:
        if layer.layout.storage != "module_list" or not state.experts.get(layer.layer_id):
            continue
        if "experts" not in state.config.targets:
            continue
        for expert_id, expert in enumerate(layer.experts):
            prefix = f"{layer.experts_name}.{expert_id}"
            linears = [(p, getattr(expert, p)) for p in spec.mlp_projections if hasattr(expert, p)]
            if all(f"{prefix}.{p}" in adapted for p, _ in linears):
                continue
            zero_filled += 1
            for proj, linear in linears:
                weight = linear.weight
                pairs.append(
                    _Pair(
                        f"{prefix}.{proj}",
                        weight.new_zeros(r, weight.shape[1]),
                        weight.new_zeros(weight.shape[0], r),
                        scaling,
                        "experts-zero",
                    )
                )

    tensors: dict[str, torch.Tensor] = {}
    target_parameters: list[str] = []
    rank_out, alpha_out = r, alpha
    if spec.serving_experts_3d and fused:
        if engine == "sglang":
            raise ValueError(
                f"{spec.name}: SGLang's layout for 3D expert LoRA is not verified; export --format vllm or merged"
            )
        rank_out = max(2 * r if lora.has_gate else r for lora in fused.values())
        alpha_out = alpha * rank_out / r
        for name, lora in fused.items():
            zero_filled += lora.num_experts - lora.num_selected
            ckpt = _rename(name, renames)
            folded = _expert_3d_tensors(ckpt, lora)
            for key in (f"{ckpt}.base_layer", ckpt):
                a, b = _pad_3d(
                    folded[f"{key}.lora_A.weight"], folded[f"{key}.lora_B.weight"], lora.num_experts, rank_out
                )
                tensors[f"{PREFIX}{key}.lora_A.weight"], tensors[f"{PREFIX}{key}.lora_B.weight"] = a, b
            target_parameters += [f"{ckpt}.{first_projection(lora)}", f"{ckpt}.down_proj"]
    else:
        for name, lora in fused.items():
            if not lora.has_gate:
                raise ValueError(f"{name}: non-gated fused experts have no serving layout here; export --format merged")
            zero_filled += lora.num_experts - lora.num_selected
            pairs += list(_expert_pairs(name, lora, spec.serving_expert_projections))

    for pair in pairs:
        if pair.lora_A.shape[0] != r or abs(pair.scaling - scaling) > 1e-12 * max(1.0, scaling):
            raise ValueError(
                f"{pair.name}: rank {pair.lora_A.shape[0]} / scaling {pair.scaling:g} differ from the adapter's "
                f"{r} / {scaling:g}; {engine} packs one rank and one scaling per adapter"
            )
        ckpt = _rename(pair.name, renames)
        leaf = ckpt.rpartition(".")[2]
        if engine == "sglang" and leaf not in _SGLANG_LEAVES:
            raise ValueError(
                f"SGLang does not put LoRA on {ckpt} ({leaf!r} is not among its LoRA modules); "
                "export --format vllm or merged, or train without that module group"
            )
        lora_A, lora_B = _pad_rank(pair.lora_A, pair.lora_B, rank_out)
        tensors[f"{PREFIX}{ckpt}.lora_A.weight"] = lora_A.contiguous()
        tensors[f"{PREFIX}{ckpt}.lora_B.weight"] = lora_B.contiguous()

    leaves = sorted({_rename(pair.name, renames).rpartition(".")[2] for pair in pairs})
    fields = {
        "peft_type": "LORA",
        "r": rank_out,
        "lora_alpha": alpha_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": leaves,
        "target_parameters": sorted(target_parameters) or None,
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
    }
    return tensors, fields, zero_filled


def export_serving_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    engine: Engine,
    base_model: str | None = None,
    overwrite: bool = False,
) -> ServingExport:
    """Write ``model``'s Sieve adapters as the PEFT-style directory ``engine`` loads (atomic)."""
    tensors, fields, zero_filled = serving_tensors(model, engine)
    base_model = base_model or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    fields = {"base_model_name_or_path": base_model, **fields}
    sieve_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())}
    with atomic_dir(path, overwrite) as tmp:
        atomic_write_safetensors(tmp / WEIGHTS_FILE, tensors, {"format": "pt", "moe_sieve_engine": engine})
        (tmp / "adapter_config.json").write_text(json.dumps(fields, indent=2) + "\n", encoding="utf-8")
    return ServingExport(
        path=Path(path),
        engine=engine,
        rank=int(fields["r"]),
        lora_alpha=float(fields["lora_alpha"]),
        tensors=len(tensors),
        bytes=(Path(path) / WEIGHTS_FILE).stat().st_size,
        zero_filled_experts=zero_filled,
        sieve_bytes=sieve_bytes,
    )
