#!/usr/bin/env bash
# Build the qmriflow CPU image locally with podman, in one command:
#
#   containers/build.sh [--rebuild-base] [-- EXTRA_PODMAN_BUILD_ARGS...]
#
# What it does:
#   1. Makes sure the Debian base image local/debian:bookworm exists. If not, it is built
#      with `debootstrap --variant=minbase bookworm` from the Debian mirror this machine's
#      apt already uses (read from /etc/apt/sources.list or /etc/apt/sources.list.d/),
#      given bookworm-updates and bookworm-security sources (the image build upgrades from
#      them), and imported with `podman import` (no registry pull needed).
#   2. Copies the local CPU torch wheel (torch-<pin>+cpu-*.whl from /opt/wheels, <pin> read
#      from constraints.txt) into containers/wheels/, the only place a build can see it.
#   3. Runs
#        podman build --secret id=pipca,src=/etc/ssl/certs/ca-certificates.crt \
#            --ignorefile containers/Dockerfile.cpu.dockerignore \
#            --build-arg BASE_IMAGE=local/debian:bookworm --build-arg VERSION=<version> \
#            --build-arg SOURCE_HASH=<output of containers/source-hash.sh> \
#            -f containers/Dockerfile.cpu -t qmriflow-cpu:<version> .
#      from the repository root, <version> being the one in pyproject.toml. The host CA
#      bundle is passed as a build secret: it is used by apt/pip during the build and is
#      never stored in the image.
#
# Requirements: podman and runc (`apt-get install podman runc`), plus debootstrap when the
# base image has to be created (root or sudo for that step). podman is called through
# containers/podman.sh, which (unless CONTAINERS_CONF is already set) gives it a
# containers.conf with runtime = "runc" (crun fails on hosts with hybrid cgroups),
# cgroup_manager = "cgroupfs" and nofile/nproc ulimits that the host can grant.
# Storage: podman's default overlay driver; where overlay is not available (e.g. inside
# another container) run with STORAGE_DRIVER=vfs (slower, more disk; see containers/podman.sh).
#
# Environment overrides:
#   BASE_IMAGE      base image tag            (default local/debian:bookworm)
#   DEBIAN_MIRROR   mirror for debootstrap    (default: detected from apt sources)
#   DEBIAN_SECURITY_MIRROR  security mirror   (default: detected, or deb.debian.org)
#   WHEEL_DIR       where local wheels live   (default /opt/wheels)
#   PIP_CA_BUNDLE   CA bundle for the secret  (default /etc/ssl/certs/ca-certificates.crt)
#   IMAGE_NAME      image name                (default qmriflow-cpu)
#   KEEP_OLD_IMAGES 1: keep the images earlier builds left (default: removed, step 4)

set -euo pipefail

usage() {
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"
}

die() {
    echo "build.sh: error: $*" >&2
    exit 1
}

log() {
    echo "build.sh: $*" >&2
}

rebuild_base=0
extra_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help)
            usage
            exit 0
            ;;
        --rebuild-base)
            rebuild_base=1
            shift
            ;;
        --)
            shift
            extra_args=("$@")
            break
            ;;
        *)
            usage >&2
            die "unknown argument: $1"
            ;;
    esac
done

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

BASE_IMAGE="${BASE_IMAGE:-local/debian:bookworm}"
WHEEL_DIR="${WHEEL_DIR:-/opt/wheels}"
PIP_CA_BUNDLE="${PIP_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
IMAGE_NAME="${IMAGE_NAME:-qmriflow-cpu}"

command -v podman >/dev/null 2>&1 || die "podman not found (apt-get install podman runc)"
command -v runc >/dev/null 2>&1 || die "runc not found (apt-get install runc)"

# Root, or sudo, for debootstrap and for reading the root-owned tree it creates.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "'$1' needs root; run as root or install sudo"
    fi
}

