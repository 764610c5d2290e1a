#!/usr/bin/env bash
# Issue 12's GPU measurement in one command: lora_step conditions side by side (step time, tokens/s, MFU,
# peak memory against the memory predicted from shapes), a torch.profiler table of the floor and sieve-hot
# steps by op category, and the routing-profiling overhead, on the OLMoE-1B-7B shape and a 16-layer
# Qwen3-30B-A3B-shaped stack (bf16, 8 x 512 tokens, r=32). Markdown tables land in $OUT for docs/benchmarks.md.
#
#   OUT=/tmp/gpu-speed scripts/gpu_speed.sh                      # one H100/H200 (about 10-15 min)
#   PRESETS=olmoe-1b-7b scripts/gpu_speed.sh                     # one shape only (stay under a 10-min limit)
#   OUT=/tmp/gpu-smoke scripts/gpu_speed.sh --device cpu --tiny  # smoke run at tiny shapes (what CI can do)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=cuda
TINY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    *) echo "Error: scripts/gpu_speed.sh: unknown argument $1 (use --device DEV, --tiny)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-runs/gpu-speed}
CONDITIONS=${CONDITIONS:-floor,floor-sieve,sieve-hot,sieve-all,peft-all,sieve-hot+compile}
if [[ $TINY == 1 ]]; then
  PRESETS=${PRESETS:-"tiny qwen3-tiny"}
  STEP_ARGS=(--steps 1 --warmup 1 --profile-steps 1)
  OVERHEAD_ARGS=(--batch-size 2 --seq-len 32 --repeats 2)
else
  PRESETS=${PRESETS:-"olmoe-1b-7b qwen3-30b-a3b-16l"}
  STEP_ARGS=(--steps 10 --warmup 3 --profile-steps 3 --batch-size 8 --seq-len 512)
  OVERHEAD_ARGS=(--batch-size 8 --seq-len 512 --repeats 10)
fi
mkdir -p "$OUT"

{
  echo "## Machine"
  echo
  echo '```'
  date -u
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
  python - <<'PY'
import platform, torch, transformers, peft
print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
      f"transformers {transformers.__version__} | peft {peft.__version__}")
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")
PY
  echo "git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo '```'
} > "$OUT/machine.md"

for preset in $PRESETS; do
  echo "== lora_step $preset" >&2
  python benchmarks/lora_step.py --preset "$preset" --device "$DEVICE" "${STEP_ARGS[@]}" \
    --conditions "$CONDITIONS" --profile floor,sieve-hot --keep-going \
    --markdown "$OUT/lora_step_$preset.md" --json "$OUT/lora_step_$preset.json"
  echo "== profile_overhead $preset" >&2
  python benchmarks/profile_overhead.py --preset "$preset" --device "$DEVICE" "${OVERHEAD_ARGS[@]}" \
    --markdown "$OUT/profile_overhead_$preset.md"
done

{
  echo "# GPU speed (issue 12)"
  echo
  cat "$OUT/machine.md"
  for preset in $PRESETS; do
    echo
    echo "## $preset: training step"
    echo
    cat "$OUT/lora_step_$preset.md"
    echo
    echo "## $preset: routing-profiling overhead"
    echo
    cat "$OUT/profile_overhead_$preset.md"
  done
} > "$OUT/gpu_speed.md"
echo "wrote $OUT/gpu_speed.md" >&2
