#!/usr/bin/env bash
# Set up and serve: CPU unless a GPU is present; writes the demo store when the store is empty.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m app --demo-if-empty "$@"
