"""Export Sieve LoRA adapters as a standard Hugging Face PEFT LoRA adapter directory.

The directory (``adapter_config.json`` + ``adapter_model.safetensors``, written by PEFT itself) loads with
``PeftModel.from_pretrained(base_model, path)`` on an unmodified base model, without moe-sieve, and gives the
same outputs as the adapted model. How each kind of Sieve adapter maps onto PEFT's format:

* :class:`~moe_sieve.adapters.sieve.layer.LoraLinear` (attention, shared experts, ``nn.Linear`` routers,
  ``nn.ModuleList`` experts): ``target_modules``, listed by full name; the factors copy one to one. Linears
  whose leaf name is a v4 expert/router name (``gate_proj``, ``up_proj``, ``down_proj``, ``w1``-``w3``,
  ``gate``) go to ``target_parameters`` as ``<name>.weight`` instead: PEFT 0.21 on transformers v5
  rewrites such ``target_modules`` entries of MoE model types (DeepSeek-V3, Qwen3-MoE, OLMoE, Mixtral, ...)
  into the fused experts on every load, which would drop e.g. DeepSeek's shared experts. A 2D ``ParamWrapper``
  computes the same ``W + s * B @ A`` and keeps the same state-dict keys (``<name>.lora_A.weight``).
* :class:`~moe_sieve.adapters.sieve.layer.LoraWeightDelta` (routers whose weight is a bare parameter):
  ``target_parameters`` on the 2D weight, which PEFT adapts exactly like our parametrization.
* :class:`~moe_sieve.adapters.sieve.experts.ExpertLoRA` (fused 3D experts): ``target_parameters`` on
  ``gate_up_proj`` (or ``up_proj``) and ``down_proj`` (nested ``ParamWrapper``s on one module). PEFT keeps one
  LoRA per parameter for all experts: ``lora_A`` weight ``(E * R, in)`` read as ``(E, R, in)`` (expert-major),
  ``lora_B`` weight ``(out, R * E)`` read as ``(out, R, E)`` (column ``k * E + e``), with in/out taken from the
  parameter and its ``is_transposed`` flag. Our separate rank-``r`` gate and up factors become one exact
  rank-``2r`` LoRA on ``gate_up_proj``: ``A = [A_gate; A_up]`` and a block-diagonal ``B`` with the gate/up
  blocks on the gate/up output rows (first/second half when concatenated, even/odd rows when interleaved as in
  GPT-OSS); ``rank_pattern``/``alpha_pattern`` give it rank ``2r`` and alpha ``2 * alpha``, so the scaling stays
  ``alpha / r``. Unselected experts get zero factors: exact, but the PEFT file is larger than ours because
  PEFT stores every expert.
* Token rows (:mod:`~moe_sieve.adapters.tokens`, ``--train-tokens``): ``trainable_token_indices``, a list when
  the embeddings are tied (PEFT ties the head to the input embedding's rows), else the same indices for the input
  embedding and the head by module name. PEFT stores the replacement rows (``token_adapter.trainable_tokens_delta``
  = base row + our delta), so the export writes those.

Limits: PEFT's ``ParamWrapper`` refuses ``lora_dropout != 0``, so the export says ``lora_dropout=0.0``
(dropout is a training-time setting; the trained update is the same). Expert biases (GPT-OSS) are not
adapted on either side. :class:`NotImplementedError` is raised for what PEFT cannot hold exactly: a router
weight with parametrizations besides ours, fused experts whose parameters disagree with the adapter's layout
(``is_transposed``, expert count, e.g. expert-parallel shards), and any model for which PEFT rewrites the
targets or patterns it is given. PEFT 0.21 warns on load that the ``rank_pattern``/``alpha_pattern`` keys
"did not match any targeted module": that check looks at ``target_modules`` only; the patterns do apply to
the ``target_parameters`` (a wrong rank could not load).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._io import atomic_dir
from .io import UnsupportedExportError, lora_state
from .sieve.experts import ExpertLoRA, restore_experts_implementation
from .sieve.layer import LoraLinear, LoraWeightDelta
from .sieve.model import SieveState
from .tokens import TokenRowsEmbedding, TokenRowsHead, is_tied, token_row_modules, unwrap_token_rows

__all__ = ["export_peft_adapter"]

ADAPTER_NAME = "default"


# Leaf names that PEFT's transformers-v5 MoE conversion (run again on every load) reads as v4 expert or router
# projections: it removes such ``target_modules`` entries and targets the fused experts instead, which would
# silently drop e.g. the shared experts of DeepSeek-V3. Linears with these names are exported as 2D parameters.
_V4_EXPERT_LEAVES = frozenset({"gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})


def _remapped_leaves() -> frozenset[str]:
    """The names above plus any that the installed PEFT's conversion tables add."""
    try:
        from peft.utils.transformers_weight_conversion import _MOE_TARGET_MODULE_MAPPING
    except Exception:  # older PEFT or transformers v4: no conversion at all
        return _V4_EXPERT_LEAVES
    return _V4_EXPERT_LEAVES | {leaf for mapping in _MOE_TARGET_MODULE_MAPPING.values() for leaf in mapping}


