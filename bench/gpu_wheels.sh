#!/usr/bin/env bash
# Fill bench/wheels/ (git-ignored) with the wheels bench/gpu.sh may need on a GPU machine without
# network: bench/gpu-requirements.txt and their dependencies, for that machine's Python and Linux
# x86_64; and, when asked, the torchvision that matches the GPU machine's torch. Run it where there
# is network, then carry bench/wheels with the checkout (about 40 MB).
#   bench/gpu_wheels.sh [PYTHON_VERSION] [TORCHVISION_SPEC]
#   bench/gpu_wheels.sh 3.11                                   # the default: this machine's Python
#   bench/gpu_wheels.sh 3.12 "torchvision==0.26.0+cu130 --index-url https://download.pytorch.org/whl/cu130"
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
pyver="${1:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
mkdir -p bench/wheels
"$PY" -m pip download --quiet --disable-pip-version-check --dest bench/wheels --only-binary=:all: \
    --python-version "$pyver" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform linux_x86_64 -r bench/gpu-requirements.txt
if [ -n "${2:-}" ]; then
    # shellcheck disable=SC2086
    "$PY" -m pip download --quiet --disable-pip-version-check --dest bench/wheels --only-binary=:all: --no-deps \
        --python-version "$pyver" --implementation cp --platform manylinux_2_28_x86_64 --platform linux_x86_64 $2
fi
du -sh bench/wheels
