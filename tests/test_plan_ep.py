"""`plan --ep-size`: per-rank memory under transformers' expert-parallel engine, checked by hand arithmetic."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from moe_sieve.adapters import SieveLoraConfig
from moe_sieve.adapters.ep import engine_owner_E, hot_spread, plan_ep, spread_owner_LE
from moe_sieve.adapters.sieve.memory import sieve_experts_saved_bytes

from .conftest import run_cli


def _config():
    import transformers as tf

    return tf.OlmoeConfig(
        vocab_size=259, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip


# layer 0: hot {0, 1}, both in EP rank 0's block 0-3; layer 1: hot {7, 0}, one per rank
COUNTS_LE = np.array([[40, 30, 5, 5, 5, 5, 5, 5], [30, 5, 5, 5, 5, 5, 5, 40]])


def test_plan_ep_matches_hand_arithmetic():
    h, i, E, V, r = 32, 16, 8, 259, 4
    # OLMoE layer, dense part: q, o (h x h), k, v (h x 16: 2 kv heads of 8), q/k norms, two layer norms, router
    dense_layer = 2 * h * h + 2 * h * 16 + h + 16 + 2 * h + E * h
    experts_layer = E * (2 * i) * h + E * h * i
    total = 2 * (dense_layer + experts_layer) + 2 * V * h + h
    assert (dense_layer, experts_layer, total) == (3440, 12288, 48064)

    result = plan_ep(
        _config(), "25%", ep_size=2, fsdp_size=4, lora=SieveLoraConfig(r=r, alpha=8), micro_batch=1, seq_len=10,
        dtype="float32", profile=types.SimpleNamespace(counts_LE=COUNTS_LE),
    )  # fmt: skip
    assert result["base_params"] == total
    assert result["expert_params"] == 2 * experts_layer
    assert result["efsdp_size"] == 2
    # LoRA factors: attention q, k, v, o and the router, r * (in + out) each; an expert: three h<->i projections
    dense_adapter = 2 * r * ((h + h) + 2 * (h + 16) + (h + h) + (h + E))
    per_expert = r * 3 * (h + i)
    assert (
        (result["dense_adapter_params"], result["lora_params_per_expert"]) == (dense_adapter, per_expert) == (2112, 576)
    )

    rank0, rank1 = result["ranks"]
    assert (rank0["experts"], rank1["experts"]) == ([0, 3], [4, 7])
    assert (rank0["global_ranks"], rank1["global_ranks"]) == ([0, 2], [1, 3])  # ep innermost in the mesh
    assert (rank0["hot_experts"], rank1["hot_experts"]) == (3, 1)
    # dense adapters over fsdp=4, a hot expert's factors over its efsdp=2 copies
    assert rank0["adapter_params"] == dense_adapter / 4 + 3 * per_expert / 2 == 1392
    assert rank1["adapter_params"] == dense_adapter / 4 + 1 * per_expert / 2 == 816
    assert rank0["optimizer_bytes"] == 2 * 4 * 1392 and rank0["grad_bytes"] == 4 * 1392
    assert rank0["base_bytes"] == rank1["base_bytes"] == 4 * total // 4
    assert rank0["gathered_unit_bytes"] == 4 * (dense_layer + experts_layer // 2)
    assert rank0["row_share"] == pytest.approx((0.8 + 0.45) / 2)

    # rows the all-to-all brings EP rank 0 per layer: 2 ranks x 10 tokens x top-2 = 40, times its share
    def experts(rows, hot_rows, hot):
        return sieve_experts_saved_bytes(
            num_tokens=rows, top_k=1, hidden_size=h, intermediate_size=i, num_experts=4, dtype=torch.float32,
            rows_selected=hot_rows, num_selected=hot, r=r,
        )["total"]  # fmt: skip

    combine = 2 * 10 * 2 * (h + 1) * 4  # layers x tokens x top-k x (outputs + weight), fp32
    assert rank0["activation_bytes"] == experts(32, 28, 2) + experts(18, 12, 1) + combine
    assert rank1["activation_bytes"] == experts(8, 0, 0) + experts(22, 16, 1) + combine

    spread = result["spread"]
    assert spread["engine"]["hot_total_R"] == [3, 1] and spread["engine"]["max_rows"] == pytest.approx(0.8)
    assert spread["round_robin"]["hot_total_R"] == [2, 2] and spread["round_robin"]["max_hot"] == 1


def test_placements_against_brute_force():
    rng = np.random.default_rng(0)
    counts_LE = rng.integers(0, 100, size=(5, 16))
    assert engine_owner_E(16, 4).tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    owner_LE = spread_owner_LE(counts_LE, 4)
    assert all(np.bincount(row, minlength=4).tolist() == [4] * 4 for row in owner_LE)
    got = hot_spread(counts_LE, 4, 4, owner_LE)
    for layer in range(5):
        hottest = sorted(range(16), key=lambda e: (-counts_LE[layer, e], e))
        assert sorted(owner_LE[layer, e] for e in hottest[:4]) == [0, 1, 2, 3]  # one hot expert per rank
        for rank in range(4):
            mine = [e for e in range(16) if e // 4 == rank]
            assert hot_spread(counts_LE, 4, 4)["hot_LR"][layer, rank] == len(set(mine) & set(hottest[:4]))
            share = sum(counts_LE[layer, e] for e in range(16) if owner_LE[layer, e] == rank) / counts_LE[layer].sum()
            assert got["rows_LR"][layer, rank] == pytest.approx(share)


def test_plan_cli_ep_json_and_refusals(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    path = tmp_path / "config.json"
    _config().to_json_file(path)
    code, out, err = run_cli(monkeypatch, capsys, "plan", "--model", path, "--k", "25%", "--ep-size", "2", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [rank["experts"] for rank in result["ranks"]] == [[0, 3], [4, 7]]
    assert result["ranks"][0]["hot_experts"] == 2.0  # no profile: k / ep = 1 per layer, 2 layers
    code, out, err = run_cli(monkeypatch, capsys, "plan", "--model", path, "--ep-size", "2", "--fsdp-size", "4")
    assert code == 0 and "worst case 2/layer" in out, err
    for args, expected in (
        (("--ep-size", "3"), "Error: --ep-size: cannot evenly shard 8 experts across 3"),
        (("--ep-size", "2", "--fsdp-size", "3"), "Error: `ep_size` must divide `fsdp_size * tp_size`"),
    ):
        code, out, err = run_cli(monkeypatch, capsys, "plan", "--model", path, *args)
        assert (
            code == 2
            and [line for line in err.splitlines() if "Error:" in line]
            == [line for line in err.splitlines() if line.strip()]
            and expected in err
        ), err


@pytest.mark.slow
def test_docs_plan_commands(monkeypatch, capsys):
    """The bash block of docs/distributed.md prints the per-rank figures its table states (~1 min: 671B and
    235B models built on the meta device)."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "distributed.md").read_text()
    block = text.split("<!-- tested: tests/test_plan_ep.py::test_docs_plan_commands -->")[1]
    block = re.search(r"```bash\n(.*?)```", block, re.S).group(1)
    monkeypatch.chdir(root)
    monkeypatch.setenv("COLUMNS", "200")
    expected = [("19.53 GiB", "3.06 GiB", "55.36M", "422.4 MiB", "81.60 GiB"), ("27.37 GiB", "1.16 GiB", "108.79M")]
    for line, figures in zip(block.strip().splitlines(), expected, strict=True):
        code, out, err = run_cli(monkeypatch, capsys, *shlex.split(line)[1:])
        assert code == 0, err
        for figure in figures:
            assert figure in out and figure in text, figure


def test_dense_activations_from_the_meta_forward_match_a_real_forward():
    """The plan's dense activations (slope and intercept measured on the meta device at 8 and 16 tokens) against
    a real float32 forward of the same adapted model at 24 tokens, saved tensors counted once per storage: the
    meta count (tensor identity) and the extrapolation to other lengths hold exactly."""
    from torch.autograd.graph import saved_tensors_hooks
    from transformers import AutoModelForCausalLM

    from moe_sieve.adapters.ep import dense_measurement_model, dense_saved_bytes

    config, lora, tokens = _config(), SieveLoraConfig(r=4, alpha=8), 24
    measured = dense_saved_bytes(config, lora, "float32")
    torch.manual_seed(0)
    model = dense_measurement_model(AutoModelForCausalLM.from_config(config), lora)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 259, (1, tokens))
    with saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    real = sum(storages.values())
    assert measured["per_token"] > 0
    assert measured["fixed"] + measured["per_token"] * tokens == pytest.approx(real, abs=1)  # measured: 119,532 both
    result = plan_ep(config, 2, ep_size=2, lora=lora, micro_batch=1, seq_len=tokens, dtype="float32")
    assert all(rank["dense_activation_bytes"] == pytest.approx(real, abs=1) for rank in result["ranks"])