@dataclass
class _ExportPlan:
    """What the adapted model holds, by the names PEFT will see on the bare base model."""

    linears: dict[str, LoraLinear] = field(default_factory=dict)  # target_modules
    linear_weights: dict[str, LoraLinear] = field(default_factory=dict)  # "<linear>.weight" target_parameters
    routers: dict[str, LoraWeightDelta] = field(default_factory=dict)  # "<router>.weight" target_parameters
    experts: dict[str, ExpertLoRA] = field(default_factory=dict)  # fused experts module name -> adapter
    tokens: dict[str, TokenRowsEmbedding | TokenRowsHead] = field(default_factory=dict)  # trainable_token_indices

    def target_parameters(self) -> list[str]:
        names = [*self.linear_weights, *self.routers]
        for name, lora in self.experts.items():
            names += [f"{name}.{first_projection(lora)}", f"{name}.down_proj"]
        return sorted(names)


def first_projection(lora: ExpertLoRA) -> str:
    return "gate_up_proj" if lora.has_gate else "up_proj"


def router_delta(module: nn.Module, name: str) -> LoraWeightDelta | None:
    """Our router parametrization, refused when it shares the weight with others PEFT could not reproduce."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    chain = list(module.parametrizations.weight)
    if not any(isinstance(p, LoraWeightDelta) for p in chain):
        return None
    if len(chain) != 1 or set(module.parametrizations.keys()) != {"weight"}:
        raise UnsupportedExportError(
            f"{name} carries parametrizations {[type(p).__name__ for p in chain]} on weight and on "
            f"{sorted(module.parametrizations.keys())} besides the router LoRA; PEFT's target_parameters can only "
            "add one low-rank update to a plain parameter"
        )
    return chain[0]


def _unparametrize(module: nn.Module) -> None:
    """Restore the plain weight of a deep-copied router, leaving the original module alone.

    ``remove_parametrizations`` would delete the ``weight`` property from the parametrized class, which the copy
    shares with the original, and so break the original; resetting the copy's class touches nothing shared.
    """
    original = module.parametrizations["weight"].original
    module.__class__ = parametrize.type_before_parametrizations(module)
    del module._modules["parametrizations"]
    if isinstance(original, nn.Parameter):
        module.register_parameter("weight", original)
    else:
        module.register_buffer("weight", original)


def _plan(model: nn.Module) -> _ExportPlan:
    plan = _ExportPlan()
    remapped = _remapped_leaves()
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            if name.rpartition(".")[2] in remapped:
                plan.linear_weights[f"{name}.weight"] = module
            else:
                plan.linears[name] = module
        delta = router_delta(module, name)
        if delta is not None:
            plan.routers[f"{name}.weight"] = delta
        lora = getattr(module, "sieve_lora", None)
        if isinstance(lora, ExpertLoRA):
            _check_experts(name, module, lora)
            plan.experts[name] = lora
    plan.tokens = token_row_modules(model)
    if not (plan.linears or plan.linear_weights or plan.routers or plan.experts or plan.tokens):
        raise ValueError("the model's Sieve state lists no adapted module")
    return plan


def _check_experts(name: str, experts: nn.Module, lora: ExpertLoRA) -> None:
    """The fused layout PEFT will infer from the parameter and ``is_transposed`` must be the one we trained on."""
    w_in = getattr(experts, first_projection(lora), None)
    down = getattr(experts, "down_proj", None)
    if not isinstance(w_in, torch.Tensor) or not isinstance(down, torch.Tensor) or w_in.dim() != 3:
        raise UnsupportedExportError(f"{name}: fused experts without 3D {first_projection(lora)}/down_proj parameters")
    if bool(getattr(experts, "is_transposed", False)) != lora.is_transposed:
        raise UnsupportedExportError(f"{name}: the experts' is_transposed flag disagrees with the adapter's layout")
    if w_in.shape[0] != lora.num_experts or down.shape[0] != lora.num_experts:
        raise UnsupportedExportError(
            f"{name}: {lora.num_experts} experts in the adapter but {w_in.shape[0]} stored in the parameters "
            "(expert-parallel shards cannot be exported; export from an unsharded model)"
        )


def _bare_copy(model: nn.Module, state: SieveState) -> nn.Module:
    """A copy of ``model`` without our adapters (not merged), sharing every tensor so no weight is duplicated."""
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    bare = copy.deepcopy(model, memo)
    for name, module in list(bare.named_modules()):
        if isinstance(module, LoraLinear):
            parent_name, _, leaf = name.rpartition(".")
            setattr(bare.get_submodule(parent_name) if parent_name else bare, leaf, module.base_layer)
    for name, module in list(bare.named_modules()):
        if router_delta(module, name) is not None:
            _unparametrize(module)
        if isinstance(getattr(module, "sieve_lora", None), ExpertLoRA):
            del module.sieve_lora
    unwrap_token_rows(bare)
    if state.previous_experts_implementation is not None:
        restore_experts_implementation(bare, state.previous_experts_implementation)
    del bare.moe_sieve
    return bare


def _lora_config(plan: _ExportPlan, state: SieveState, base_model: str | None, task_type: str | None) -> Any:
    from peft import LoraConfig

    r, alpha = state.config.r, float(state.config.alpha)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, lora in plan.experts.items():
        if lora.r != r or lora.alpha != alpha:
            raise ValueError(f"{name}: adapter rank/alpha {lora.r}/{lora.alpha:g} differ from the Sieve config")
        if lora.has_gate:
            key = re.escape(f"{name}.gate_up_proj")
            rank_pattern[key], alpha_pattern[key] = 2 * r, 2 * alpha
    for name, module in itertools.chain(plan.linears.items(), plan.linear_weights.items(), plan.routers.items()):
        if module.r != r or abs(module.scaling - alpha / r) > 1e-12 * max(1.0, alpha / r):
            raise ValueError(f"{name}: adapter rank/scaling differ from the Sieve config")
    return LoraConfig(
        trainable_token_indices=_token_indices(plan),
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=sorted(plan.linears),
        target_parameters=plan.target_parameters() or None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        base_model_name_or_path=base_model,
        task_type=task_type,
    )


def _token_indices(plan: _ExportPlan) -> list[int] | dict[str, list[int]] | None:
    """PEFT's ``trainable_token_indices``: a list (the input embedding, with the head tied to it by PEFT) when the
    embeddings are tied, else the same indices for the input embedding and the head by module name."""
    if not plan.tokens:
        return None
    heads = [m for m in plan.tokens.values() if isinstance(m, TokenRowsHead)]
    tied = any(head.tied is not None for head in heads)
    if tied:
        return next(m for m in plan.tokens.values() if isinstance(m, TokenRowsEmbedding)).token_ids.tolist()
    return {name: module.token_ids.tolist() for name, module in plan.tokens.items()}


def _copy_token_rows(inner: nn.Module, plan: _ExportPlan) -> None:
    """Write PEFT's ``trainable_tokens_delta`` (the replacement rows: base row + our delta) for each wrapped layer."""
    from peft.utils.other import TrainableTokensWrapper

    wrapped = {name for name, module in inner.named_modules() if isinstance(module, TrainableTokensWrapper)}
    tied = any(isinstance(m, TokenRowsHead) and m.tied is not None for m in plan.tokens.values())
    if wrapped != set(plan.tokens):
        raise NotImplementedError(
            f"PEFT put trainable tokens on {sorted(wrapped)}, the adapter trains rows of {sorted(plan.tokens)}"
        )
    for name, module in plan.tokens.items():
        adapter = inner.get_submodule(name).token_adapter
        if isinstance(module, TokenRowsHead) and module.tied is not None:
            if adapter.tied_adapter is None:
                raise NotImplementedError(f"{name}: PEFT did not tie the head's token rows to the input embedding")
            continue
        if tied and adapter.tied_adapter is not None:
            raise NotImplementedError(f"{name}: PEFT tied token rows the adapter trains separately")
        if list(adapter.token_indices[ADAPTER_NAME]) != module.token_ids.tolist():
            raise RuntimeError(f"{name}: PEFT token indices {adapter.token_indices[ADAPTER_NAME]} differ from ours")
        base = module.base_layer.weight
        rows = base[module.token_ids].to(module.token_delta.dtype) + module.token_delta.detach()
        target = adapter.trainable_tokens_delta[ADAPTER_NAME]
        target.data = rows.to(target.dtype).clone()


