#!/usr/bin/env bash
# Install mpotn (editable) with its test tools into the active Python environment.
# torch is installed first as 2.13.0 when missing: on machines whose pip offers a
# local CPU wheel of that version (the project's CI machines) it takes that one,
# where a plain `torch` would pull gigabytes of CUDA packages; elsewhere pip takes
# its index's default build (install torch from download.pytorch.org/whl/cpu first
# for a CPU-only one). Every other requirement accepts 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[test]"
