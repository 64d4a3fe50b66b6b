#!/usr/bin/env bash
# Install torchmix and its test dependencies into the current Python environment.
# torch is installed first (CPU-friendly pinned release) only where it is absent, so that an
# existing CUDA build is kept and a bare requirement never pulls a multi-GB build by accident.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test]"
