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
# The rootless tests map a subordinate id range with newuidmap/newgidmap.
if ! command -v newuidmap >/dev/null || ! command -v newgidmap >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq uidmap
fi
export FORKD_TEST_PYTHON="$PWD/.venv/bin/python"
# forkd/tests/mcp.rs pip-installs the MCP Python client; here its absence fails instead of skipping.
export FORKD_TEST_REQUIRE_MCP_CLIENT=1
cargo build --workspace --all-targets --quiet
log=target/test-output.log
status=0
# --no-fail-fast: every test binary runs, so the closing count is complete.
cargo test --workspace --no-fail-fast --quiet 2>&1 | tee "$log" || status=$?
# The benchmark harness must not rot: a quick run against a real daemon
# (correctness only: it fails if any spawn returns the wrong output).
cargo run --quiet -p forkd-bench --bin forkd-bench -- --quick --python "$FORKD_TEST_PYTHON" || status=$?
# The session figures' scenarios (create, cells, streaming, idle sessions, files) must not rot.
cargo run --quiet -p forkd-bench --bin forkd-bench -- sessions --quick --python "$FORKD_TEST_PYTHON" || status=$?
# CPython's regrtest, a fixed sample of 25 modules, outside vs inside forkd:
# fails when one passes outside and not inside (docs/fidelity.md).
timeout 600 scripts/regrtest-inside.sh --sample 2>&1 | tail -n 8 || status=$?
# Python client (clients/python): unittest against a real daemon.
"$FORKD_TEST_PYTHON" -m unittest discover -s clients/python/tests -v 2>&1 | tee -a "$log" || status=$?
# Deployment files, offline (no cluster, no systemd needed): the Kubernetes
# manifests against the API schemas in strict mode, a misspelt copy that must
# be rejected, the shipped forkd.toml files through `forkd --check-config`.
# Installs its validator (PyPI kubernetes-validate) into target/deploy-venv.
timeout 900 packaging/validate.sh || status=$?
# compare-all (compare/) must not rot: its quick mode against real forkd daemons and cold python
# (no Docker needed). It exits non-zero unless every sandbox's output is verified; bounded by timeout.
timeout 120 compare/compare-all --quick --backends forkd,forkd-nopool,python --python "$FORKD_TEST_PYTHON" \
    --forkd-bin target/debug/forkd --no-chart --out target/compare-quick || status=$?
# cgroup v2 limits for real. This machine's cgroups are v1 hybrid, so a
# Debian guest (qemu, software emulation) with a pure cgroup2 hierarchy runs
# the limits, rootless and cgroup tests: a few minutes, more on the first run,
# which builds the cached guest image (tests/vm/cgroup-v2-vm.sh). Its
# `test result:` lines go into the log and count below. Exit 77 means the
# machine cannot run a guest at all (or FORKD_VM=off): said loudly, not a
# failure; a guest that fails or does not report fails the suite.
vm_status=0
tests/vm/cgroup-v2-vm.sh 2>&1 | tee -a "$log" || vm_status=$?
if [ "$vm_status" != 0 ] && [ "$vm_status" != 77 ]; then
    status=$vm_status
fi
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
