"""Our GSM8K and HellaSwag metrics against lm-evaluation-harness's own (its task definitions, its HF model
runner, its metrics) on the same rows of the embedded pretrained model: accuracies equal, per document."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

from moe_sieve.demo import default_model_path  # noqa: E402
from moe_sieve.evaluation.harness import (  # noqa: E402
    compare,
    merged_for_harness,
    to_hub_hellaswag,
    write_jsonl,
)
from moe_sieve.minitasks.generate import SMALL_SIZES, generate_minitasks  # noqa: E402


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini")
    generate_minitasks(out, sizes=SMALL_SIZES)
    return out


def _rows(path, n):
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def _check(report, n_gsm8k, n_hellaswag):
    gsm, hs = report["gsm8k"], report["hellaswag"]
    assert gsm["n"] == n_gsm8k and hs["n"] == n_hellaswag
    assert gsm["ours"] == gsm["harness"] and gsm["disagree"] == []
    assert gsm["completions"]["ours"] == gsm["completions"]["harness"]
    assert gsm["extracted"]["ours"] == gsm["extracted"]["harness"]
    assert hs["ours"] == hs["harness"] and hs["disagree"] == []
    assert hs["max_logprob_diff"] < 1e-3


def _sieve_adapter(path):
    """A sieve adapter on the embedded model (hot-25% of random counts) with non-zero factors, saved as training
    saves it."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora, save_sieve_adapter
    from moe_sieve.arch import MoEShape, find_moe_layers
    from moe_sieve.selection import make_selection

    base = str(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    shape = MoEShape.of(find_moe_layers(model))
    counts = np.random.default_rng(0).integers(1, 100, size=(len(shape.layer_ids), shape.num_experts))
    selection = make_selection(counts, k="25%", layer_ids=list(shape.layer_ids))
    apply_sieve_lora(model, selection, SieveLoraConfig(r=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.05)
    save_sieve_adapter(model, path, base_model=base)
    return path


def test_parity_fast(mini, tmp_path, monkeypatch):
    """A few rows, on a sieve adapter merged by `moe-sieve merge`: GSM8K-shaped arithmetic and hub-schema HellaSwag
    rows, half of them carrying WikiHow markup."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    merged = merged_for_harness(_sieve_adapter(tmp_path / "adapter"), tmp_path / "merged")
    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", _rows(mini / "arith" / "test.jsonl", 3))
    rows = _rows(mini / "hellaswag" / "validation.jsonl", 4)
    hs = write_jsonl(tmp_path / "hs.jsonl", [to_hub_hellaswag(r, wikihow=i % 2 == 0) for i, r in enumerate(rows)])
    report = compare(str(merged), gsm8k=gsm, hellaswag=hs, work_dir=tmp_path / "tasks", max_new_tokens=24)
    _check(report, 3, 4)


@pytest.mark.slow
@pytest.mark.parametrize("wikihow", [False, True])
def test_parity_mini_tasks(mini, tmp_path, monkeypatch, wikihow):
    """Every held-out row of the small mini tasks, plain hub rows and WikiHow-markup rows."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = _rows(mini / "hellaswag" / "validation.jsonl", 100)
    hs = write_jsonl(tmp_path / "hs.jsonl", [to_hub_hellaswag(r, wikihow=wikihow) for r in rows])
    report = compare(
        str(default_model_path()),
        gsm8k=mini / "arith" / "test.jsonl",
        hellaswag=hs,
        work_dir=tmp_path / "tasks",
        max_new_tokens=64,
    )
    _check(report, 10, len(rows))
