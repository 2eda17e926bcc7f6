#!/usr/bin/env bash
# Install mpotn (editable) with its test tools into the active Python environment.
# torch is installed first as 2.13.0 when missing: that version resolves to the
# local CPU wheel on machines without a GPU, where a plain `torch` would pull
# gigabytes of CUDA packages. Every other requirement accepts 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[test]"
