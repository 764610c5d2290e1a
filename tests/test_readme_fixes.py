"""What was stale or wrong trying the README as a new user would (issue 19 item 7), each checked as documented."""

from __future__ import annotations

import json
import re
import sys

from moe_sieve.cli import main

from .conftest import build_tiny


def _cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["moe-sieve", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "200")
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_print_of_the_attach_table_prints_a_table(capsys):
    """``print(state.table())`` used to print ``<rich.table.Table object at ...>``."""
    from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora

    model = build_tiny("olmoe")
    state = apply_sieve_lora(model, {0: [1, 2], 1: [0], 2: [3]}, SieveLoraConfig(r=4, alpha=8))
    print(state.table())
    out = capsys.readouterr().out
    assert "<rich" not in out and "Sieve LoRA (r=4" in out
    assert all(header in out for header in ("layer", "attention", "router", "adapted experts"))
    assert f"trainable {state.trainable_params:,}" in out
    assert str(state) == str(state.table()) and "\x1b[" not in str(state)  # plain text, no colour codes


def test_print_of_the_routed_table_prints_a_table():
    from moe_sieve.adapters.routed import RoutedAdapterConfig, apply_routed_adapters

    state = apply_routed_adapters(build_tiny("olmoe"), selection=None, config=RoutedAdapterConfig(variant="S"))
    text = str(state.table())
    assert "<rich" not in text and "Routed-PEFT S" in text and f"trainable {state.trainable_params:,}" in text


def test_default_model_path_loads_with_plain_from_pretrained():
    """``from_pretrained("moe-sieve-default")`` cannot work (an alias of the CLI); the public helper gives the path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moe_sieve

    path = moe_sieve.default_model_path()
    assert "default_model_path" in moe_sieve.__all__
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "OlmoeForCausalLM"
    assert (model.config.num_hidden_layers, model.config.num_experts, model.config.num_experts_per_tok) == (4, 16, 2)
    assert len(tokenizer) == model.config.vocab_size == 2048


def test_stats_counts_tokens_as_profile_does(monkeypatch, capsys, tmp_path, tiny_model_dir):
    """``stats`` labelled tokens x top-k "tokens"; now that column is "routed (tokens x top-k)" and the counted tokens
    are the number ``profile`` prints."""
    from moe_sieve.tiny import write_demo_corpus

    data = write_demo_corpus(tmp_path / "calib.jsonl", n=12)
    prof = tmp_path / "prof"
    code, out, err = _cli(
        monkeypatch, capsys, "profile", "--model", tiny_model_dir, "--data", data, "--device", "cpu", "--out", prof
    )
    assert code == 0, err
    tokens = int(re.search(r"([\d,]+) counted tokens", out).group(1).replace(",", ""))
    meta = json.loads((prof / "profile.json").read_text())
    assert meta["tokens"] == tokens and meta["top_k"] == 2

    code, out, err = _cli(monkeypatch, capsys, "stats", prof, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["profile"]["tokens"] == tokens
    assert [row["routed"] for row in report["layers"]] == [tokens * meta["top_k"]] * 3
    assert all("tokens" not in row for row in report["layers"])

    code, out, err = _cli(monkeypatch, capsys, "stats", prof)
    assert code == 0, err
    assert "routed (tokens x top-k)" in out and f"{tokens:,} counted tokens" in out


def test_plan_of_an_uncached_hub_id_offline_names_the_config_option(monkeypatch, capsys):
    """Offline, ``plan --model HUB_ID`` printed transformers' connection error alone; now one line names the id and
    ``--model CONFIG.json``."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import; the env is for children
    model = "moe-sieve-tests/not-a-cached-model"
    for extra in ([], ["--method", "routed"], ["--ep-size", "2"]):
        code, out, err = _cli(monkeypatch, capsys, "plan", "--model", model, *extra)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("Error:"), err
        assert model in lines[0] and "--model CONFIG.json" in lines[0]


def test_plan_of_a_config_file_still_works(monkeypatch, capsys):
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "olmoe-1b-7b.config.json"
    code, out, err = _cli(monkeypatch, capsys, "plan", "--model", fixture, "--k", "25%", "--json")
    assert code == 0, err
    assert json.loads(out)["num_experts"] == 64
