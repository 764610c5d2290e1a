"""Model cards (``README.md``) for Sieve adapters: what a reader of the Hub page needs to trust and reuse one.

One renderer, :func:`render_card`, takes a plain dict (:func:`card_data` for moe-sieve's ``train`` run
directories, :func:`peft_card_data` for ``PeftModel.save_pretrained``) so both carry the same fields: base model,
selection (k, experts per layer, coverage of the profiled routing), profile data and statistics, LoRA settings,
trainable parameters against full LoRA, training data and steps, and evaluation results where present.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .._io import atomic_path, read_json_object
from .._version import __version__

CARD = "README.md"
TAGS = ("moe-sieve", "peft", "lora", "mixture-of-experts")


def _compact(ids: list[int]) -> str:
    from ..selection import compact_ids

    return compact_ids(ids) if ids else "-"


def _num(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _yaml_value(value: Any) -> str:
    return json.dumps(value)  # JSON scalars and lists are valid YAML


def render_card(data: dict[str, Any], header: dict[str, Any] | None = None, footer: list[str] | None = None) -> str:
    """The card text: YAML metadata, then one section per field group (see the module docstring)."""
    base = data.get("base_model") or {}
    meta = {
        "library_name": "peft",
        "base_model": base.get("id"),
        "pipeline_tag": "text-generation",
        **(header or {}),
    }
    meta["tags"] = sorted(set(meta.get("tags") or []) | set(TAGS))
    lines = ["---"]
    lines += [f"{key}: {_yaml_value(value)}" for key, value in meta.items() if value is not None]
    lines += ["---", ""]
    sel = data.get("selection") or {}
    lora = data.get("lora") or {}
    params = data.get("params") or {}
    lines += [
        f"# {data.get('title') or 'Sieve LoRA adapter'}",
        "",
        f"A moe-sieve adapter ({data.get('method', 'sieve')}) for "
        f"`{base.get('id')}`: LoRA on attention, routers and shared experts, and on the routed experts the "
        "routing profile selected, nowhere else.",
        "",
        "## Base model",
        "",
        f"- id: `{base.get('id')}`",
        f"- class: {base.get('class')}",
        f"- model_type: {base.get('model_type')}",
        f"- config fingerprint: {base.get('config_fingerprint')}",
        f"- MoE layers: {_num(data.get('moe_layers'))} x {_num(sel.get('num_experts'))} routed experts "
        f"(top-{_num(data.get('top_k'))})",
        "",
        "## Selection",
        "",
        f"- experts: {lora.get('experts', 'selected')}",
        f"- strategy: {sel.get('strategy') or 'n/a'}",
        f"- k: {_num(sel.get('k'))}",
        f"- adapted experts: {_num(sel.get('total'))} of {_num(sel.get('slots'))} expert-layer slots",
        f"- source: {sel.get('source') or 'n/a'}",
        f"- mean coverage of the profiled routing: {_pct(sel.get('mean_coverage'))}",
        "",
        "| layer | k | experts | coverage |",
        "|---:|---:|---|---:|",
    ]
    coverage = sel.get("coverage") or {}
    for layer, ids in (sel.get("experts") or {}).items():
        lines.append(f"| {layer} | {len(ids)} | {_compact(ids)} | {_pct(coverage.get(str(layer)))} |")
    profile = data.get("profile")
    lines += ["", "## Routing profile", ""]
    if profile:
        stats = profile.get("stats") or {}
        lines += [
            f"- data: {_data_line(profile.get('data'))}",
            f"- examples: {_num(profile.get('examples'))}",
            f"- tokens: {_num(profile.get('tokens'))}",
            f"- fingerprint: {profile.get('fingerprint') or 'n/a'}",
            f"- global CV: {_num(stats.get('global_cv'))}",
            f"- mean layer CV: {_num(stats.get('mean_layer_cv'))}",
            f"- mean top-{_num(stats.get('k'))} coverage: {_pct(stats.get('mean_coverage'))}",
            f"- mean cold fraction: {_pct(stats.get('mean_cold_fraction'))}",
            f"- mean routing entropy: {_num(stats.get('mean_entropy'))}",
        ]
    else:
        lines.append("- not recorded with this adapter (the selection was given directly)")
    lines += [
        "",
        "## LoRA",
        "",
        f"- r: {_num(lora.get('r'))}",
        f"- alpha: {_num(lora.get('alpha'))}",
        f"- dropout: {_num(lora.get('dropout'))}",
        f"- targets: {', '.join(lora.get('targets') or [])}",
        f"- router: {lora.get('router')}",
        f"- seed: {_num(lora.get('seed'))}",
        "",
        "## Trainable parameters",
        "",
        f"- this adapter: {_num(params.get('trainable'))}",
        f"- full LoRA (every routed expert): {_num(params.get('full_lora'))}",
        f"- reduction vs full LoRA: {_pct(params.get('reduction'))}",
    ]
    for group, count in (params.get("by_group") or {}).items():
        lines.append(f"- {group}: {_num(count)}")
    training = data.get("training") or {}
    lines += ["", "## Training", ""]
    lines += [f"- {key.replace('_', ' ')}: {_num(value)}" for key, value in training.items()] or ["- not recorded"]
    lines += ["", "## Evaluation", ""]
    results = data.get("eval") or []
    if results:
        lines += ["| task | metric | value | examples |", "|---|---|---:|---:|"]
        for row in results:
            lines.append(
                f"| {row.get('task')} | {row.get('metric')} | {_num(row.get('value'))} | {_num(row.get('n'))} |"
            )
    else:
        lines.append("- no evaluation results recorded")
    lines += ["", "## Usage", "", "```python", *data.get("usage", []), "```", ""]
    lines += ["### Framework versions", "", f"- moe-sieve {__version__}", *(footer or [])]
    return "\n".join(lines) + "\n"


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f}%"


def _data_line(data: Any) -> str:
    if isinstance(data, dict):
        parts = [f"{key}={data[key]}" for key in ("data", "split", "subsample", "max_length") if data.get(key)]
        return ", ".join(parts) or "n/a"
    return str(data) if data else "n/a"


def _selection_section(experts: dict, info: dict, num_experts: int | None) -> dict[str, Any]:
    params = info.get("params") or {}
    experts = {str(layer): list(ids) for layer, ids in experts.items()}
    coverage = info.get("coverage") or {}
    total = sum(len(ids) for ids in experts.values())
    sizes = {len(ids) for ids in experts.values()}
    return {
        "strategy": info.get("strategy"),
        "k": params.get("k_resolved", next(iter(sizes)) if len(sizes) == 1 else params.get("k")),
        "experts": experts,
        "coverage": coverage,
        "mean_coverage": sum(coverage.values()) / len(coverage) if coverage else None,
        "num_experts": num_experts or info.get("num_experts"),
        "total": total,
        "slots": None if not num_experts else num_experts * len(experts),
        "source": info.get("source"),
    }


def profile_summary(profile: Any, experts: dict[str, list[int]]) -> tuple[dict[str, Any], dict[str, float]]:
    """What the card says about a routing profile (data, size, statistics at the selection's k) and the share of
    each layer's profiled routing that the selected experts receive."""
    from ..profiling import Profile
    from ..routing_stats import routing_stats
    from ..selection import Selection, selection_coverage

    prof = profile if isinstance(profile, Profile) else Profile.load(os.fspath(profile))
    sizes = [len(ids) for ids in experts.values()]
    k = max(1, round(sum(sizes) / len(sizes))) if sizes else "25%"
    stats = routing_stats(prof.counts_LE, prof.mass_LE, prof.layer_ids, k=k).to_json()
    summary = {
        "path": None if isinstance(profile, Profile) else os.fspath(profile),
        "fingerprint": prof.fingerprint,
        "data": prof.metadata.get("data"),
        "examples": prof.num_examples,
        "tokens": prof.tokens,
        "stats": {key: value for key, value in stats.items() if key != "layers"},
    }
    coverage: dict[str, float] = {}
    if experts and sorted(int(layer) for layer in experts) == sorted(prof.layer_ids):
        chosen = Selection(experts=dict(experts), num_experts=prof.num_experts, strategy="given")
        cov = selection_coverage(chosen, prof.counts_LE, prof.layer_ids)
        coverage = {str(layer): round(value, 6) for layer, value in cov.items()}
    return summary, coverage


def _usage_peft(base: str | None, repo: str) -> list[str]:
    return [
        "import moe_sieve  # registers the moe-sieve PEFT method",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({base!r})",
        f"model = PeftModel.from_pretrained(base, {repo!r})",
        "merged = model.merge_and_unload()  # a plain transformers model",
    ]


def peft_card_data(config: Any, context: dict[str, Any]) -> dict[str, Any]:
    """Card fields of a moe-sieve PEFT adapter (``SieveConfig`` plus what its tuner recorded)."""
    state = context.get("state")
    base = context.get("base_model") or {}
    info = dict(config.selection_info or {})
    num_experts = state.shape.num_experts if state is not None else None
    experts = state.experts if state is not None and "experts" in state.config.targets else {}
    selection = _selection_section(experts, info, num_experts)
    trainable = state.trainable_params if state is not None else None
    full = context.get("full_lora_params")
    return {
        "title": "Sieve LoRA adapter",
        "method": "Sieve LoRA, PEFT method MOE_SIEVE",
        "base_model": base,
        "moe_layers": context.get("moe_layers"),
        "top_k": state.shape.top_k if state is not None else None,
        "selection": selection,
        "profile": info.get("profile"),
        "lora": state.config.to_json() if state is not None else {},
        "params": {
            "trainable": trainable,
            "full_lora": full,
            "reduction": None if not (trainable and full) else 1.0 - trainable / full,
            "by_group": state.params_by_group() if state is not None else {},
        },
        "training": {k: v for k, v in (context.get("training") or {}).items() if v is not None},
        "eval": context.get("eval"),
        "usage": _usage_peft(base.get("id"), "<this repo or directory>"),
    }


def _read_header(path: Path) -> dict[str, Any]:
    """The YAML metadata PEFT wrote to an existing card (tags, base_model, ...), to keep when rewriting it."""
    if not path.exists():
        return {}
    try:
        from huggingface_hub import ModelCard

        return {k: v for k, v in ModelCard.load(path).data.to_dict().items() if v is not None}
    except Exception:  # noqa: BLE001 - an unreadable card is replaced
        return {}


def write_peft_card(directory: str | os.PathLike, config: Any, context: dict[str, Any]) -> Path:
    """``README.md`` of a saved moe-sieve PEFT adapter, keeping the metadata PEFT put in it."""
    import peft

    path = Path(directory) / CARD
    header = {key: value for key, value in _read_header(path).items() if value}
    card = render_card(peft_card_data(config, context), header, [f"- PEFT {peft.__version__}"])
    with atomic_path(path) as tmp:
        Path(tmp).write_text(card, encoding="utf-8")
    return path


def eval_rows(record: Any) -> list[dict[str, Any]]:
    if not isinstance(record, dict) or "accuracy" not in record:
        return []
    rows = [{"task": record.get("task"), "metric": "accuracy", "value": record["accuracy"], "n": record.get("n")}]
    if record.get("accuracy_norm") is not None:
        rows.append(
            {
                "task": record.get("task"),
                "metric": "accuracy_norm",
                "value": record["accuracy_norm"],
                "n": record.get("n"),
            }
        )
    return rows


def card_data(run_dir: str | os.PathLike, adapter: str = "adapter") -> dict[str, Any]:
    """Card fields of a ``moe-sieve train`` run directory: its adapter, selection, profile, settings, metrics and
    (when present) ``eval.json``."""
    run_dir = Path(run_dir)
    adapter_config = read_json_object(run_dir / adapter / "adapter_config.json") or {}
    record = (read_json_object(run_dir / "config.json") or {}).get("train") or {}
    metrics = read_json_object(run_dir / "metrics.json") or {}
    shape = adapter_config.get("shape") or {}
    lora = adapter_config.get("lora") or {}
    info: dict[str, Any] = {}
    selection = read_json_object(run_dir / "selection.json")
    if isinstance(selection, dict):
        info.update(strategy=selection.get("strategy"), params=selection.get("params"), source="selection.json")
    profile_dir = run_dir / "profile"
    if not profile_dir.is_dir() and record.get("profile"):
        profile_dir = Path(record["profile"])
    profile = None
    if profile_dir.is_dir() and adapter_config.get("experts"):
        profile, coverage = profile_summary(profile_dir, adapter_config["experts"])
        info["coverage"] = coverage
    experts = adapter_config.get("experts", {}) if "experts" in (lora.get("targets") or []) else {}
    trainable = adapter_config.get("trainable_params")
    full = _full_lora_params(record, adapter_config)
    training = {
        "data": record.get("data"),
        "split": record.get("split"),
        "examples": (metrics.get("data") or {}).get("kept") if isinstance(metrics.get("data"), dict) else None,
        "optimizer_steps": metrics.get("steps"),
        "epochs": metrics.get("epochs"),
        "tokens": metrics.get("tokens_seen"),
        "learning_rate": record.get("learning_rate"),
        "batch_size": record.get("batch_size"),
        "max_length": record.get("max_length"),
        "router_aux_loss": record.get("router_aux_loss"),
        "first_loss": metrics.get("first_loss"),
        "final_loss": metrics.get("final_loss"),
    }
    base = dict(adapter_config.get("base_model") or {})
    return {
        "title": f"Sieve LoRA adapter: {record.get('data') or 'fine-tuned'}",
        "method": lora.get("method") or "Sieve LoRA",
        "base_model": base,
        "moe_layers": len(shape.get("layer_ids") or []),
        "top_k": shape.get("top_k"),
        "selection": _selection_section(experts, info, shape.get("num_experts")),
        "profile": profile,
        "lora": lora,
        "params": {
            "trainable": trainable,
            "full_lora": full,
            "reduction": None if not (trainable and full) else 1.0 - trainable / full,
            "by_group": adapter_config.get("params_by_group") or {},
        },
        "training": {k: v for k, v in training.items() if v is not None},
        "eval": eval_rows(read_json_object(run_dir / "eval.json")),
        "usage": [
            "from moe_sieve.adapters import load_sieve_adapter",
            "from moe_sieve.modeling import ModelSpec, load_model",
            "",
            f"model = load_model(ModelSpec({base.get('id')!r}))",
            "load_sieve_adapter(model, 'adapter')  # or: moe-sieve export --format peft, for stock PEFT",
        ],
    }


def _full_lora_params(record: dict[str, Any], adapter_config: dict[str, Any]) -> int | None:
    """Full LoRA's trainable parameters for the same base and LoRA settings (a meta-device plan, no weights)."""
    lora = adapter_config.get("lora") or {}
    if lora.get("method") or not record.get("model"):  # sieve's lora JSON names no method; others have no full LoRA
        return None
    try:
        from .sieve.config import SieveLoraConfig
        from .sieve.plan import plan_adapters

        plan = plan_adapters(record["model"], k=1, lora=SieveLoraConfig.from_json(lora))
    except Exception:  # noqa: BLE001 - the card says n/a rather than failing a finished run
        return None
    return plan["full_params"]


def write_run_card(run_dir: str | os.PathLike, adapter: str = "adapter") -> Path:
    """Write ``RUN/adapter/README.md`` from the run's artifacts (call again after ``eval.json`` appears)."""
    path = Path(run_dir) / adapter / CARD
    card = render_card(card_data(run_dir, adapter))
    with atomic_path(path) as tmp:
        Path(tmp).write_text(card, encoding="utf-8")
    return path


def push_adapter_to_hub(
    model: Any,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    commit_message: str = "Upload moe-sieve adapter",
    revision: str | None = None,
) -> Any:
    """Upload what ``model.save_pretrained`` writes (adapter, config and this model card) to a Hub repo.

    ``PeftModel.push_to_hub`` uploads the same adapter files, but transformers' push replaces ``README.md`` with
    the repository's existing card or its own template; this keeps moe-sieve's card. Returns the commit info.
    """
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi()
    repo = api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return api.upload_folder(
            repo_id=repo, folder_path=tmp, token=token, commit_message=commit_message, revision=revision
        )
