"""Expert parallelism with transformers' own engine on two gloo CPU processes (issue 21).

What runs: ``from_pretrained(distributed_config=DistributedConfig(ep_size=2, fsdp_size=2))`` shards the experts
in the contiguous blocks that ``moe_sieve.adapters.ep.engine_owner_E`` plans with, and moe-sieve's ``sieve_lora``
experts kernel (the EP sentinel path) gives the one-process loss and gradients. What does not: attaching sieve
LoRA to the sharded experts, which ``train --ep-size`` therefore refuses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_sieve.adapters.ep import engine_owner_E
from moe_sieve.training.config import TrainConfig

from .conftest import build_tiny

ROOT = Path(__file__).resolve().parents[1]


def _run_workers(tmp_path, families, nproc=2, ep_size=2, port=29581):
    dirs = []
    for family in families:
        path = tmp_path / family
        build_tiny(family, layers=3).save_pretrained(path)
        dirs.append(str(path))
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"),
        "EP_SIZE": str(ep_size), "FSDP_SIZE": str(nproc),
    }  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)]
    run = subprocess.run(
        [*cmd, str(ROOT / "tests" / "ep_worker.py"), str(tmp_path), *dirs],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return dirs, [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]


def _assert_matches_one_process(result, d):
    # float32 on one machine: the all-to-all only moves rows, so loss and gradient agree to rounding
    assert result["loss"] == pytest.approx(result["ref_loss"], abs=1e-5), d
    assert result["grad_err"] < 1e-5, d
    # the gap `train --ep-size` refuses: sieve LoRA sizes itself from the global DTensor weights
    assert result["attach"].startswith("ValueError: unexpected experts layout"), d


@pytest.mark.parametrize(
    "families",
    [
        pytest.param(("olmoe",), id="olmoe"),
        # deepseek_v3: a shared expert and a dense first layer
        pytest.param(("qwen3_moe", "deepseek_v3"), id="qwen3_moe+deepseek_v3", marks=pytest.mark.slow),
    ],
)
def test_transformers_ep_engine_on_two_gloo_processes_matches_one(tmp_path, families):
    dirs, ranks = _run_workers(tmp_path, families)
    for d in dirs:
        for rank, result in enumerate(r[d] for r in ranks):
            _assert_matches_one_process(result, d)
            num_experts = 2 * result["num_experts_local"]
            block = [e for e in range(num_experts) if engine_owner_E(num_experts, 2)[e] == rank]
            assert all(owned == block for owned in result["owned"].values()), d


@pytest.mark.slow
def test_ep_with_expert_fsdp_on_four_gloo_processes(tmp_path):
    """ep=2 x efsdp=2: global rank g is EP rank g % 2 (ep innermost), and the two ranks of an efsdp group
    FSDP-shard that EP rank's block between them (what `plan --ep-size 2 --fsdp-size 4` prints)."""
    dirs, ranks = _run_workers(tmp_path, ("olmoe",), nproc=4, ep_size=2, port=29583)
    (d,) = dirs
    for result in (r[d] for r in ranks):
        _assert_matches_one_process(result, d)
    num_experts = 2 * ranks[0][d]["num_experts_local"]
    owner_E = engine_owner_E(num_experts, 2)
    for layer in ranks[0][d]["owned"]:
        for ep_rank in range(2):
            group = [g for g in range(4) if g % 2 == ep_rank]
            held = [ranks[g][d]["owned"][layer] for g in group]
            assert all(set(h) <= {e for e in range(num_experts) if owner_E[e] == ep_rank} for h in held)
            assert sorted(sum(held, [])) == [e for e in range(num_experts) if owner_E[e] == ep_rank]


def test_train_refuses_ep_size_with_one_error_line():
    with pytest.raises(ValueError, match=r"--ep-size 2: expert-parallel training is not implemented yet"):
        TrainConfig(model="m", data="d", out="o", ep_size=2)
    with pytest.raises(ValueError, match=r"--ep-size must be >= 1"):
        TrainConfig(model="m", data="d", out="o", ep_size=0)
