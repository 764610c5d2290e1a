"""CLI round trip on a tiny saved model and a local JSONL: profile -> stats -> select -> compare."""

import json
import re

import pytest

from moe_sieve.selection import Selection

from .conftest import run_cli


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


# --- one top-level error handler: every expected failure is one `Error:` line (issue 8, findings 6, 7, 10) ----


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_model_dir):
    """Broken files of every kind, built once: truncated safetensors, JSON with missing keys, NaN weights..."""
    import shutil

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora, save_sieve_adapter
    from moe_sieve.profiling import Profile

    root = tmp_path_factory.mktemp("bad")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    apply_sieve_lora(model, {0: [0, 1], 1: [2], 2: [3]}, SieveLoraConfig(r=2, alpha=4))
    save_sieve_adapter(model, root / "adapter", base_model=str(tiny_model_dir))
    for name in ("truncated-adapter", "keyless-adapter", "nan-adapter"):
        shutil.copytree(root / "adapter", root / name)
    weights = root / "truncated-adapter" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config_path = root / "keyless-adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["shape"]
    config_path.write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    tensors = load_file(root / "nan-adapter" / "adapter.safetensors")
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, root / "nan-adapter" / "adapter.safetensors")

    shutil.copytree(tiny_model_dir, root / "truncated-model")
    weights = root / "truncated-model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (root / "no-tokenizer").mkdir()
    for file in tiny_model_dir.iterdir():
        if file.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(file, root / "no-tokenizer" / file.name)
    nan_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        nan_model.model.embed_tokens.weight.fill_(float("nan"))
    nan_model.save_pretrained(root / "nan-model")
    shutil.copy(tiny_model_dir / "tokenizer.json", root / "nan-model")
    shutil.copy(tiny_model_dir / "tokenizer_config.json", root / "nan-model")

    Profile(
        np.ones((3, 8), np.int64), np.ones((3, 8), np.float32), np.ones((1, 3, 8), np.int32),
        np.ones((1, 3, 8), np.float32), np.ones(1, np.int64), [0, 1, 2], 8, 2, {"model": {"id": "x"}},
    ).save(root / "keyless-profile")  # fmt: skip
    meta = json.loads((root / "keyless-profile" / "profile.json").read_text())
    del meta["num_experts"]
    (root / "keyless-profile" / "profile.json").write_text(json.dumps(meta))
    good = Selection({0: [1], 1: [2], 2: [3]}, num_experts=8, strategy="topk").to_json()
    (root / "good-selection.json").write_text(json.dumps(good))
    (root / "keyless-selection.json").write_text(json.dumps({k: v for k, v in good.items() if k != "layers"}))
    (root / "fraction-selection.json").write_text(json.dumps({**good, "layers": {"0": [1.7], "1": [2], "2": [3]}}))
    (root / "rows.jsonl").write_text('{"text": "a b c d e f"}\n' * 8)
    (root / "nonutf8.jsonl").write_bytes(
        b'{"question": "1+1?", "answer": "#### 2"}\n{"question": "\xff\xfe", "answer": "x"}\n'
    )
    (root / "broken.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n\n{"question": "2+2?", "answer": \n')
    (root / "a-file").write_text("not a directory")
    (root / "demo-out").mkdir()
    (root / "demo-out" / "something").write_text("earlier results")
    _round3_inputs(root, tiny_model_dir)
    return root


def _round3_inputs(root, tiny_model_dir):
    """Inputs of the last tracebacks and silent acceptances of the round-3 audit (issue 18)."""
    import shutil

    from transformers import AutoModelForCausalLM

    from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora, save_sieve_adapter
    from moe_sieve.adapters.routed import RoutedAdapterConfig, apply_routed_adapters

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    apply_routed_adapters(model, {0: [0, 1], 1: [2], 2: [3]}, RoutedAdapterConfig(variant="E", r=2))
    save_sieve_adapter(model, root / "routed-adapter", base_model=str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    apply_sieve_lora(model, {0: [0], 1: [2], 2: [3]}, SieveLoraConfig(r=2, alpha=4, router="full"))
    save_sieve_adapter(model, root / "router-full-adapter", base_model=str(tiny_model_dir))
    shutil.copytree(root / "keyless-profile", root / "list-profile")
    (root / "list-profile" / "profile.json").write_text("[1, 2]\n")
    (root / "many.yaml").write_text(f"batch_size: many\ndata: {root / 'rows.jsonl'}\nout: {root / 'never'}\n")
    (root / "llm-adapters").mkdir()
    (root / "llm-adapters" / "test.json").write_text('[{"instruction": "Is it?", "answer": "true"}, {"instr')
    (root / "llm-adapters" / "empty.json").write_text("[]\n")
    (root / "scripted").mkdir()
    (root / "scripted" / "scripted.py").write_text("import datasets\n")
    for name, train in (("k-abc", {"k": "abc"}), ("lr-fast", {"learning_rate": "fast"})):
        sweep = {
            "name": name, "models": [str(tiny_model_dir)], "seeds": [0],
            "tasks": [{"name": "t", "data": str(root / "rows.jsonl"), "eval": {"data": "gsm8k"}}],
            "conditions": [{"name": "c", "train": {"max_steps": 1, **train}}],
        }  # fmt: skip
        (root / f"sweep-{name}.yaml").write_text(json.dumps(sweep))
    header = "model,task,condition,seed,accuracy\n"
    for name, content in (
        ("empty", b""),
        ("binary", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
        ("ragged", (header + "m,t,full,0,0.5\nm,t,full,1\n").encode()),
        ("latin1", (header + "m,t,caf\xe9,0,0.5\n").encode("latin-1")),
    ):
        (root / f"study-{name}").mkdir()
        (root / f"study-{name}" / "results.csv").write_bytes(content)


ERROR_CASES = {
    "nonexistent model path": (
        ["profile", "--model", "/nonexistent/model", "--data", "{rows}", "--out", "{tmp}/p"],
        "/nonexistent/model",
    ),
    "truncated adapter safetensors": (
        ["merge", "{bad}/truncated-adapter", "--out", "{tmp}/m"],
        "truncated-adapter/adapter.safetensors",
    ),
    "truncated model safetensors": (
        ["attach", "--model", "{bad}/truncated-model", "--selection", "{bad}/good-selection.json"],
        "truncated-model",
    ),
    "adapter config missing keys": (
        ["merge", "{bad}/keyless-adapter", "--out", "{tmp}/m"],
        "keyless-adapter/adapter_config.json: missing keys",
    ),
    "selection missing keys": (
        ["compare", "{bad}/keyless-selection.json", "{bad}/good-selection.json"],
        "keyless-selection.json",
    ),
    "profile missing keys": (["stats", "{bad}/keyless-profile"], "keyless-profile/profile.json: missing keys"),
    "device tpu7": (
        ["profile", "--model", "{model}", "--data", "{rows}", "--device", "tpu7", "--out", "{tmp}/p"],
        "--device 'tpu7'",
    ),
    "NaN loss stop": (
        [
            "train",
            "--model",
            "{bad}/nan-model",
            "--data",
            "{rows}",
            "--out",
            "{tmp}/t",
            "--strategy",
            "full",
            "--device",
            "cpu",
            "--max-steps",
            "2",
            "--batch-size",
            "8",
        ],
        "training loss became nan at step 1",
    ),
    "demo with an existing out": (["demo", "--out", "{bad}/demo-out"], "demo-out already holds results"),
    "train out is a file": (["train", "--data", "{rows}", "--out", "{bad}/a-file"], "a-file is a file"),
    "profile out is a file": (
        ["profile", "--model", "{model}", "--data", "{rows}", "--out", "{bad}/a-file"],
        "a-file is a file",
    ),
    "merge out is a file": (["merge", "{bad}/adapter", "--out", "{bad}/a-file", "--overwrite"], "a-file is a file"),
    "out under a file": (
        ["profile", "--model", "{model}", "--data", "{rows}", "--out", "{bad}/a-file/p"],
        "a-file is not a directory",
    ),
    "model without a tokenizer": (
        ["profile", "--model", "{bad}/no-tokenizer", "--data", "{rows}", "--out", "{tmp}/p", "--device", "cpu"],
        "no-tokenizer: no tokenizer files",
    ),
    "alpha nan": (
        ["train", "--data", "{rows}", "--out", "{tmp}/t", "--alpha", "nan"],
        "--alpha must be a finite number",
    ),
    "compare rank-by bogus": (
        ["compare", "{bad}/good-selection.json", "{bad}/good-selection.json", "--rank-by", "bogus"],
        "--rank-by must be count or mass",
    ),
    "expert id 1.7": (
        ["compare", "{bad}/fraction-selection.json", "{bad}/good-selection.json"],
        "fraction-selection.json: invalid selection",
    ),
    "NaN adapter merge": (["merge", "{bad}/nan-adapter", "--out", "{tmp}/m"], "non-finite"),
    "non-UTF-8 TASK:PATH": (
        ["profile", "--model", "{model}", "--data", "gsm8k:{bad}/nonutf8.jsonl", "--out", "{tmp}/p"],
        "nonutf8.jsonl:2: not UTF-8",
    ),
    "broken JSON line in TASK:PATH": (
        ["profile", "--model", "{model}", "--data", "gsm8k:{bad}/broken.jsonl", "--out", "{tmp}/p"],
        "broken.jsonl:3: invalid JSON",
    ),
    # round 3 (issue 18), item 4: the last tracebacks
    "export peft of a routed adapter": (
        ["export", "{bad}/routed-adapter", "--out", "{tmp}/x"],
        "routed-adapter: --format peft: a Routed-PEFT adapter",
    ),
    "export vllm of a routed adapter": (
        ["export", "{bad}/routed-adapter", "--out", "{tmp}/x", "--format", "vllm"],
        "routed-adapter: --format vllm: a Routed-PEFT adapter",
    ),
    "export peft of a router-full adapter": (
        ["export", "{bad}/router-full-adapter", "--out", "{tmp}/x"],
        "router-full-adapter: --format peft: the routers were fully fine-tuned (--router full)",
    ),
    "export vllm of a router-full adapter": (  # it used to drop the trained routers silently
        ["export", "{bad}/router-full-adapter", "--out", "{tmp}/x", "--format", "vllm"],
        "--format vllm: the routers were fully fine-tuned (--router full)",
    ),
    "stats on a JSON-list profile.json": (["stats", "{bad}/list-profile"], "list-profile/profile.json: not a"),
    "preset batch_size many": (
        ["train", "--preset", "{bad}/many.yaml", "--model", "{model}"],
        "batch_size (--batch-size) must be an integer, got 'many'",
    ),
    "truncated LLM-Adapters test.json": (
        ["eval", "--model", "{model}", "--data", "commonsense-boolq:{bad}/llm-adapters/test.json", "--device", "cpu"],
        "llm-adapters/test.json: could not read the data",
    ),
    "empty LLM-Adapters file": (
        ["train", "--model", "{model}", "--data", "commonsense170k:{bad}/llm-adapters/empty.json", "--out", "{tmp}/t"],
        "empty.json: no examples (an empty JSON list)",
    ),
    "dataset with a loading script": (  # fails after train took the run lock: no directory is left behind
        ["train", "--model", "{model}", "--data", "gsm8k:{bad}/scripted", "--out", "{tmp}/t/run", "--device", "cpu"],
        "/scripted (RuntimeError: Dataset scripts are no longer supported",
    ),
    # item 6: smaller items
    "sweep k abc": (["sweep", "{bad}/sweep-k-abc.yaml", "--out", "{tmp}/s"], "--k 'abc'"),
    "sweep learning_rate fast": (
        ["sweep", "{bad}/sweep-lr-fast.yaml", "--out", "{tmp}/s"],
        "learning_rate (--learning-rate) must be a number, got 'fast'",
    ),
    "report on an empty results.csv": (
        ["report", "{bad}/study-empty", "--out", "{tmp}/r.html"],
        "study-empty/results.csv: empty file",
    ),
    "report on a binary results.csv": (
        ["report", "{bad}/study-binary", "--out", "{tmp}/r.html"],
        "study-binary/results.csv: not a CSV text file",
    ),
    "report --k abc": (["report", "{bad}/study-ragged", "--out", "{tmp}/r.html", "--k", "abc"], "--k 'abc'"),
    "compare-runs ragged row": (["compare-runs", "{bad}/study-ragged/results.csv"], "results.csv:3: 4 fields"),
    "compare-runs non-UTF-8": (["compare-runs", "{bad}/study-latin1/results.csv"], "results.csv: not UTF-8"),
    "eval of a NaN adapter": (
        ["eval", "--model", "{model}", "--data", "gsm8k:{bad}/rows.jsonl", "--adapter", "{bad}/nan-adapter"],
        "nan-adapter/adapter.safetensors: non-finite",
    ),
    "export vllm of a NaN adapter": (
        ["export", "{bad}/nan-adapter", "--out", "{tmp}/x", "--format", "vllm"],
        "nan-adapter/adapter.safetensors: non-finite",
    ),
    "monitor-examples 0": (
        ["train", "--data", "{rows}", "--out", "{tmp}/t", "--monitor-examples", "0"],
        "--monitor-examples must be >= 1, got 0",
    ),
    "demo train-steps 0": (["demo", "--out", "{tmp}/d", "--train-steps", "0"], "demo --train-steps must be >= 1"),
    "demo eval-examples 0": (["demo", "--out", "{tmp}/d", "--eval-examples", "0"], "--eval-examples must be >= 1"),
    "plan alpha nan": (["plan", "--alpha", "nan"], "--alpha must be a finite number > 0, got nan"),
    "stats stability-trials unbounded": (
        ["stats", "{bad}/keyless-profile", "--stability-trials", "100000000"],
        "--stability-trials must be between 0 (skip) and 10,000",
    ),
    "train max-length 1": (["train", "--data", "{rows}", "--out", "{tmp}/t", "--max-length", "1"], "--max-length"),
    "eval out is a directory": (  # before the evaluation, not after it
        ["eval", "--model", "{model}", "--data", "gsm8k:{bad}/rows.jsonl", "--out", "{bad}/demo-out"],
        "demo-out is a directory, not a file",
    ),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_expected_failures_are_one_error_line(case, monkeypatch, capsys, tmp_path, tiny_model_dir, bad_inputs):
    args, expected = ERROR_CASES[case]
    fill = {"rows": bad_inputs / "rows.jsonl", "tmp": tmp_path, "bad": bad_inputs, "model": tiny_model_dir}
    code, out, err = run_cli(monkeypatch, capsys, *(a.format(**fill) for a in args))
    errors = [line[line.index("Error:") :] for line in re.split(r"[\r\n]+", err) if "Error:" in line]
    assert code == 2, (case, out, err[-2000:])
    assert len(errors) == 1 and errors[0].startswith("Error: ") and expected in errors[0], err[-2000:]
    assert "Traceback" not in err
    if case != "NaN loss stop":  # nothing written (the NaN run keeps its record and checkpoints)
        assert not list(tmp_path.iterdir())


def test_debug_shows_the_traceback(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MOE_SIEVE_DEBUG", "0")
    with pytest.raises(FileNotFoundError, match="not a moe-sieve profile"):
        run_cli(monkeypatch, capsys, "--debug", "stats", tmp_path / "none")
    monkeypatch.setenv("MOE_SIEVE_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        run_cli(monkeypatch, capsys, "stats", tmp_path / "none")


def test_merge_without_a_tokenizer_warns_and_writes_the_model_only(monkeypatch, capsys, tmp_path, bad_inputs):
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "merge",
        bad_inputs / "adapter",
        "--out",
        tmp_path / "m",
        "--model",
        bad_inputs / "no-tokenizer",
    )
    assert code == 0, err
    assert "Warning:" in err and "NO tokenizer" in err and "no-tokenizer" in err
    assert (tmp_path / "m" / "config.json").exists() and not list((tmp_path / "m").glob("tokenizer*"))


def test_train_help_shows_defaults(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_cli(monkeypatch, capsys, "train", "--help")
    assert code == 0
    for shown in ("[default: (25%)]", "[default: (0.0002)]", "[default: (topk)]", "[default: (1024)]", "(none)"):
        assert shown in out, shown