# ---------------------------------------------------------------------------------------
# Package version from pyproject.toml ([project] version).
# ---------------------------------------------------------------------------------------
read_version() {
    if command -v python3 >/dev/null 2>&1 &&
        python3 -c 'import tomllib' >/dev/null 2>&1; then
        python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])'
    else
        # Fallback: first `version = "..."` line after the [project] header.
        awk '/^\[project\]/ { p = 1; next } /^\[/ { p = 0 }
             p && /^version[ \t]*=/ { gsub(/^version[ \t]*=[ \t]*"|".*$/, ""); print; exit }' \
            pyproject.toml
    fi
}

version="$(read_version)"
[ -n "$version" ] || die "could not read the version from pyproject.toml"

# ---------------------------------------------------------------------------------------
# Podman configuration for this machine (runc, cgroupfs, ulimits).
# ---------------------------------------------------------------------------------------
tmp_dir="$(mktemp -d "${TMPDIR:-/tmp}/qmriflow-build.XXXXXX")"
rootfs=""
cleanup() {
    if [ -n "$rootfs" ] && [ -d "$rootfs" ]; then
        as_root rm -rf "$rootfs"
    fi
    rm -rf "$tmp_dir"
}
trap cleanup EXIT

# podman with this host's settings (see containers/podman.sh).
podman() {
    "$repo_root/containers/podman.sh" "$@"
}
if [ -z "${CONTAINERS_CONF:-}" ]; then
    log "podman through containers/podman.sh: $("$repo_root/containers/podman.sh" --print-conf |
        grep -E '^(runtime|cgroup_manager|default_ulimits)' | tr '\n' ' ')"
else
    log "using podman configuration from CONTAINERS_CONF=$CONTAINERS_CONF"
fi

# ---------------------------------------------------------------------------------------
# Debian mirror that apt already uses on this machine (for debootstrap).
# ---------------------------------------------------------------------------------------
detect_mirror() {
    # $1: suite (bookworm, bookworm-security); $2: fallback URI.
    local suite="$1" fallback="$2" f uri
    # One-line format: deb [options] URI SUITE COMPONENTS...
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        uri="$(awk -v suite="$suite" '$1 == "deb" {
                    i = 2
                    if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                    if ($(i + 1) == suite) { print $i; exit }
                }' "$f")"
        if [ -n "$uri" ]; then
            echo "$uri"
            return 0
        fi
    done
    # deb822 format (*.sources): first URI of an enabled "deb" stanza with suite bookworm.
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        uri="$(awk -v suite="$suite" 'BEGIN { RS = ""; FS = "\n" }
                {
                    types = ""; uris = ""; suites = ""; enabled = "yes"
                    for (i = 1; i <= NF; i++) {
                        line = $i
                        if (line ~ /^[ \t]*#/) continue
                        if (match(line, /^Types:/))   types   = substr(line, RLENGTH + 1)
                        if (match(line, /^URIs:/))    uris    = substr(line, RLENGTH + 1)
                        if (match(line, /^Suites:/))  suites  = substr(line, RLENGTH + 1)
                        if (match(line, /^Enabled:/)) enabled = substr(line, RLENGTH + 1)
                    }
                    if (types ~ /(^|[ \t])deb([ \t]|$)/ && enabled !~ /no/ &&
                        index(" " suites " ", " " suite " ") > 0) {
                        n = split(uris, u, /[ \t]+/)
                        for (j = 1; j <= n; j++) if (u[j] != "") { print u[j]; exit }
                    }
                }' "$f")"
        if [ -n "$uri" ]; then
            echo "$uri"
            return 0
        fi
    done
    echo "$fallback"
}

