#!/usr/bin/env bash
# The GPU check of issue 16 in one command, for a GPU machine without network that has python and
# torch with CUDA but not the service's other dependencies:
#   1. install what is missing from the wheels in bench/wheels/ (filled beforehand by bench/gpu_wheels.sh
#      on a machine with network, then carried along with the checkout); never torch itself;
#   2. the GPU test tier: pytest -m gpu tests/gpu;
#   3. the side-by-side bench (python -m bench.gpu_suite): JSON and plots into bench/results/.
# Fits in 8 minutes on one H100/H200-class GPU.
#
#   bench/gpu.sh                         # on the GPU machine
#   bench/gpu.sh --cpu-smoke --out-dir D # shrunk, on a CPU: tests this script (tests/e2e/test_gpu_script.py)
# Environment: PYTHON (default python3, or .venv/bin/python when it exists), MODSERVE_WHEELS (default bench/wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WHEELS="${MODSERVE_WHEELS:-bench/wheels}"
smoke=""
out_dir="bench/results"
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) smoke="--cpu-smoke"; shift ;;
        --out-dir) out_dir="$2"; shift 2 ;;
        *) echo "gpu.sh: unknown option $1 (use --cpu-smoke, --out-dir DIR)" >&2; exit 2 ;;
    esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "gpu.sh: [1/3] dependencies ($PYTHON)"
"$PYTHON" -c 'import torch; print("gpu.sh: torch", torch.__version__, "cuda", torch.cuda.is_available())'
if [ -z "$smoke" ] && ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: no CUDA device here; use --cpu-smoke on a CPU" >&2
    exit 3
fi
skip=""
if [ -n "$smoke" ]; then skip="--skip litserve"; fi  # the shrunk run has no LitServe
# shellcheck disable=SC2086
missing="$("$PYTHON" -m bench.gpu_deps missing bench/gpu-requirements.txt $skip)"
if [ -n "$missing" ]; then
    echo "gpu.sh: installing from $WHEELS (no network): $missing"
    if [ ! -d "$WHEELS" ]; then
        echo "gpu.sh: $WHEELS does not exist: run bench/gpu_wheels.sh where there is network and carry the folder" >&2
        exit 4
    fi
    set -f  # uvicorn[standard] is a requirement, not a glob
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" $missing
    set +f
fi
if ! "$PYTHON" -c 'import torchvision' 2>/dev/null; then
    # a torchvision wheel must match this machine's torch exactly: install it alone, never a torch with it
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --find-links "$WHEELS" torchvision
fi

echo "gpu.sh: [2/3] GPU test tier"
set +e
"$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/gpu
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
    echo "gpu.sh: the GPU test tier failed (exit $rc); the bench runs anyway" >&2
fi

echo "gpu.sh: [3/3] side-by-side bench"
mkdir -p "$out_dir"
"$PYTHON" -m bench.gpu_suite --out-dir "$out_dir" $smoke
exit "$rc"
