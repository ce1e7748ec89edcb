#!/usr/bin/env bash
# The README's test command: fresh virtual environment, everything from the project's own
# files (constraints.txt pins the CPU torch build), then the whole test suite (incl. ruff
# and snakemake --lint). Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
exec .venv/bin/python -m pytest --durations=30 "$@"
