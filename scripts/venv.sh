#!/usr/bin/env bash
# Provides the zygotes' interpreter: a project-local venv (.venv) with numpy
# (and matplotlib, for the tests of figures returned as PNG), created on first
# run from the python3 on PATH. Idempotent and quiet when done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FORKD_VENV:-.venv}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import numpy' 2>/dev/null; then
    if ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
        echo "scripts/venv.sh: adding matplotlib to $VENV" >&2
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check matplotlib
    fi
    exit 0
fi
# Resolve the real interpreter behind shims (pyenv's shim is a shell script).
BASE=$(python3 -c 'import sys; print(sys.executable)')
if ! "$BASE" -m venv --help >/dev/null 2>&1; then
    echo "scripts/venv.sh: $BASE has no venv module; installing python3-venv" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi
echo "scripts/venv.sh: creating $VENV with numpy and matplotlib (first run only)" >&2
rm -rf "$VENV"
"$BASE" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check numpy matplotlib
"$VENV/bin/python" -c 'import numpy; print("scripts/venv.sh: numpy", numpy.__version__, "ready in '"$VENV"'")' >&2
