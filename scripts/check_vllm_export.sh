#!/usr/bin/env bash
# Install vLLM into a SEPARATE venv (it pins its own torch/transformers) and run check_vllm_export.py there.
#
#   scripts/check_vllm_export.sh EXPORT_DIR [--reference REF.safetensors]
#
# VLLM_VENV (default /tmp/vllm-venv), VLLM_SPEC (default vllm==0.33.0).
# VLLM_NO_DEPS=1: install the vllm wheel without its dependencies on top of the system torch/transformers
# (--system-site-packages), adding only the small pure-Python packages its LoRA modules import. That is the
# route on a CPU box where vLLM's CUDA torch pin cannot be used; on a GPU machine leave it unset.
set -euo pipefail
VENV=${VLLM_VENV:-/tmp/vllm-venv}
SPEC=${VLLM_SPEC:-vllm==0.33.0}
HERE=$(cd "$(dirname "$0")" && pwd)
if [ ! -x "$VENV/bin/python" ]; then
  if [ "${VLLM_NO_DEPS:-0}" = 1 ]; then
    python -m venv --system-site-packages "$VENV"
  else
    python -m venv "$VENV"
  fi
fi
# the project's pip constraints pin torch for the main environment; this venv is separate
export PIP_CONSTRAINT=""
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  if [ "${VLLM_NO_DEPS:-0}" = 1 ]; then
    "$VENV/bin/pip" install --no-deps "$SPEC"
    "$VENV/bin/pip" install ${VLLM_EXTRA_DEPS:-}
  else
    "$VENV/bin/pip" install "$SPEC"
  fi
fi
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
exec "$VENV/bin/python" "$HERE/check_vllm_export.py" "$@"
