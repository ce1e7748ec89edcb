#!/usr/bin/env bash
# Print one SHA-256 over the files that containers/Dockerfile.cpu builds the package from:
# pyproject.toml, constraints.txt and src/ (without __pycache__, *.pyc, *.egg-info), i.e.
# the build context that containers/Dockerfile.cpu.dockerignore lets through, less the
# torch wheel, and over the Dockerfile itself (a changed recipe is a changed image).
#
#   containers/source-hash.sh            # from anywhere in the repository
#
# containers/build.sh stores it in the image as the label org.qmriflow.source-hash;
# tests/test_container.py compares it with the working tree's to tell a current image
# from one built before the sources changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
{
    find src \( -type d \( -name __pycache__ -o -name '*.egg-info' \) -prune \) \
        -o \( -type f ! -name '*.pyc' -print \)
    echo pyproject.toml
    echo constraints.txt
    echo containers/Dockerfile.cpu
} | LC_ALL=C sort | while IFS= read -r f; do
    printf '%s  %s\n' "$(sha256sum <"$f" | cut -d' ' -f1)" "$f"
done | sha256sum | cut -d' ' -f1
