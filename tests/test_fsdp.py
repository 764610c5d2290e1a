"""Sharded training: the same `train` command, sharded by FSDP2 (`fully_shard`) over two gloo CPU processes,
gives the one-process adapter, writes adapter-only checkpoints and resumes after a kill."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from moe_sieve.cli import main
from moe_sieve.training import TrainConfig, train
from moe_sieve.training.sharding import FSDP1_REFUSED, FSDP_NEEDS_PROCESSES, check_sharded, enable_cpu_fsdp

SRC = Path(__file__).resolve().parents[1] / "src"


def _launch(launcher, *args, fault=""):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "MOE_SIEVE_FAULT": fault,
    }
    cmd = [sys.executable, "-m", *launcher, "-m", "moe_sieve.cli", "train", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _assert_close(got, want, tol=5e-5):
    """Float tolerance: sharded reductions (reduce-scatter, per-shard AdamW) round differently."""
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=tol, msg=lambda m, key=key: f"{key}: {m}")


def test_fsdp2_train_on_two_cpu_processes_matches_one_checkpoints_adapter_only_and_resumes(
    monkeypatch, capsys, tmp_path
):
    from moe_sieve.demo import default_model_path
    from moe_sieve.minitasks import SMALL_SIZES, generate_minitasks

    generate_minitasks(tmp_path / "mt", seed=0, sizes=SMALL_SIZES)
    common = [
        *("--model", default_model_path(), "--data", f"gsm8k:{tmp_path / 'mt' / 'arith'}", "--dtype", "float32"),
        *("--max-steps", 4, "--save-steps", 2, "--batch-size", 8, "--micro-batch-size", 2, "--dropout", 0),
        *("--learning-rate", 5e-3, "--monitor-every", 2, "--logging-steps", 1),
    ]
    # The reference: one process, no sharding, in this process (one thread, as the launched processes).
    monkeypatch.setattr(sys, "argv", ["moe-sieve", "train", *map(str, common), "--out", str(tmp_path / "one")])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as done:
            main()
    finally:
        torch.set_num_threads(threads)
    assert done.value.code in (0, None), capsys.readouterr().err[-3000:]
    one = tmp_path / "one"

    # Two processes under `accelerate launch --use_fsdp`, killed right after checkpoint-2 is complete.
    run = tmp_path / "two"
    sharded = [*common, "--out", run, "--fsdp", "full_shard auto_wrap"]
    accelerate = ["accelerate.commands.launch", "--num_processes", "2", "--use_fsdp", "--fsdp_version", "2"]
    cut = _launch([*accelerate, "--main_process_port", "29561"], *sharded, fault="checkpoint-after-marker@1")
    assert cut.returncode != 0 and "SIGKILL" in cut.stderr, cut.stderr[-3000:]
    assert "FSDP2 sharded 64 trainable tensors over 2 processes" in cut.stderr, cut.stderr[-3000:]
    assert not (run / "adapter").exists()
    checkpoint = run / "checkpoints" / "checkpoint-2"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2"]

    # Adapter-only: the factors (gathered from the shards) and AdamW state for exactly those tensors.
    assert json.loads((checkpoint / "moe_sieve_complete.json").read_text())["step"] == 2
    weights = sorted(p.name for p in checkpoint.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    assert weights == ["adapter.safetensors", "optimizer.bin", "rng_state_0.pth", "rng_state_1.pth", "scheduler.pt"]
    factors = load_file(checkpoint / "adapter.safetensors")
    trainable = json.loads((one / "metrics.json").read_text())["trainable_params"]
    assert sum(t.numel() for t in factors.values()) == trainable
    assert not any(name.endswith(("embed_tokens.weight", "lm_head.weight", "q_proj.weight")) for name in factors)
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    assert sorted(optimizer["state"]) == sorted(factors)  # keyed by name, full (unsharded) moments
    assert all(optimizer["state"][n]["exp_avg"].shape == t.shape for n, t in factors.items())
    size = sum(p.stat().st_size for p in checkpoint.iterdir())
    assert size < (default_model_path() / "model.safetensors").stat().st_size / 2
    _assert_close(factors, load_file(one / "checkpoints" / "checkpoint-2" / "adapter.safetensors"))

    # Resume under torchrun + `--fsdp`: the final adapter is the uninterrupted one-process adapter.
    torchrun = ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29562"]
    resumed = _launch(torchrun, *sharded, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "FSDP2 sharded 64 trainable tensors" in resumed.stderr
    want, got = load_file(one / "adapter" / "adapter.safetensors"), load_file(run / "adapter" / "adapter.safetensors")
    _assert_close(got, want)
    moved = max((want[k] - factors[k]).abs().max().item() for k in want)
    assert moved > 100 * 5e-5  # steps 3-4 move the adapter far beyond the tolerance: a bad resume shows
    assert any(k.endswith("_B") or "lora_B" in k for k in got if got[k].abs().max() > 1e-3)
    metrics, reference = (json.loads((d / "metrics.json").read_text()) for d in (run, one))
    assert metrics["processes"] == 2 and metrics["steps"] == 4 and metrics["resumed_from"].endswith("checkpoint-2")
    assert metrics["routing_drift"]["steps"] == reference["routing_drift"]["steps"] == [0, 2, 4]
    assert metrics["routing_drift"]["final"] == pytest.approx(reference["routing_drift"]["final"], abs=1e-5)
    assert metrics["final_loss"] == pytest.approx(reference["final_loss"], rel=1e-5)


def _config(model_dir, tmp_path, **kwargs):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": " b"}\n' * 8)
    settings = {"device": "cpu", "batch_size": 4, "micro_batch_size": 4, "max_steps": 1, "monitor_every": 0, **kwargs}
    return TrainConfig(
        model=str(model_dir), data=str(data), out=str(tmp_path / f"r{len(kwargs)}"), fsdp="full_shard", **settings
    )


def test_train_refuses_fsdp_on_one_cpu_process_and_with_reselect(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError) as err:
        train(_config(tiny_model_dir, tmp_path))
    assert str(err.value) == FSDP_NEEDS_PROCESSES
    assert not (tmp_path / "r0" / "config.json").exists()  # refused before any work
    with pytest.raises(ValueError, match="--reselect grow cannot run under --fsdp"):
        train(_config(tiny_model_dir, tmp_path, reselect="grow", monitor_every=1))


def test_enable_cpu_fsdp_hands_accelerate_the_fsdp2_plugin_or_refuses():
    def trainer(**plugin_args):
        state = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, mixed_precision="no", fsdp_plugin=None)
        args = SimpleNamespace(fsdp_plugin_args={"fsdp_version": 2, **plugin_args})
        return SimpleNamespace(args=args, accelerator=SimpleNamespace(state=state), is_fsdp_enabled=False)

    ok = trainer(reshard_after_forward=True)
    enable_cpu_fsdp(ok)
    assert ok.is_fsdp_enabled and ok.accelerator.state.distributed_type == DistributedType.FSDP
    assert ok.accelerator.state.fsdp_plugin.fsdp_version == 2
    with pytest.raises(ValueError) as err:
        enable_cpu_fsdp(trainer(fsdp_version=1, reshard_after_forward="full_shard"))
    assert str(err.value) == FSDP1_REFUSED
    with pytest.raises(ValueError, match="offload on CPU"):
        enable_cpu_fsdp(trainer(cpu_offload=True))
    gpu = trainer()
    gpu.accelerator.state.distributed_type = DistributedType.FSDP
    gpu.accelerator.state.fsdp_plugin = SimpleNamespace(fsdp_version=1)
    with pytest.raises(ValueError) as err:
        enable_cpu_fsdp(gpu)
    assert str(err.value) == FSDP1_REFUSED
    not_distributed = trainer()
    not_distributed.accelerator.state.distributed_type = DistributedType.NO
    with pytest.raises(ValueError, match="accelerate runs NO"):
        enable_cpu_fsdp(not_distributed)
    plain = trainer()
    plain.args.fsdp_plugin_args = None
    enable_cpu_fsdp(plain)  # not requested: left as DDP
    assert plain.accelerator.state.distributed_type == DistributedType.MULTI_CPU and not plain.is_fsdp_enabled


def test_check_sharded_refuses_a_model_that_fsdp_did_not_shard(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    apply_sieve_lora(model, None, SieveLoraConfig(r=2, experts="all"))
    with pytest.raises(RuntimeError, match="trainable parameters are not sharded"):
        check_sharded(model)
