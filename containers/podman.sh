#!/usr/bin/env bash
# podman with a configuration that works on this kind of host:
#
#   containers/podman.sh ARGS...        # same arguments as podman, e.g.
#   containers/podman.sh run --rm qmriflow-cpu:0.1.0 qmriflow --help
#   containers/podman.sh --print-conf   # print the generated containers.conf, run nothing
#
# Unless CONTAINERS_CONF is already set, it writes a containers.conf and points podman at it:
#
#   [engine] runtime = "runc", cgroup_manager = "cgroupfs"
#       crun fails on hosts with hybrid (v1) cgroups; runc works. cgroupfs because there
#       is no systemd here to manage cgroups.
#   [containers] default_ulimits = ["nofile=N:N", "nproc=M:M"]
#       Without CAP_SYS_RESOURCE (sandboxes, some CI runners) a container cannot get
#       rlimits above the caller's. podman asks by default for nofile = nproc = 1048576,
#       and lowers its own RLIMIT_NPROC to 32768 before it starts runc, so the container
#       would fail with "runc create failed: ... error setting rlimit type 6 (nproc) / 7
#       (nofile): operation not permitted". N is this shell's hard nofile limit and M the
#       smaller of its hard nproc limit and 32768, which always fit.
#
# STORAGE_DRIVER=vfs (or another driver) is passed on as `podman --storage-driver`, for hosts
# where podman's default overlay storage does not work (inside another container, overlayfs
# root). podman refuses a driver other than the one its store was created with: reset the
# store first (`podman system reset`) or give a separate one with CONTAINERS_STORAGE_CONF.
#
# These settings are harmless on an ordinary host. Put them in /etc/containers/containers.conf
# (or ~/.config/containers/containers.conf) to use plain `podman` instead of this wrapper.
# containers/build.sh and tests/test_container.py call podman through this script.

set -euo pipefail

hard_nofile="$(ulimit -Hn)"
hard_nproc="$(ulimit -Hu)"
[ "$hard_nofile" = unlimited ] && hard_nofile=1048576
if [ "$hard_nproc" = unlimited ] || [ "$hard_nproc" -gt 32768 ]; then
    hard_nproc=32768
fi

conf_text() {
    cat <<EOF
[containers]
default_ulimits = ["nofile=$hard_nofile:$hard_nofile", "nproc=$hard_nproc:$hard_nproc"]

[engine]
EOF
    if command -v runc >/dev/null 2>&1; then
        echo 'runtime = "runc"'
    fi
    echo 'cgroup_manager = "cgroupfs"'
}

if [ "${1:-}" = "--print-conf" ]; then
    conf_text
    exit 0
fi

if [ -z "${CONTAINERS_CONF:-}" ]; then
    conf_dir="${TMPDIR:-/tmp}/qmriflow-podman-$(id -u)"
    mkdir -p "$conf_dir"
    conf="$conf_dir/containers.conf"
    tmp="$(mktemp "$conf_dir/containers.conf.XXXXXX")"
    conf_text >"$tmp"
    mv -f "$tmp" "$conf"
    export CONTAINERS_CONF="$conf"
fi

exec podman ${STORAGE_DRIVER:+--storage-driver "$STORAGE_DRIVER"} "$@"
