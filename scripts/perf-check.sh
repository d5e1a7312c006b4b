#!/usr/bin/env bash
# Perf-regression check (README: "Performance regression check"): builds the
# release forkd-bench (with the independent floor's library, bench/floor, a
# dependency) and compares this tree's same-round ratios to the independent
# floor with bench/baseline.json (to the no-isolation reference while the
# baseline predates the floor). Prints the comparison table; exits 1 only on
# a confirmed regression (3 if the check could not measure).
# Extra arguments go to `forkd-bench check`, e.g.
#   scripts/perf-check.sh --update-baseline --reason 'why the figures moved'
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "scripts/perf-check.sh: run as root (the daemon creates namespaces and cgroups)" >&2
    exit 2
fi
scripts/venv.sh
cargo build --release --quiet -p forkd-bench -p forkd-zygote
# Bounded: ~2 minutes normally, ~4 when a suspected regression is re-measured.
exec timeout --kill-after=30 600 target/release/forkd-bench check \
    --python "$PWD/.venv/bin/python" --baseline bench/baseline.json "$@"
