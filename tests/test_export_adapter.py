"""The library's export registry: ``export_adapter`` writes, format by format, the same files as
``moe-sieve export``; an unknown format names the choices; a registered format reaches the CLI."""

import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_sieve.adapters import (
    ExportResult,
    SieveLoraConfig,
    TokenizerNotSavedWarning,
    apply_sieve_lora,
    export_adapter,
    export_formats,
    merge_adapter,
    register_export_format,
    save_sieve_adapter,
)
from moe_sieve.adapters import export as export_module
from moe_sieve.arch import find_moe_layers

from .conftest import run_cli


def digest(root: Path) -> dict[str, str]:
    """Every file under ``root``: .safetensors by tensor names, dtypes and bytes, the rest by their bytes."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        sha = hashlib.sha256()
        if path.suffix == ".safetensors":
            for name, tensor in sorted(load_file(path).items()):
                sha.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
                sha.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            sha.update(path.read_bytes())
        out[str(path.relative_to(root))] = sha.hexdigest()
    return out


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    """Random factors on three experts per layer, no router LoRA (so every registered format can take it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = SieveLoraConfig(r=4, alpha=8, targets=("attention", "shared", "experts"))
    apply_sieve_lora(model, {layer.layer_id: [0, 3, 5] for layer in find_moe_layers(model)}, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    path = tmp_path_factory.mktemp("export-adapter") / "adapter"
    save_sieve_adapter(model, path, base_model=str(tiny_model_dir))
    return path


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning", "ignore::UserWarning")
def test_every_registered_format_writes_what_the_cli_writes(monkeypatch, capsys, tmp_path, adapter):
    assert export_formats() == ("peft", "vllm", "sglang", "merged")
    for fmt in export_formats():
        result = export_adapter(adapter, fmt, tmp_path / "lib" / fmt)
        assert isinstance(result, ExportResult) and (result.format, result.path) == (fmt, tmp_path / "lib" / fmt)
        args = ["export", adapter, "--format", fmt, "--out", tmp_path / "cli" / fmt]
        code, out, err = run_cli(monkeypatch, capsys, *args)
        assert code == 0, err
        assert f"{result.what} written" in out
        lib, cli = digest(tmp_path / "lib" / fmt), digest(tmp_path / "cli" / fmt)
        assert lib == cli and lib, fmt
        assert (result.source_bytes is None) == (fmt == "merged")


def test_an_unknown_format_is_a_value_error_naming_the_choices(tmp_path, adapter):
    with pytest.raises(ValueError, match="'onnx': choose one of peft, vllm, sglang, merged"):
        export_adapter(adapter, "onnx", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_registered_format_is_a_cli_choice(monkeypatch, capsys, tmp_path, adapter):
    def copy(adapter, out, *, model, trust_remote_code, overwrite):
        shutil.copytree(adapter, out, dirs_exist_ok=overwrite)
        return ExportResult("copy", out, "copy of the adapter")

    monkeypatch.setattr(export_module, "_FORMATS", dict(export_module._FORMATS))
    register_export_format("copy", copy, help="the sieve adapter as is")
    with pytest.raises(ValueError, match="already registered"):
        register_export_format("copy", copy, help="again")
    code, out, _ = run_cli(monkeypatch, capsys, "export", "--help")
    text = re.sub(r"[\s│]+", " ", out)  # the help panel's wrapped lines as one
    assert code == 0 and "merged (plain transformers checkpoint), copy (the sieve adapter as is)." in text
    code, out, err = run_cli(monkeypatch, capsys, "export", adapter, "--format", "copy", "--out", tmp_path / "c")
    assert code == 0 and "copy of the adapter written" in out and "size:" not in out, err
    assert digest(tmp_path / "c") == digest(adapter)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_merge_without_a_tokenizer_warns(tmp_path, tiny_model_dir, adapter):
    base = tmp_path / "no-tokenizer"
    base.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, base / name)
    with pytest.warns(TokenizerNotSavedWarning, match="NO tokenizer"):
        out = merge_adapter(adapter, tmp_path / "merged", model=str(base))
    assert (out / "config.json").exists() and not list(out.glob("tokenizer*"))