@contextlib.contextmanager
def _requires_grad_kept(model: nn.Module) -> Iterator[None]:
    """PEFT freezes the base parameters it sees, and the bare copy shares them with ``model``."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _param_wrapper(module: nn.Module, parameter_name: str) -> Any:
    """The (possibly nested) PEFT ``ParamWrapper`` that adapts ``parameter_name`` of the module it wraps."""
    from peft.tuners.lora.layer import ParamWrapper

    while isinstance(module, ParamWrapper):
        if module.parameter_name == parameter_name:
            return module
        module = module.base_layer
    raise RuntimeError(f"PEFT did not wrap parameter {parameter_name!r}")


def _copy_pair(layer: Any, lora_A: torch.Tensor, lora_B: torch.Tensor, where: str) -> None:
    """Write one factor pair into a PEFT LoRA layer in the factors' own dtype (PEFT upcasts again on load)."""
    a_module, b_module = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]
    if a_module.weight.shape != lora_A.shape or b_module.weight.shape != lora_B.shape:
        raise RuntimeError(
            f"{where}: PEFT made lora_A {tuple(a_module.weight.shape)}, lora_B {tuple(b_module.weight.shape)} "
            f"for factors {tuple(lora_A.shape)}, {tuple(lora_B.shape)}"
        )
    a_module.to(lora_A.dtype).weight.copy_(lora_A)
    b_module.to(lora_B.dtype).weight.copy_(lora_B)


