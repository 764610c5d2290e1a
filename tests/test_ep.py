"""Expert parallelism with transformers' own engine on gloo CPU processes (issue 21).

The engine: ``from_pretrained(distributed_config=DistributedConfig(ep_size=2, fsdp_size=2))`` shards the experts
in the contiguous blocks that ``moe_sieve.adapters.ep.engine_owner_E`` plans with, moe-sieve's ``sieve_lora``
experts kernel (the EP sentinel path) gives the one-process loss and gradients, and sieve LoRA puts each hot
expert's factors on the rank owning it, and nowhere else. Training: ``train --ep-size N`` under torchrun gives
the one-process adapter and profile, and a kill followed by ``--resume`` gives the uninterrupted adapter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moe_sieve.adapters.ep import engine_owner_E
from moe_sieve.modeling import distributed_config
from moe_sieve.profiling import Profile
from moe_sieve.training.config import EP_WITH_FSDP, TrainConfig
from moe_sieve.training.sharding import check_expert_parallel, check_experts_sharded

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


def _assert_only_owned_hot_experts_carry_factors(ranks, d, ep_size):
    """Each EP rank holds the factors of exactly the hot experts in its block; together they hold all."""
    for layer, first in ranks[0][d]["attach"].items():
        num_experts = ep_size * ranks[0][d]["num_experts_local"]
        owner_E = engine_owner_E(num_experts, ep_size)
        held_anywhere = set()
        for rank, result in enumerate(ranks):
            attached = result[d]["attach"][layer]
            mine = [e for e in attached["hot"] if owner_E[e] == rank % ep_size]
            assert attached["held"] == mine, (d, layer, rank)
            assert attached["numel"] == len(mine) * first["per_expert"], (d, layer, rank)
            held_anywhere |= set(mine)
        assert sorted(held_anywhere) == first["hot"], (d, layer)


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
        _assert_only_owned_hot_experts_carry_factors(ranks, d, ep_size=2)


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
    _assert_only_owned_hot_experts_carry_factors(ranks, d, ep_size=2)  # efsdp copies hold the same hot experts


def test_train_refuses_what_expert_parallel_training_cannot_do_with_one_error_line():
    with pytest.raises(ValueError, match=r"--ep-size must be >= 1"):
        TrainConfig(model="m", data="d", out="o", ep_size=0)
    with pytest.raises(ValueError) as err:
        TrainConfig(model="m", data="d", out="o", ep_size=2, fsdp="full_shard")
    assert str(err.value) == EP_WITH_FSDP
    with pytest.raises(ValueError, match="--reselect grow cannot run under --ep-size"):
        TrainConfig(model="m", data="d", out="o", ep_size=2, reselect="grow", monitor_every=1)
    one_process = SimpleNamespace(num_processes=1)
    for settings, message in [
        ({}, "router LoRA is a parametrization of the router weight"),
        ({"router": "full", "method": "routed"}, "only --method sieve places its expert adapters"),
        ({"router": "full", "train_tokens": "auto"}, "--train-tokens adds rows to the embedding"),
        ({"router": "full"}, r"launch a multiple of 2 processes .* this run has 1"),
    ]:
        config = TrainConfig(model="m", data="d", out="o", ep_size=2, **settings)
        with pytest.raises(ValueError, match=message):
            check_expert_parallel(config, one_process)


def test_ep_refuses_a_model_the_engine_left_unsharded_and_transformers_without_the_engine(monkeypatch):
    with pytest.raises(ValueError, match=r"--ep-size 2: transformers' engine did not shard the experts of olmoe"):
        check_experts_sharded(build_tiny("olmoe", layers=2), 2)
    import transformers.distributed

    class OldDistributedConfig:  # transformers 5.17: no ep_size
        def __init__(self, tp_size=1):
            self.tp_size = tp_size

    monkeypatch.setattr(transformers.distributed, "DistributedConfig", OldDistributedConfig)
    with pytest.raises(ValueError, match=r"--ep-size 2: transformers .* has no expert-parallel engine"):
        distributed_config(2)


# --- train --ep-size: the one-process adapter and profile, and kill + --resume -------------------------------


def _save_fixture(family, path, layers):
    from moe_sieve.tiny import byte_level_tokenizer

    build_tiny(family, layers=layers).save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)


def _train(args, out, nproc=1, port=29591, fault=""):
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]), "MOE_SIEVE_FAULT": fault,
    }  # fmt: skip
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), "-m", "moe_sieve.cli", "train", *args, "--out", str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _assert_same_adapter(got_dir, want_dir, tol):
    got, want = (load_file(d / "adapter" / "adapter.safetensors") for d in (got_dir, want_dir))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=tol, msg=lambda m, key=key: f"{key}: {m}")
    return got


# float32 + AdamW: the all-to-all sums an expert's gradient in another order than one process, and Adam's
# m / (sqrt(v) + eps) amplifies that rounding where a gradient is near eps: measured max |diff| 1.4e-6 on 4 layers x
# 2 processes, 1.0e-4 on a few of 2048 elements on 16 layers x 4 processes (steps 3-4 move the adapter ~4e-3)
EP_TOL = 2e-4


def _train_ep_and_compare(tmp_path, family, layers, nproc, ep_size, port, resume=True, tol=EP_TOL):
    model = tmp_path / family
    _save_fixture(family, model, layers)
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "completion": f" {a + b}"} for a in range(7, 71) for b in (a + 43,)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = [
        *("--model", model, "--data", data, "--dtype", "float32", "--device", "cpu", "--router", "full"),
        *("--max-steps", 4, "--save-steps", 2, "--batch-size", 8, "--micro-batch-size", 8 // nproc, "--dropout", 0),
        *("--learning-rate", 5e-3, "--warmup", 0, "--monitor-every", 0, "--logging-steps", 1),
    ]
    args = [str(a) for a in args]
    one = _train(args, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    run = tmp_path / "ep"
    ep = [*args, "--ep-size", str(ep_size)]
    if resume:  # killed right after checkpoint-2 is complete, then resumed
        cut = _train(ep, run, nproc, port, fault="checkpoint-after-marker@1")
        assert cut.returncode != 0 and "SIGKILL" in cut.stderr, cut.stderr[-3000:]
        assert not (run / "adapter").exists()
        checkpoint = run / "checkpoints" / "checkpoint-2"
        files = sorted(p.name for p in checkpoint.iterdir() if p.suffix in (".safetensors", ".pt", ".pth"))
        rng = [f"rng_state_{r}.pth" for r in range(nproc)]
        assert files == sorted(["adapter.safetensors", "optimizer_gathered.pt", *rng, "scheduler.pt"])
        factors = load_file(checkpoint / "adapter.safetensors")  # gathered: the one-process tensors
        want = load_file(tmp_path / "one" / "checkpoints" / "checkpoint-2" / "adapter.safetensors")
        assert factors.keys() == want.keys() and all(factors[k].shape == want[k].shape for k in want)
        optimizer = torch.load(checkpoint / "optimizer_gathered.pt", weights_only=True)
        assert sorted(optimizer["state"]) == sorted(factors)
        assert all(optimizer["state"][k]["exp_avg"].shape == t.shape for k, t in factors.items())
    done = _train([*ep, *(["--resume"] if resume else [])], run, nproc, port)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"expert parallelism ep={ep_size} over {nproc} processes" in done.stderr
    got = _assert_same_adapter(run, tmp_path / "one", tol)
    assert any(k.endswith("_B") and got[k].abs().max() > 1e-3 for k in got if "sieve_lora" in k)  # it trained
    if resume:
        moved = max((got[k] - factors[k]).abs().max().item() for k in got)
        assert moved > 10 * tol  # steps 3-4 move the adapter far beyond the tolerance: a bad resume shows
    one_profile, ep_profile = (Profile.load(d / "profile") for d in (tmp_path / "one", run))
    np.testing.assert_array_equal(ep_profile.counts_LE, one_profile.counts_LE)
    np.testing.assert_array_equal(ep_profile.example_counts_NLE, one_profile.example_counts_NLE)
    selections = [json.loads((d / "selection.json").read_text())["layers"] for d in (run, tmp_path / "one")]
    assert selections[0] == selections[1]
    metrics, reference = (json.loads((d / "metrics.json").read_text()) for d in (run, tmp_path / "one"))
    assert metrics["processes"] == nproc and metrics["steps"] == 4
    assert metrics["trainable_params"] == reference["trainable_params"]
    assert metrics["final_loss"] == pytest.approx(reference["final_loss"], rel=1e-5)


def test_train_ep2_matches_one_process_and_resumes_after_a_kill(tmp_path):
    """The fast check in the default run: OLMoE, 4 layers, two processes, ep=2."""
    _train_ep_and_compare(tmp_path, "olmoe", layers=4, nproc=2, ep_size=2, port=29591)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "deepseek_v3"])
def test_train_ep2_16_layers_matches_one_process_and_resumes(tmp_path, family):
    _train_ep_and_compare(tmp_path, family, layers=16, nproc=2, ep_size=2, port=29592)


@pytest.mark.slow
@pytest.mark.parametrize("ep_size", [2, 4])
@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "deepseek_v3"])
def test_train_on_four_processes_matches_one_process(tmp_path, family, ep_size):
    """ep=4 (one block per process) and ep=2 x efsdp=2 (two copies of each block, gradients summed over them)."""
    _train_ep_and_compare(tmp_path, family, layers=16, nproc=4, ep_size=ep_size, port=29593, resume=ep_size == 4)
