#!/usr/bin/env bash
# Create .venv and install the project (with test extras when asked); skipped when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
if [ "$extras" = "test" ] && ! command -v chromium >/dev/null 2>&1; then
    # the browser test drives Debian's chromium through Playwright (no browser download)
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "modserve: installing chromium for the browser test" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "modserve: chromium is missing (apt-get install chromium); the browser test will fail under CI" >&2
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=".venv/.modserve-installed${extras:+-$extras}"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "modserve: installing into .venv (first time takes a few minutes: torch is large)" >&2
.venv/bin/python -m pip install --quiet --no-cache-dir --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --no-cache-dir --disable-pip-version-check -e ".${extras:+[$extras]}"
echo "$want" > "$stamp"