# ---------------------------------------------------------------------------------------
# 1. Base image.
# ---------------------------------------------------------------------------------------
build_base() {
    command -v debootstrap >/dev/null 2>&1 ||
        die "debootstrap not found (apt-get install debootstrap) - needed to create $BASE_IMAGE"
    local mirror="${DEBIAN_MIRROR:-$(detect_mirror bookworm http://deb.debian.org/debian)}"
    local security="${DEBIAN_SECURITY_MIRROR:-$(detect_mirror bookworm-security \
        http://deb.debian.org/debian-security)}"
    rootfs="$(mktemp -d /var/tmp/qmriflow-rootfs.XXXXXX)"
    log "creating $BASE_IMAGE with debootstrap from $mirror"
    as_root debootstrap --variant=minbase bookworm "$rootfs" "$mirror"
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
        "$mirror" "$mirror" "$security" | as_root tee "$rootfs/etc/apt/sources.list" >/dev/null
    as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/lib/apt/lists/*
    # /dev, /proc and /sys are provided by the container runtime.
    as_root tar -C "$rootfs" --numeric-owner \
        --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -c . |
        podman import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["/bin/bash"]' \
            - "$BASE_IMAGE"
    as_root rm -rf "$rootfs"
    rootfs=""
}

if [ "$rebuild_base" -eq 1 ] || ! podman image exists "$BASE_IMAGE"; then
    case "$BASE_IMAGE" in
        local/*) build_base ;;
        *) log "base image $BASE_IMAGE is not local; podman will pull it" ;;
    esac
else
    log "base image $BASE_IMAGE exists"
fi

# ---------------------------------------------------------------------------------------
# 2. Local CPU torch wheel into the build context (containers/wheels/, git-ignored).
# ---------------------------------------------------------------------------------------
mkdir -p containers/wheels
torch_pin="$(sed -n 's/^[ \t]*torch[ \t]*==[ \t]*\([^ \t;#]*\).*/\1/p' constraints.txt | head -n 1)"
if [ -n "$torch_pin" ]; then
    shopt -s nullglob
    wheels=("$WHEEL_DIR"/torch-"$torch_pin"+cpu-*.whl)
    shopt -u nullglob
    if [ "${#wheels[@]}" -gt 0 ]; then
        log "copying ${wheels[*]} into containers/wheels/"
        cp -u -- "${wheels[@]}" containers/wheels/
    else
        log "no torch-$torch_pin+cpu wheel in $WHEEL_DIR; the build needs another source" \
            "for the CPU build (e.g. -- --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu)"
    fi
fi

# ---------------------------------------------------------------------------------------
# 3. Build.
# ---------------------------------------------------------------------------------------
secret_args=()
if [ -r "$PIP_CA_BUNDLE" ]; then
    secret_args=(--secret "id=pipca,src=$PIP_CA_BUNDLE")
else
    log "no CA bundle at $PIP_CA_BUNDLE; building without the pipca secret"
fi

tag="$IMAGE_NAME:$version"
source_hash="$(containers/source-hash.sh)"
log "building $tag (sources $source_hash)"
# the same arguments build the image and (step 4) tag its build stage
build_args=(
    "${secret_args[@]}"
    --ignorefile containers/Dockerfile.cpu.dockerignore
    --build-arg "BASE_IMAGE=$BASE_IMAGE"
    --build-arg "VERSION=$version"
    --build-arg "SOURCE_HASH=$source_hash"
    -f containers/Dockerfile.cpu
)
start=$SECONDS
podman build "${build_args[@]}" -t "$tag" "${extra_args[@]}" .
size="$(podman image inspect --format '{{.Size}}' "$tag")"
log "built $tag in $((SECONDS - start)) s, $((size / 1000000)) MB"

# ---------------------------------------------------------------------------------------
# 4. Images that earlier builds left behind (2.3-2.5 GB each; they filled a CI runner's
#    disk): the build stage is tagged $IMAGE_NAME-build:$version (a cache hit, seconds),
#    so that it stays as the layer cache of the next build, and then the untagged images
#    of this Dockerfile - earlier build stages (label org.qmriflow.stage=build) and earlier
#    final images (label org.qmriflow.source-hash) - are removed. Other images are not
#    touched. KEEP_OLD_IMAGES=1 skips this step.
# ---------------------------------------------------------------------------------------
if [ "${KEEP_OLD_IMAGES:-0}" != 1 ]; then
    podman build "${build_args[@]}" --target build -t "$IMAGE_NAME-build:$version" \
        "${extra_args[@]}" . >/dev/null
    before="$(podman images -a -q | wc -l)"
    podman image prune -f --filter label=org.qmriflow.stage=build >/dev/null
    podman image prune -f --filter label=org.qmriflow.source-hash >/dev/null
    log "removed $((before - $(podman images -a -q | wc -l))) images left by earlier builds;" \
        "the build stage (layer cache) is $IMAGE_NAME-build:$version"
fi
