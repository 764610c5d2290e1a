#!/usr/bin/env bash
# Expert parallelism with transformers' engine on 2 (or 4) GPUs over NCCL: the checks that tests/test_ep.py
# runs on gloo CPU processes. (1) For each 16-layer fixture (OLMoE, Qwen3-MoE, DeepSeek-V3 style with a shared
# expert and a dense first layer), every rank loads it alone and through DistributedConfig(ep_size=N,
# fsdp_size=N), with moe-sieve's sieve_lora experts kernel, and compares loss and embedding gradient (float32),
# the experts it holds against moe_sieve.adapters.ep.engine_owner_E, and which hot experts' LoRA it holds.
# (2) `train --ep-size N` on the OLMoE fixture against a one-process run: the adapters must agree.
# NOT YET RUN ON GPUs: the lent machines are single-GPU, and NCCL refuses two ranks on one GPU, so this needs a
# machine with >= 2 GPUs. Without CUDA it runs on gloo CPU processes (2026-12-06, dev box, NPROC=2: both checks
# PASSED, train max |diff| 4.2e-5). Usage: scripts/ep_gpu_check.sh [NPROC] [OUT]
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
        owner = engine_owner_E(E, nproc)
        lora_ok = all(a["held"] == [e for e in a["hot"] if owner[e] == rank] for a in r["attach"].values())
        good = abs(r["loss"] - r["ref_loss"]) < 1e-4 and r["grad_err"] < 1e-4 and owned_ok and lora_ok
        ok &= good
        print(f"rank {rank} {model} on {r['device']}: loss {r['loss']:.6f} vs {r['ref_loss']:.6f}, "
              f"grad err {r['grad_err']:.2e}, placement {'engine rule' if owned_ok else 'DIFFERENT'}, "
              f"hot-expert LoRA {'on the owners only' if lora_ok else 'MISPLACED'}")
print("EP ENGINE CHECK", "PASSED" if ok else "FAILED")
sys.exit(0 if ok else 1)
PY
python -c "from moe_sieve.tiny import byte_level_tokenizer; byte_level_tokenizer().save_pretrained('$OUT/olmoe')"
python - "$OUT" <<'PY'
import json, random, sys
rng = random.Random(0)
with open(f"{sys.argv[1]}/d.jsonl", "w") as f:
    for _ in range(64):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": f" {a + b}"}) + "\n")
PY
ARGS="--model $OUT/olmoe --data $OUT/d.jsonl --dtype float32 --router full --max-steps 4 --save-steps 2 --batch-size 8
      --micro-batch-size $((8 / NPROC)) --dropout 0 --learning-rate 5e-3 --warmup 0 --monitor-every 0"
PYTHONPATH=src python -m moe_sieve.cli train $ARGS --out "$OUT/train-one" --overwrite
PYTHONPATH=src torchrun --nproc_per_node "$NPROC" -m moe_sieve.cli train $ARGS --out "$OUT/train-ep" --ep-size "$NPROC" --overwrite
python - "$OUT" <<'PY'
import sys
from safetensors.torch import load_file
one, ep = (load_file(f"{sys.argv[1]}/{d}/adapter/adapter.safetensors") for d in ("train-one", "train-ep"))
diff = max((one[k] - ep[k]).abs().max().item() for k in one) if one.keys() == ep.keys() else float("inf")
print(f"train --ep-size vs one process: {len(one)} tensors, max |diff| {diff:.2e}")
print("EP TRAIN CHECK", "PASSED" if diff < 1e-3 else "FAILED")
sys.exit(0 if diff < 1e-3 else 1)
PY
