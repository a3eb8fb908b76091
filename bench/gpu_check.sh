#!/usr/bin/env bash
# The device check on a GPU machine, with the machine's own Python and torch (any 2.x
# with CUDA; docs/gpu.md, "The device check"):
#
#   bench/gpu_check.sh [--wheelhouse DIR] [bench/gpu_check.py flags, e.g. --json]
#
# 1. $PYTHON (default python3) must import torch; its version, CUDA and GPU are printed.
# 2. A venv that sees that Python's packages (--system-site-packages: torch shows
#    through) gets the project's other dependencies from the wheelhouse
#    (bench/gpu_wheelhouse.sh builds it; default DIR: wheelhouse/ at the repository
#    root), offline, unless they import already. Nothing is downloaded here.
# 3. bench/gpu_check.py runs from the source tree (no install), under a time limit
#    ($LLMESH_GPU_CHECK_TIMEOUT_S, default 540 s); its exit status is this script's:
#    0 all tokens exact, 1 some differ, 2 no usable torch / GPU / wheelhouse.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
wheelhouse="$ROOT/wheelhouse"
if [ "${1:-}" = --wheelhouse ]; then
  wheelhouse="$2"
  shift 2
fi

if ! "$PY" -c '
import sys, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"gpu_check: python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, GPU {gpu}")
sys.exit(0 if sys.version_info >= (3, 11) and torch.__version__.startswith("2.") else 1)
'; then
  echo "gpu_check: $PY needs Python >= 3.11 and torch 2.x (set PYTHON to another)" >&2
  exit 2
fi

venv="${LLMESH_GPU_CHECK_VENV:-${TMPDIR:-/tmp}/llmesh-gpu-check-venv}"
[ -x "$venv/bin/python" ] || "$PY" -m venv --system-site-packages "$venv"
needed="import grpc, grpc_health, transformers, safetensors, tokenizers, structlog, numpy, \
opentelemetry.sdk, opentelemetry.exporter.otlp.proto.grpc, prometheus_client, starlette, \
uvicorn, jinja2, cryptography, rich"
if ! "$venv/bin/python" -c "$needed" 2>/dev/null; then
  if [ ! -f "$wheelhouse/requirements.txt" ]; then
    echo "gpu_check: no wheelhouse at $wheelhouse (bench/gpu_wheelhouse.sh builds one)" >&2
    exit 2
  fi
  echo "gpu_check: installing the project's dependencies from $wheelhouse" >&2
  "$venv/bin/python" -m pip install --disable-pip-version-check --no-index \
    --find-links "$wheelhouse" -r "$wheelhouse/requirements.txt" >&2
fi

cd "$ROOT"
exec timeout "${LLMESH_GPU_CHECK_TIMEOUT_S:-540}" "$venv/bin/python" -m bench.gpu_check "$@"
