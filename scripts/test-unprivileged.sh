#!/usr/bin/env bash
# The unprivileged test tier: `cargo test --workspace` as a plain user. Tests
# that need root (namespaces, cgroups, creating users) must print
# `skipped: needs root (...)` and pass; any failure fails this tier.
#
# Run as root (CI does): it creates the user FORKD_TEST_USER (default
# forkdtest) if missing and lends it this machine's Rust toolchain read-only
# through a private mount namespace (rustup and cargo usually live under
# /root, which other users cannot enter); nothing on the host changes but the
# user and target/unprivileged, the user's build directory (a full debug build
# the first time, ~10 min on 2 busy cores; incremental after). Run as an
# ordinary user, it just runs the tier with that user's own toolchain.
# Bounded by FORKD_UNPRIVILEGED_TIMEOUT seconds (default 1800).
set -euo pipefail
cd "$(dirname "$0")/.."
limit=${FORKD_UNPRIVILEGED_TIMEOUT:-1800}
if [ "$(id -u)" != 0 ]; then
    exec timeout "$limit" cargo test --workspace --locked --no-fail-fast
fi

user=${FORKD_TEST_USER:-forkdtest}
id -u "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
home=$(getent passwd "$user" | cut -d: -f6)
repo=$PWD
target=$repo/target/unprivileged
mkdir -p "$target"
chown -R "$user:" "$target"
log=$repo/target/unprivileged-test.log

cargo_home=${CARGO_HOME:-$HOME/.cargo}
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
# Fixed mount points (stable paths keep the build cache valid between runs).
lend=$home/.forkd-toolchain
mkdir -p "$lend/cargo" "$lend/rustup"
python=${FORKD_TEST_PYTHON:-$repo/.venv/bin/python}

# Inside the namespace: bind the toolchain read-only at the mount points,
# then become the user. The mounts vanish with the namespace.
status=0
unshare --mount --propagation private -- bash -euo pipefail -c '
    lend=$1 cargo_home=$2 rustup_home=$3 user=$4 home=$5 target=$6 python=$7 limit=$8
    for pair in "$cargo_home:$lend/cargo" "$rustup_home:$lend/rustup"; do
        mount --bind "${pair%%:*}" "${pair#*:}"
        mount -o remount,bind,ro "${pair#*:}"
    done
    exec runuser -u "$user" -- env -i \
        HOME="$home" USER="$user" PATH="$lend/cargo/bin:/usr/local/bin:/usr/bin:/bin" \
        CARGO_HOME="$lend/cargo" RUSTUP_HOME="$lend/rustup" CARGO_TARGET_DIR="$target" \
        CARGO_TERM_COLOR=never FORKD_TEST_PYTHON="$python" \
        timeout "$limit" cargo test --workspace --locked --offline --no-fail-fast
' forkd-unprivileged "$lend" "$cargo_home" "$rustup_home" "$user" "$home" "$target" "$python" "$limit" \
    2>&1 | tee "$log" || status=$?
# Skips are printed past the harness's capture, so they can be counted.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     /skipped: / { s++ }
     END { printf "unprivileged tier: %d passed, %d failed; %d skip notices (tests that need root or a cgroup layout this host lacks)\n", p, f, s }' "$log"
exit "$status"
