"""Commands over adapters: ``plan``, ``attach``, ``merge``, ``export`` and ``export-peft``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import DEFAULT_MODEL, JsonOpt, KOpt, ModelOpt, console, err_console, fail


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def plan(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Hub id, model directory, or a config.json file.")
    ] = DEFAULT_MODEL,
    k: KOpt = "25%",
    r: Annotated[int, typer.Option(help="LoRA rank.")] = 32,
    alpha: Annotated[float, typer.Option(help="LoRA alpha.")] = 64.0,
    as_json: JsonOpt = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the repository's own config code.")] = False,
    method: Annotated[str, typer.Option(help="sieve, or routed (Routed-PEFT adapters).")] = "sieve",
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
    from ..adapters import SieveLoraConfig, plan_adapters

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

    if method == "routed":
        from ..adapters.routed import RoutedAdapterConfig, plan_routed

        routed = RoutedAdapterConfig(
            variant=variant,
            adapter_type=adapter_type,
            r=r,
            alpha=alpha,
            num_adapters=num_adapters,
            top_k=top_k_adapters,
            experts=experts,
        )
        result = plan_routed(model, routed, k=k, trust_remote_code=trust_remote_code)
        if as_json:
            print(json.dumps(result, indent=2))
        else:
            console.print(
                f"Routed-PEFT {variant}: {result['trainable_params']:,} trainable params = "
                f"{result['trainable_pct_of_total']:.3f}% of {result['base_params']:,} total, "
                f"{result['trainable_pct_of_activated']:.3f}% of {result['activated_params']:,} activated"
            )
        return
    if method != "sieve":
        fail(f"--method must be sieve or routed, got {method!r}")
    result = plan_adapters(model, k=k, lora=SieveLoraConfig(r=r, alpha=alpha), trust_remote_code=trust_remote_code)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"{result['model']}: LoRA r={r}, alpha={alpha:g}, hot {result['k']}/{result['num_experts']}")
    for column in ("", "trainable params", "fp32 checkpoint", "AdamW state"):
        table.add_column(column, justify="right")
    for name, key in (("full LoRA", "full"), (f"sieve hot-{result['k']}", "sieve")):
        table.add_row(
            name,
            f"{result[f'{key}_params'] / 1e6:,.1f}M",
            _gb(result[f"{key}_bytes"]),
            _gb(result[f"{key}_optimizer_bytes"]),
        )
    console.print(table)
    console.print(f"reduction [bold]{100 * result['reduction']:.1f}%[/] of LoRA trainable parameters")


def attach(
    model: ModelOpt = DEFAULT_MODEL,
    selection: Annotated[
        Path | None, typer.Option("--selection", "-s", help="Selection JSON (needed for --experts selected).")
    ] = None,
    experts: Annotated[str, typer.Option(help="selected (MoE-Sieve), all (full LoRA) or none.")] = "selected",
    r: Annotated[int, typer.Option(help="LoRA rank.")] = 32,
    alpha: Annotated[float, typer.Option(help="LoRA alpha.")] = 64.0,
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


def _load_adapted(adapter: Path, model: str | None, trust_remote_code: bool, dtype: str = "auto"):
    """The base model named by ``--model`` or by the adapter, on CPU, with the adapter loaded."""
    from ..adapters import load_sieve_adapter, read_adapter_config
    from ..modeling import ModelSpec, load_model

    base = model or read_adapter_config(adapter)["base_model"]["id"]
    if not base:
        fail(f"{adapter}: the adapter names no base model; pass --model")
    spec = ModelSpec(model=base, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    net = load_model(spec)
    load_sieve_adapter(net, adapter)
    return net, spec


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
    from .._io import atomic_dir, ensure_writable
    from ..adapters import merge_sieve_lora
    from ..modeling import TokenizerMissingError, load_tokenizer

    ensure_writable(out, overwrite, directory=True)
    with atomic_dir(out, overwrite) as tmp:
        merged, spec = _load_adapted(adapter, model, trust_remote_code, dtype)
        merge_sieve_lora(merged).save_pretrained(tmp)
        try:
            load_tokenizer(spec).save_pretrained(tmp)
        except TokenizerMissingError as err:
            # The merged weights are still the result asked for; a degenerate tokenizer is never copied.
            err_console.print(
                f"[bold yellow]Warning:[/] {err}. The merged checkpoint in {out} has NO tokenizer: copy the "
                "base model's tokenizer there before using it.",
                markup=True,
            )
    console.print(f"[green]merged checkpoint written[/] to {out} (loads with AutoModelForCausalLM.from_pretrained)")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.suffix == ".safetensors")


def _size(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def export_command(
    adapter: Annotated[Path, typer.Argument(help="moe-sieve adapter directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write.")],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="peft (PeftModel.from_pretrained), vllm or sglang (per-expert LoRA the engine loads, "
            "unselected experts zero-filled), merged (plain transformers checkpoint).",
        ),
    ] = "peft",
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Base model (default: the one named in the adapter).")
    ] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Run the repository's own model code.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Write the adapter where it will be used: PEFT, vLLM, SGLang or a merged checkpoint."""
    from .._io import ensure_writable
    from ..adapters import export_peft_adapter
    from ..adapters.io import UnsupportedExportError
    from ..adapters.serving import SERVING_ENGINES, export_serving_adapter

    formats = ("peft", *SERVING_ENGINES, "merged")
    if format not in formats:
        fail(f"--format {format!r}: choose one of {', '.join(formats)}")
    if format == "merged":
        merge(adapter, out, model=model, dtype="auto", trust_remote_code=trust_remote_code, overwrite=overwrite)
        return
    ensure_writable(out, overwrite, directory=True)
    net, spec = _load_adapted(adapter, model, trust_remote_code)
    sieve_bytes = _dir_bytes(adapter)
    try:
        if format == "peft":
            export_peft_adapter(net, out, base_model=spec.model, overwrite=overwrite)
        else:
            result = export_serving_adapter(net, out, engine=format, base_model=spec.model, overwrite=overwrite)
    except UnsupportedExportError as err:
        fail(f"{adapter}: --format {format}: {err}")
    if format == "peft":
        console.print(f"[green]PEFT adapter written[/] to {out} (PeftModel.from_pretrained(base, '{out}'))")
    else:
        console.print(
            f"[green]{format} LoRA adapter written[/] to {out}: rank {result.rank}, {result.tensors} tensors, "
            f"{result.zero_filled_experts} unselected experts zero-filled"
        )
    console.print(
        f"size: {_size(_dir_bytes(out))} exported vs {_size(sieve_bytes)} for the sieve adapter "
        f"({_dir_bytes(out) / max(sieve_bytes, 1):.1f}x)"
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
