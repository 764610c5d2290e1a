"""A saved sieve adapter written where it will be used: one registered policy per export format.

``export_adapter(adapter, format, out)`` looks the format up in a registry: ``peft`` (``PeftModel.from_pretrained``),
``vllm`` and ``sglang`` (the per-expert LoRA directory each engine loads) and ``merged`` (a plain transformers
checkpoint, ``merge_adapter``). A new format is one ``register_export_format`` call; ``moe-sieve export --format``
reads its choices and help from here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .._io import atomic_dir, ensure_writable
from ..modeling import TokenizerMissingError, load_tokenizer
from .io import load_adapted_model, merge_sieve_lora
from .methods import AdapterMethod
from .peft_export import export_peft_adapter
from .serving import SERVING_ENGINES, export_serving_adapter


class TokenizerNotSavedWarning(UserWarning):
    """A merged checkpoint was written without a tokenizer: the base model directory has no usable one."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: ``{what} written to {path}{note}``, e.g. "PEFT adapter written to out (...)"."""

    format: str
    path: Path
    what: str
    note: str = ""
    source_bytes: int | None = None  # the sieve adapter's .safetensors bytes, to compare sizes; None: a checkpoint


ExportWriter = Callable[..., ExportResult]  # (adapter, out, *, model, trust_remote_code, overwrite)


@dataclass(frozen=True)
class ExportFormat:
    """One export format: its writer, the few words ``export --format`` shows for it, and what it needs of an
    adapter method (``needs``: "lora", a LoRA on existing weights; "merge", a fold into the base weights)."""

    name: str
    write: ExportWriter
    help: str
    needs: str = "lora"


_FORMATS: dict[str, ExportFormat] = {}


def register_export_format(name: str, write: ExportWriter, *, help: str, needs: str = "lora") -> ExportFormat:
    """Make ``name`` an export format: ``write(adapter, out, *, model, trust_remote_code, overwrite)`` writes
    ``out`` atomically and returns an ``ExportResult``; ``needs`` says which adapter methods it accepts."""
    if name in _FORMATS:
        raise ValueError(f"export format {name!r} is already registered")
    if needs not in ("lora", "merge"):
        raise ValueError(f"export format {name!r}: needs must be lora or merge, got {needs!r}")
    _FORMATS[name] = ExportFormat(name, write, help, needs)
    return _FORMATS[name]


def formats_accepting(method: AdapterMethod) -> tuple[str, ...]:
    """The export formats an adapter of ``method`` has a form in (the others refuse it with its reason)."""
    can = {"lora": method.lora_export, "merge": method.merge is not None}
    return tuple(name for name, fmt in _FORMATS.items() if can[fmt.needs])


def export_formats() -> tuple[str, ...]:
    """The registered format names, in registration order."""
    return tuple(_FORMATS)


def export_formats_help() -> str:
    """``export --format``'s help: each format with its words, formats sharing them joined ("vllm or sglang")."""
    groups: list[tuple[list[str], str]] = []
    for fmt in _FORMATS.values():
        if groups and groups[-1][1] == fmt.help:
            groups[-1][0].append(fmt.name)
        else:
            groups.append(([fmt.name], fmt.help))
    parts = [
        f"{names[0] if len(names) == 1 else ', '.join(names[:-1]) + ' or ' + names[-1]} ({text})"
        for names, text in groups
    ]
    return ", ".join(parts) + "."


def export_adapter(
    adapter: str | os.PathLike,
    format: str,
    out: str | os.PathLike,
    *,
    model: str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Write the sieve adapter directory ``adapter`` to ``out`` in ``format`` (one of ``export_formats()``), on
    the base model named by ``model`` or else by the adapter. An adapter with no exact form in the format raises
    ``UnsupportedExportError`` and writes nothing."""
    if format not in _FORMATS:
        raise ValueError(f"--format {format!r}: choose one of {', '.join(_FORMATS)}")
    return _FORMATS[format].write(
        Path(adapter), Path(out), model=model, trust_remote_code=trust_remote_code, overwrite=overwrite
    )


def safetensors_bytes(path: str | os.PathLike) -> int:
    """Bytes of the ``.safetensors`` files under ``path``: the weights an export or an adapter holds."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.suffix == ".safetensors")


def merge_adapter(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> Path:
    """Fold the adapter into the base weights and write a plain transformers checkpoint with the base model's
    tokenizer to ``out`` (atomic); it loads with ``AutoModelForCausalLM.from_pretrained`` without moe-sieve.

    A base model without a usable tokenizer still gets its merged weights written, with a
    ``TokenizerNotSavedWarning`` (a degenerate tokenizer is never copied)."""
    out = Path(out)
    ensure_writable(out, overwrite, directory=True)
    with atomic_dir(out, overwrite) as tmp:
        merged, spec = load_adapted_model(adapter, model, dtype=dtype, trust_remote_code=trust_remote_code)
        merge_sieve_lora(merged).save_pretrained(tmp)
        try:
            load_tokenizer(spec).save_pretrained(tmp)
        except TokenizerMissingError as err:
            warnings.warn(
                f"{err}. The merged checkpoint in {out} has NO tokenizer: copy the base model's tokenizer there "
                "before using it.",
                TokenizerNotSavedWarning,
                stacklevel=2,
            )
    return out


def _adapted(adapter: Path, out: Path, model: str | None, trust_remote_code: bool, overwrite: bool):
    ensure_writable(out, overwrite, directory=True)  # before the model loads
    return load_adapted_model(adapter, model, trust_remote_code=trust_remote_code)


def _peft(adapter: Path, out: Path, *, model: str | None, trust_remote_code: bool, overwrite: bool) -> ExportResult:
    net, spec = _adapted(adapter, out, model, trust_remote_code, overwrite)
    export_peft_adapter(net, out, base_model=spec.model, overwrite=overwrite)
    note = f" (PeftModel.from_pretrained(base, '{out}'))"
    return ExportResult("peft", out, "PEFT adapter", note, safetensors_bytes(adapter))


def _serving(engine: str) -> ExportWriter:
    def write(adapter: Path, out: Path, *, model: str | None, trust_remote_code: bool, overwrite: bool):
        net, spec = _adapted(adapter, out, model, trust_remote_code, overwrite)
        result = export_serving_adapter(net, out, engine=engine, base_model=spec.model, overwrite=overwrite)
        note = (
            f": rank {result.rank}, {result.tensors} tensors, "
            f"{result.zero_filled_experts} unselected experts zero-filled"
        )
        return ExportResult(engine, out, f"{engine} LoRA adapter", note, safetensors_bytes(adapter))

    return write


def _merged(adapter: Path, out: Path, *, model: str | None, trust_remote_code: bool, overwrite: bool):
    merge_adapter(adapter, out, model=model, trust_remote_code=trust_remote_code, overwrite=overwrite)
    return ExportResult("merged", out, "merged checkpoint", " (loads with AutoModelForCausalLM.from_pretrained)")


register_export_format("peft", _peft, help="PeftModel.from_pretrained")
for _engine in SERVING_ENGINES:
    register_export_format(
        _engine, _serving(_engine), help="per-expert LoRA the engine loads, unselected experts zero-filled"
    )
register_export_format("merged", _merged, help="plain transformers checkpoint", needs="merge")
