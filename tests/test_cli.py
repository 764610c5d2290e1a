"""CLI round trip on a tiny saved model and a local JSONL: profile -> stats -> select -> compare."""

import json
import sys

import pytest

from moe_sieve.cli import main
from moe_sieve.selection import Selection


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["moe-sieve", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def calib(tmp_path):
    from moe_sieve.tiny import write_demo_corpus

    return write_demo_corpus(tmp_path / "calib.jsonl", n=24)


def test_profile_stats_select_compare_round_trip(monkeypatch, capsys, tmp_path, tiny_model_dir, calib):
    prof = tmp_path / "prof"
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "profile",
        "--model",
        tiny_model_dir,
        "--data",
        calib,
        "--batch-size",
        4,
        "--device",
        "cpu",
        "--out",
        prof,
    )
    assert code == 0, err
    assert (prof / "profile.safetensors").exists() and "profile written" in out

    code, out, err = run_cli(monkeypatch, capsys, "stats", prof, "--json", "--stability-trials", 5)
    assert code == 0, err
    report = json.loads(out)
    assert {"layers", "global_cv", "mean_layer_cv", "ratio"} <= report.keys()
    assert [row["layer"] for row in report["layers"]] == [0, 1, 2]
    assert {"layer", "cv", "cold_fraction", "coverage", "entropy"} <= report["layers"][0].keys()
    assert report["subsample_stability"]["trials"] == 5

    code, out, err = run_cli(monkeypatch, capsys, "stats", prof)
    assert code == 0 and "global CV" in out

    sel = tmp_path / "sel.json"
    code, out, err = run_cli(monkeypatch, capsys, "select", prof, "--k", "25%", "--out", sel)
    assert code == 0, err
    selection = Selection.load(sel)
    assert selection.per_layer_k == {0: 2, 1: 2, 2: 2}  # 25% of 8 experts
    assert selection.source["profile_fingerprint"]

    greedy = tmp_path / "greedy.json"
    code, _, err = run_cli(monkeypatch, capsys, "select", prof, "--strategy", "greedy", "--out", greedy)
    assert code == 0, err
    assert Selection.load(greedy).total_slots == selection.total_slots

    code, out, err = run_cli(monkeypatch, capsys, "compare", prof, sel, greedy, "--json")
    assert code == 0, err
    matrix = json.loads(out)["jaccard"]
    assert matrix[0][1] == pytest.approx(1.0)  # the profile's top-k is the topk selection
    assert all(matrix[i][i] == pytest.approx(1.0) for i in range(3))


def test_cli_errors_are_clear_and_nothing_is_overwritten(monkeypatch, capsys, tmp_path, tiny_model_dir, calib):
    prof = tmp_path / "prof"
    args = ["profile", "--model", tiny_model_dir, "--data", calib, "--device", "cpu", "--out", prof]
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    before = (prof / "profile.safetensors").read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (prof / "profile.safetensors").read_bytes() == before

    code, _, err = run_cli(monkeypatch, capsys, "select", prof, "--k", "0", "--out", tmp_path / "s.json")
    assert code == 2 and "k" in err and not (tmp_path / "s.json").exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"question": "no"}\n')
    code, _, err = run_cli(
        monkeypatch, capsys, "profile", "--model", tiny_model_dir, "--data", bad, "--out", tmp_path / "p2"
    )
    assert code == 2 and "bad.jsonl:2" in err and "prompt" in err

    code, _, err = run_cli(monkeypatch, capsys, "stats", tmp_path)
    assert code == 2 and "not a moe-sieve profile" in err


def _saved_random_adapter(model_dir, path):
    """Save an adapter with non-zero factors on the tiny model; return inputs and the adapted logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora, save_sieve_adapter, trainable_parameters

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    apply_sieve_lora(model, {0: [1, 2], 1: [0], 2: [7]}, SieveLoraConfig(r=4, alpha=8, seed=0))
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.normal_(0, 0.05)
        ids = torch.randint(0, 250, (1, 10))
        expected = model.eval()(input_ids=ids).logits
    save_sieve_adapter(model, path, base_model=str(model_dir))
    return ids, expected


def test_plan_attach_and_merge_commands(monkeypatch, capsys, tmp_path, tiny_model_dir):
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    fixture = Path(__file__).parent / "fixtures" / "olmoe-1b-7b.config.json"
    code, out, err = run_cli(monkeypatch, capsys, "plan", "--model", fixture, "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert (plan["full_params"], plan["sieve_params"]) == (311_459_840, 84_967_424)

    code, out, err = run_cli(monkeypatch, capsys, "attach", "--model", tiny_model_dir, "--experts", "all")
    assert code == 0, err
    assert "8/8" in out and "trainable" in out

    ids, expected = _saved_random_adapter(tiny_model_dir, tmp_path / "adapter")
    code, out, err = run_cli(monkeypatch, capsys, "merge", tmp_path / "adapter", "--out", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").exists()


def test_export_peft_command(monkeypatch, capsys, tmp_path, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids, expected = _saved_random_adapter(tiny_model_dir, tmp_path / "adapter")
    code, _, err = run_cli(monkeypatch, capsys, "export-peft", tmp_path / "adapter", "--out", tmp_path / "peft")
    assert code == 0, err
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_eval_command_writes_results(monkeypatch, capsys, tmp_path, tiny_model_dir):
    rows = [{"question": f"What is {a} + 1?", "answer": f"{a} + 1 = {a + 1}.\n#### {a + 1}"} for a in range(3)]
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", "--model", tiny_model_dir, "--data", f"gsm8k:{data}", "--max-new-tokens", 4, "--device", "cpu"]
    code, out, err = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "r.json")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["task"] == "gsm8k" and result["n"] == 3 and 0.0 <= result["accuracy"] <= 1.0
    assert [p["gold"] for p in result["predictions"]] == ["1", "2", "3"]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "r.json")
    assert code == 2 and "--overwrite" in err
