#!/usr/bin/env bash
# FSDP2 `train` on 2 GPUs vs 1 GPU on the embedded model, then compare the adapters (needs >= 2 CUDA devices).
# The CPU version of this comparison (2 gloo processes, kill + --resume, adapter-only checkpoints) runs in CI:
# tests/test_fsdp.py. On GPUs accelerate itself switches to FSDP (no moe_sieve/training/sharding.py hand-over);
# the adapter gathering (DTensor.full_tensor) and re-sharding on --resume are the same code as on CPU.
# NOT YET RUN: no GPU was available when this was written.
set -euo pipefail
OUT=${1:-runs/fsdp-gpu}
MODEL=$(python -c "from moe_sieve.demo import default_model_path; print(default_model_path())")
python -m moe_sieve.minitasks.generate "$OUT/minitasks" --corpus-docs 40
COMMON=(--model "$MODEL" --data "gsm8k:$OUT/minitasks/arith" --max-steps 20 --batch-size 16 --micro-batch-size 8
        --save-steps 10 --dropout 0 --dtype float32 --overwrite)
accelerate launch --num_processes 2 -m moe_sieve.cli train "${COMMON[@]}" --out "$OUT/two" --fsdp "full_shard auto_wrap"
python -m moe_sieve.cli train "${COMMON[@]}" --out "$OUT/one" --micro-batch-size 16
python - "$OUT" <<'PY'
import sys, torch
from safetensors.torch import load_file
a = load_file(f"{sys.argv[1]}/one/adapter/adapter.safetensors"); b = load_file(f"{sys.argv[1]}/two/adapter/adapter.safetensors")
assert a.keys() == b.keys()
print("max |one - two| =", max((a[k] - b[k]).abs().max().item() for k in a))
PY