def expert_factors(lora: ExpertLoRA, projection: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per selected expert ``(A [n, R, in], B [n, out, R])`` of one fused parameter, in storage row order."""
    if projection == "down_proj":
        return lora.down_A.detach(), lora.down_B.detach()
    if not lora.has_gate:
        return lora.up_A.detach(), lora.up_B.detach()
    n, r, inter = lora.num_selected, lora.r, lora.intermediate_size
    gate_A, gate_B, up_A, up_B = (t.detach() for t in (lora.gate_A, lora.gate_B, lora.up_A, lora.up_B))
    lora_A = torch.cat([gate_A, up_A], dim=1)
    lora_B = gate_B.new_zeros(n, 2 * inter, 2 * r)
    gate_rows, up_rows = (
        (slice(0, inter), slice(inter, None)) if lora.is_concatenated else (slice(0, None, 2), slice(1, None, 2))
    )
    lora_B[:, gate_rows, :r] = gate_B
    lora_B[:, up_rows, r:] = up_B
    return lora_A, lora_B


def _copy_experts(wrapper: Any, lora: ExpertLoRA, projection: str, where: str) -> None:
    """Scatter the selected experts' factors into PEFT's all-expert ``(E*R, in)`` / ``(out, R*E)`` layout."""
    if wrapper.num_experts != lora.num_experts:
        raise RuntimeError(f"{where}: PEFT sees {wrapper.num_experts} experts, the adapter {lora.num_experts}")
    if abs(wrapper.scaling[ADAPTER_NAME] - lora.scaling) > 1e-12 * max(1.0, lora.scaling):
        raise RuntimeError(f"{where}: PEFT scaling {wrapper.scaling[ADAPTER_NAME]} differs from ours {lora.scaling}")
    sel_A, sel_B = expert_factors(lora, projection)
    num_experts, (_, rank, in_features), out_features = lora.num_experts, sel_A.shape[-3:], sel_B.shape[-2]
    full_A = sel_A.new_zeros(num_experts, rank, in_features)
    full_B = sel_B.new_zeros(out_features, rank, num_experts)
    full_A[lora.expert_ids] = sel_A
    full_B[:, :, lora.expert_ids] = sel_B.permute(1, 2, 0)
    _copy_pair(
        wrapper,
        full_A.reshape(num_experts * rank, in_features),
        full_B.reshape(out_features, rank * num_experts),
        where,
    )


def _lora_layer(module: nn.Module, where: str) -> Any:
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        raise RuntimeError(f"{where}: PEFT did not put a LoRA layer here (found {type(module).__name__})")
    return module


def _wrapped_targets(model: nn.Module) -> tuple[set[str], set[str]]:
    """What PEFT actually adapted: LoRA-wrapped module names and ``<module>.<parameter>`` of its ParamWrappers."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    modules: set[str] = set()
    parameters: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            owner = name
            while owner.endswith(".base_layer"):  # nested wrappers of one module sit under base_layer
                owner = owner[: -len(".base_layer")]
            parameters.add(f"{owner}.{module.parameter_name}")
        elif isinstance(module, LoraLayer):
            modules.add(name)
    return modules, parameters


def _check_config_kept(actual: Any, intended: Any, wrapped: tuple[set[str], set[str]]) -> None:
    """What PEFT adapted must be what we trained, whatever spelling of the targets it saves.

    PEFT shortens a long ``target_modules`` list to suffixes that match the same modules (so the list's spelling
    changes on any model with enough layers) and rewrites v4 expert names of MoE models into fused targets (which
    changes the modules). Only the second is an error, so compare the wrapped modules and parameters.
    """
    intended_sets = (set(intended.target_modules or ()), set(intended.target_parameters or ()))
    for what, got, want in zip(("target_modules", "target_parameters"), wrapped, intended_sets, strict=True):
        if got != want:
            added, dropped = sorted(got - want)[:5], sorted(want - got)[:5]
            raise UnsupportedExportError(
                f"PEFT rewrote {what} for this model: it adapts {added} besides and drops {dropped}; "
                "the adapter would not load as trained"
            )
    for attr in ("rank_pattern", "alpha_pattern"):
        if dict(getattr(actual, attr) or {}) != dict(getattr(intended, attr) or {}):
            raise UnsupportedExportError(f"PEFT rewrote {attr} for this model; the adapter would not load as trained")


def export_peft_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model``'s Sieve adapters as a PEFT LoRA adapter directory; ``model`` itself is not modified.

    ``base_model`` is recorded as ``base_model_name_or_path`` (default: the model's ``_name_or_path``).
    PEFT builds the adapter on a copy of the bare base model that shares the base weights, so the export
    costs only the adapter tensors (zero-padded to every expert) in memory.
    """
    from peft import get_peft_model

    state = lora_state(model, "PEFT")
    plan = _plan(model)
    if plan.tokens and bool(getattr(model.config, "tie_word_embeddings", False)) != is_tied(model):
        raise NotImplementedError(
            "the config's tie_word_embeddings disagrees with the model's weights (tied: "
            f"{is_tied(model)}); PEFT ties trainable token rows by the config, so they would not load as trained"
        )
    task_type = "CAUSAL_LM" if hasattr(model, "prepare_inputs_for_generation") else None
    base_model = base_model or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = _lora_config(plan, state, base_model, task_type)
    intended = copy.deepcopy(config)
    with _requires_grad_kept(model), warnings.catch_warnings():
        # Known PEFT noise: its pattern check ignores target_parameters, and it renames the base model to ''.
        warnings.filterwarnings("ignore", message=r".*(rank_pattern|alpha_pattern) keys did not match.*")
        warnings.filterwarnings("ignore", message=r".*base_model_name_or_path.*renamed.*")
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(_bare_copy(model, state), config, adapter_name=ADAPTER_NAME)
        peft_config = peft_model.peft_config[ADAPTER_NAME]
        inner = peft_model.base_model.model
        _check_config_kept(peft_config, intended, _wrapped_targets(inner))
        peft_config.base_model_name_or_path = base_model
        for attr in ("target_modules", "target_parameters"):  # PEFT keeps sets: save them in one order
            if isinstance(getattr(peft_config, attr), set):
                setattr(peft_config, attr, sorted(getattr(peft_config, attr)))
        with torch.no_grad():
            for name, linear in plan.linears.items():
                layer = _lora_layer(inner.get_submodule(name), name)
                _copy_pair(layer, linear.lora_A.weight, linear.lora_B.weight, name)
            for key, linear in plan.linear_weights.items():
                wrapper = _param_wrapper(inner.get_submodule(key.rpartition(".")[0]), "weight")
                _copy_pair(wrapper, linear.lora_A.weight, linear.lora_B.weight, key)
            for key, delta in plan.routers.items():
                wrapper = _param_wrapper(inner.get_submodule(key.rpartition(".")[0]), "weight")
                _copy_pair(wrapper, delta.lora_A.detach(), delta.lora_B.detach(), key)
            for name, lora in plan.experts.items():
                for projection in (first_projection(lora), "down_proj"):
                    wrapper = _param_wrapper(inner.get_submodule(name), projection)
                    _copy_experts(wrapper, lora, projection, f"{name}.{projection}")
            if plan.tokens:
                _copy_token_rows(inner, plan)
        with atomic_dir(path, overwrite) as tmp:
            peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
    return Path(path)
