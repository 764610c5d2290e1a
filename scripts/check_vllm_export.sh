#!/usr/bin/env bash
# Prove the vLLM export against vLLM's own LoRA loading and MoE packing code (scripts/check_vllm_export.py).
#
#   scripts/check_vllm_export.sh [OUT_DIR] [prepare options, e.g. --layers 16 --router --families olmoe,gpt_oss]
#
# vLLM pins its own torch/transformers, so it goes into a SEPARATE venv (VLLM_VENV, default /tmp/vllm-venv):
# the project's python writes the exports and the merge references, the venv's python loads them with vLLM.
# VLLM_SPEC (default vllm==0.32.0, the version checked on 2026-11-24).
# VLLM_FULL=1: a normal `pip install $VLLM_SPEC` with its CUDA torch (a GPU machine). Default: CPU route, the
# vllm wheel without its dependencies on top of the system torch (--system-site-packages) plus the
# pure-Python packages its LoRA modules import; vLLM's compiled kernels are not needed for loading and packing.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-/tmp/moe-sieve-vllm-check}
shift || true
VENV=${VLLM_VENV:-/tmp/vllm-venv}
SPEC=${VLLM_SPEC:-vllm==0.32.0}
export PIP_CONSTRAINT=""  # the project's pip constraints pin the main environment, not this venv
if [ ! -x "$VENV/bin/python" ]; then
  if [ "${VLLM_FULL:-0}" = 1 ]; then python -m venv "$VENV"; else python -m venv --system-site-packages "$VENV"; fi
fi
if ! "$VENV/bin/python" -c "import vllm.lora.model_manager" 2>/dev/null; then
  if [ "${VLLM_FULL:-0}" = 1 ]; then
    "$VENV/bin/pip" install "$SPEC"
  else
    "$VENV/bin/pip" install --no-deps "$SPEC"
    "$VENV/bin/pip" install cbor2 pyzmq openai-harmony openai pybase64 cachetools msgspec uvloop prometheus_client \
      xgrammar fastapi partial_json_parser llguidance einops "transformers>=5.16.1,<5.21"
    # a torchvision built for another torch breaks `import transformers` image utilities; loading LoRA needs none
    "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
fi
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
PYTHONPATH="$HERE/../src${PYTHONPATH:+:$PYTHONPATH}" python "$HERE/check_vllm_export.py" prepare "$OUT" "$@"
exec "$VENV/bin/python" "$HERE/check_vllm_export.py" check "$OUT"
