"""Commands over adapters: ``plan``, ``attach``, ``merge``, ``export`` and ``export-peft``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..adapters.config import LORA
from ..adapters.export import export_formats_help
from ..adapters.methods import method_help
from .common import DEFAULT_MODEL, JsonOpt, KOpt, ModelOpt, console, fail


def plan(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Hub id, model directory, or a config.json file.")
    ] = DEFAULT_MODEL,
    k: KOpt = "25%",
    r: Annotated[int, typer.Option(help="LoRA rank.")] = LORA.r,
    alpha: Annotated[float, typer.Option(help="LoRA alpha.")] = LORA.alpha,
    as_json: JsonOpt = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the repository's own config code.")] = False,
    method: Annotated[str, typer.Option(help=f"Adapter method: {method_help()}.")] = "sieve",
    variant: Annotated[str, typer.Option(help="routed: S, D, R or E.")] = "E",
    adapter_type: Annotated[str, typer.Option(help="routed: lora or parallel.")] = "lora",
    num_adapters: Annotated[int, typer.Option(help="routed: N adapters per layer (D, R).")] = 4,
    top_k_adapters: Annotated[int, typer.Option("--top-k-adapters", "--top-k", help="routed: K of N (R).")] = 2,
    experts: Annotated[str, typer.Option(help="routed E: all experts, or the hot --k selected.")] = "all",
    ep_size: Annotated[int, typer.Option(help="Per-rank plan under transformers' expert parallelism (0: off).")] = 0,
    fsdp_size: Annotated[int, typer.Option(help="EP plan: FSDP ranks (world size; default --ep-size).")] = 0,
    profile: Annotated[Path | None, typer.Option(help="EP plan: a profile, to measure the hot set's spread.")] = None,
    micro_batch: Annotated[int, typer.Option(help="EP plan: sequences per rank per step.")] = 1,
    seq_len: Annotated[int, typer.Option(help="EP plan: tokens per sequence.")] = 4096,
) -> None:
    """Trainable parameters, checkpoint size and optimizer memory of full LoRA vs the hot-k budget,
    computed on the meta device (no weights are loaded, no profile is needed). With --ep-size: per rank
    under transformers' expert-parallel engine (docs/distributed.md)."""
    from ..adapters import SieveLoraConfig, get_adapter_method

    if ep_size:
        from ..adapters.ep import ep_plan_table, plan_ep
        from ..profiling.artifact import Profile

        result = plan_ep(
            model, k, ep_size, fsdp_size or None, SieveLoraConfig(r=r, alpha=alpha), micro_batch=micro_batch,
            seq_len=seq_len, profile=Profile.load(profile) if profile else None, trust_remote_code=trust_remote_code,
        )  # fmt: skip
        if as_json:
            print(json.dumps(result, indent=2))
            return
        table, lines = ep_plan_table(result)
        console.print(table)
        for line in lines:
            console.print(line, markup=False, highlight=False)
        return

    try:
        adapter_method = get_adapter_method(method)
    except ValueError as err:
        fail(str(err))
    options = {
        "r": r,
        "alpha": alpha,
        "variant": variant,
        "adapter_type": adapter_type,
        "num_adapters": num_adapters,
        "top_k_adapters": top_k_adapters,
        "experts": experts,
    }
    result = adapter_method.plan(model, k, options, trust_remote_code=trust_remote_code)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for renderable in adapter_method.plan_table(result, options):
        console.print(renderable)


def attach(
    model: ModelOpt = DEFAULT_MODEL,
    selection: Annotated[
        Path | None, typer.Option("--selection", "-s", help="Selection JSON (needed for --experts selected).")
    ] = None,
    experts: Annotated[str, typer.Option(help="selected (MoE-Sieve), all (full LoRA) or none.")] = "selected",
    r: Annotated[int, typer.Option(help="LoRA rank.")] = LORA.r,
    alpha: Annotated[float, typer.Option(help="LoRA alpha.")] = LORA.alpha,
    targets: Annotated[
        str, typer.Option(help="Comma-separated module groups: attention,router,shared,experts.")
    ] = "attention,router,shared,experts",
    trust_remote_code: Annotated[bool, typer.Option(help="Run the repository's own model code.")] = False,
) -> None:
    """Dry run: load the model on CPU, attach the adapters, verify every selected expert got one and
    print the trainable parameters per layer and module group."""
    from ..adapters import SieveLoraConfig, apply_sieve_lora
    from ..modeling import ModelSpec, load_model

    net = load_model(ModelSpec(model=model, device="cpu", trust_remote_code=trust_remote_code))
    config = SieveLoraConfig(r=r, alpha=alpha, experts=experts, targets=tuple(t for t in targets.split(",") if t))
    state = apply_sieve_lora(net, selection, config)
    console.print(state.table())


def merge(
    adapter: Annotated[Path, typer.Argument(help="Adapter directory (adapter.safetensors + adapter_config.json).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the merged checkpoint.")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Base model (default: the one named in the adapter).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="Load/save dtype (auto: the checkpoint's own on CPU is fp32).")] = "auto",
    trust_remote_code: Annotated[bool, typer.Option(help="Run the repository's own model code.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Fold the adapter into the base weights and write a plain transformers checkpoint."""
    from ..adapters import merge_adapter

    merge_adapter(adapter, out, model=model, dtype=dtype, trust_remote_code=trust_remote_code, overwrite=overwrite)
    console.print(f"[green]merged checkpoint written[/] to {out} (loads with AutoModelForCausalLM.from_pretrained)")


def _size(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def export_command(
    adapter: Annotated[Path, typer.Argument(help="moe-sieve adapter directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write.")],
    format: Annotated[str, typer.Option("--format", "-f", help=export_formats_help())] = "peft",
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Base model (default: the one named in the adapter).")
    ] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Run the repository's own model code.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Write the adapter where it will be used: PEFT, vLLM, SGLang or a merged checkpoint."""
    from ..adapters import export_adapter
    from ..adapters.export import safetensors_bytes
    from ..adapters.io import UnsupportedExportError

    try:
        result = export_adapter(
            adapter, format, out, model=model, trust_remote_code=trust_remote_code, overwrite=overwrite
        )
    except UnsupportedExportError as err:
        fail(f"{adapter}: --format {format}: {err}")
    console.print(f"[green]{result.what} written[/] to {out}{result.note}")
    if result.source_bytes is not None:
        exported = safetensors_bytes(out)
        console.print(
            f"size: {_size(exported)} exported vs {_size(result.source_bytes)} for the sieve adapter "
            f"({exported / max(result.source_bytes, 1):.1f}x)"
        )


def export_peft(
    adapter: Annotated[Path, typer.Argument(help="moe-sieve adapter directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the PEFT adapter.")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Base model (default: the one named in the adapter).")
    ] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Run the repository's own model code.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Alias of `export --format peft`."""
    export_command(adapter, out, "peft", model, trust_remote_code, overwrite)
