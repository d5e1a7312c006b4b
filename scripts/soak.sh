#!/usr/bin/env bash
# Soak: spawns against a real forkd at concurrency 50, then a leak audit of
# the daemon (RSS, fds, processes, cgroups, network and mount namespaces)
# and of the host after it exits. See bench/src/soak.rs.
#   scripts/soak.sh                              # CI: 5,000 spawns or 50 s of load, whichever first (≤ 90 s in all)
#   scripts/soak.sh --spawns 100000 --max-secs 1800 --sample-secs 5 --max-late-rss-growth-mib 4   # the full soak
# Uses the debug build that scripts/test.sh already made (no second compile).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "scripts/soak.sh: run as root (the daemon creates namespaces and cgroups)" >&2
    exit 2
fi
scripts/venv.sh
cargo build --quiet -p forkd -p forkd-zygote -p forkd-bench
# The CI run is short and mostly allocator warm-up, so its late-growth limit
# is looser; a full soak (--spawns 100000) should pass --max-late-rss-growth-mib 4.
exec target/debug/forkd-soak --python "$PWD/.venv/bin/python" \
    --spawns 5000 --max-secs 50 --concurrency 50 --sample-secs 1 \
    --max-late-rss-growth-mib 8 "$@"
