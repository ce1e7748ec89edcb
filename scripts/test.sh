#!/usr/bin/env bash
# The README's test command: fresh virtual environment, everything from the project's own
# files (constraints.txt pins the torch version; pip takes the local CPU wheel), then the whole
# test suite (incl. ruff and snakemake --lint). Usage: bash scripts/test.sh [pytest args]
#
# As root on Debian (as on CI) it first installs the system tools the tests use: podman, runc
# and debootstrap (the container image), chromium (report screenshots), slurm-wlm and munge
# (a real local SLURM cluster). When podman is there, the CPU image is built in the background
# if it is missing or older than the sources (containers/build.sh, ~8 min from scratch), while
# the other tests run; tests/test_container.py runs last and waits for it.
# With CI=true (.ci/run sets it) a missing tool or image fails its tests instead of skipping.
# QMRIFLOW_CONTAINER_TEST=0 leaves the image and its tests out (they skip, also under CI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
log() { echo "scripts/test.sh: $*" >&2; }

# --- system tools (root + apt-get only) --------------------------------------------------
want=()
command -v podman >/dev/null 2>&1 || want+=(podman)
command -v runc >/dev/null 2>&1 || want+=(runc)
command -v debootstrap >/dev/null 2>&1 || want+=(debootstrap)
command -v chromium >/dev/null 2>&1 || want+=(chromium)
command -v slurmctld >/dev/null 2>&1 || want+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || want+=(munge)
if [ "${#want[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing ${want[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 \
           && apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null 2>&1; } \
      || log "could not install ${want[*]} with apt-get (their tests skip, or fail under CI=true)"
  else
    log "not installed: ${want[*]} (needs root and apt-get; their tests skip, or fail under CI=true)"
  fi
fi

# --- the CPU image, in the background --------------------------------------------------------
if [ "${QMRIFLOW_CONTAINER_TEST:-}" != 0 ] && command -v podman >/dev/null 2>&1 \
   && command -v runc >/dev/null 2>&1; then
  mkdir -p .ci-logs
  version=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
  built=$(containers/podman.sh image inspect --format '{{ index .Labels "org.qmriflow.source-hash" }}' \
            "qmriflow-cpu:$version" 2>/dev/null || true)
  if [ "$built" != "$(containers/source-hash.sh)" ]; then
    status="$PWD/.ci-logs/image-build.status"
    echo running > "$status"
    log "building the CPU image qmriflow-cpu:$version in the background (.ci-logs/image-build.log)"
    ( set +e; containers/build.sh > .ci-logs/image-build.log 2>&1; echo $? > "$status" ) &
    export QMRIFLOW_IMAGE_BUILD_STATUS="$status"
  fi
  if [ "${CI:-}" = true ]; then
    export QMRIFLOW_CONTAINER_TEST=1
  fi
fi

# --- Python ------------------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
rc=0
.venv/bin/python -m pytest --durations=30 "$@" || rc=$?
wait  # a background image build still going (tests interrupted early)
exit "$rc"
