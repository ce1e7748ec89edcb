#!/usr/bin/env bash
# The README's demo command: fresh virtual environment, then `qmriflow demo` (generates a
# small phantom archive in ./demo and runs the workflow on it with 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -c constraints.txt -e .
exec .venv/bin/qmriflow demo --out demo --cores "${CORES:-2}" "$@"
