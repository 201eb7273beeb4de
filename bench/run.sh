#!/usr/bin/env bash
# The benchmark (issue #4 section 3): set up .venv, install the bench-only requirements, run.
#   bench/run.sh                       # compute + overhead, full sweep (about 9 min on 2 CPU cores)
#   bench/run.sh --quick               # smoke run
#   bench/run.sh --config unet --help  # every option
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
exec .venv/bin/python -m bench.run_bench "$@"
