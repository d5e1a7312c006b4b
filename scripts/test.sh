#!/usr/bin/env bash
# The whole test suite (what CI runs). Needs root: the integration tests start
# real daemons that create namespaces and cgroups.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh: run as root (the tests create namespaces and cgroups)" >&2
    exit 2
fi
scripts/venv.sh
export FORKD_TEST_PYTHON="$PWD/.venv/bin/python"
cargo build --workspace --all-targets --quiet
cargo test --workspace --quiet
