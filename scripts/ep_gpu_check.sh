#!/usr/bin/env bash
# Expert parallelism with transformers' engine on 2 (or 4) GPUs over NCCL: the same check that
# tests/test_ep.py runs on 2 gloo CPU processes. For each 16-layer fixture (OLMoE, Qwen3-MoE, DeepSeek-V3 style
# with a shared expert and a dense first layer), every rank loads it alone and through
# DistributedConfig(ep_size=N, fsdp_size=N), with moe-sieve's sieve_lora experts kernel, and compares loss and
# embedding gradient (float32) and the experts it holds against moe_sieve.adapters.ep.engine_owner_E.
# NOT RUNNABLE ON THE DEV BOX (no GPU) and NOT YET RUN: the lent machines are single-GPU, and NCCL refuses two
# ranks on one GPU, so this needs a machine with >= 2 GPUs. Usage: scripts/ep_gpu_check.sh [NPROC] [OUT]
set -euo pipefail
NPROC=${1:-2}
OUT=${2:-runs/ep-gpu}
mkdir -p "$OUT"
python - "$OUT" <<'PY'
import sys
sys.path.insert(0, ".")
from tests.conftest import build_tiny
for family in ("olmoe", "qwen3_moe", "deepseek_v3"):
    build_tiny(family, layers=16).save_pretrained(f"{sys.argv[1]}/{family}")
PY
EP_SIZE=$NPROC FSDP_SIZE=$NPROC PYTHONPATH=src torchrun --nproc_per_node "$NPROC" tests/ep_worker.py "$OUT" "$OUT/olmoe" "$OUT/qwen3_moe" "$OUT/deepseek_v3"
python - "$OUT" "$NPROC" <<'PY'
import json, sys
from moe_sieve.adapters.ep import engine_owner_E
out, nproc = sys.argv[1], int(sys.argv[2])
ok = True
for rank in range(nproc):
    for model, r in json.load(open(f"{out}/rank{rank}.json")).items():
        E = nproc * r["num_experts_local"]
        owned_ok = all(o == [e for e in range(E) if engine_owner_E(E, nproc)[e] == rank] for o in r["owned"].values())
        good = abs(r["loss"] - r["ref_loss"]) < 1e-4 and r["grad_err"] < 1e-4 and owned_ok
        ok &= good
        print(f"rank {rank} {model} on {r['device']}: loss {r['loss']:.6f} vs {r['ref_loss']:.6f}, "
              f"grad err {r['grad_err']:.2e}, placement {'engine rule' if owned_ok else 'DIFFERENT'}, "
              f"sieve LoRA attach: {r['attach']}")
print("EP GPU CHECK", "PASSED" if ok else "FAILED")
sys.exit(0 if ok else 1)
PY
