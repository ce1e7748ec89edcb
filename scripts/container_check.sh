#!/usr/bin/env bash
# Build the CPU image and test it against the host: containers/build.sh, then
# tests/test_container.py with QMRIFLOW_CONTAINER_TEST=1 (a missing or stale image fails
# instead of skipping). Takes ~10 min from scratch on 2 cores (~6 min build, ~4 min test);
# a rebuild with unchanged sources reuses the cached layers.
#
#   bash scripts/container_check.sh [BUILD_ARGS...]     # BUILD_ARGS go to containers/build.sh
#
# Needs podman, runc and (the first time, for the base image) debootstrap; see
# containers/README.md. PYTHON (default .venv/bin/python) runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
containers/build.sh "$@"
QMRIFLOW_CONTAINER_TEST=1 exec "${PYTHON:-.venv/bin/python}" -m pytest tests/test_container.py \
    -v -rs
