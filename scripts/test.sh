#!/usr/bin/env bash
# The README's test command: fresh virtual environment, everything from the project's own
# files (constraints.txt pins the CPU torch build), then the whole test suite (incl. ruff
# and snakemake --lint). Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Headless Chromium for the report screenshot test (tests/test_stats.py): the Debian package,
# installed when running as root with apt-get (as on CI); elsewhere that one check skips.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null
then
  apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 \
         && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } \
    || echo "scripts/test.sh: could not install chromium with apt-get (report screenshots skip)"
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
exec .venv/bin/python -m pytest --durations=30 "$@"
