#!/usr/bin/env bash
# cgroup v2 limits for real. The development and CI machines are cgroup v1
# hybrid and their controllers cannot be moved to v2 while they run, so this
# boots a small Debian guest whose only cgroup hierarchy is cgroup2 (all
# controllers) and runs the very same compiled integration tests there:
#   forkd/tests/limits.rs   memory.max OOM kill reported as `killed_by: oom`,
#                           pids limit, timeout, output limit, leak checks
#   forkd/tests/rootless.rs rootless daemon in a delegated cgroup v2 subtree:
#                           limits enforced (OOM, pids) as an unprivileged user
#   forkd/tests/warm.rs     request limits written to a warm child's cgroup
#   forkd/tests/leaks.rs    the leak checks fire (and pass) on cgroup v2
#   cgroup/tests/cgroups.rs the cgroup crate against real v2 controllers
#
# Steps (idempotent): install qemu-system-x86, debootstrap and cpio if missing;
# build the guest image once (Debian kernel + debootstrap rootfs with
# python3-numpy, cached under $FORKD_VM_CACHE keyed by a hash of its inputs);
# build the tests on the host; pack them with tests/vm/init.sh into an
# initramfs overlay; boot with qemu (software emulation: -accel tcg; KVM hangs
# right after the kernel hand-off in the nested VMs this project runs on);
# parse the guest's verdict.
#
# Exit status: 0 all guest tests passed; 1 a test failed or the guest did not
# report (timeout, crash, build failure); 77 this machine cannot run the guest
# at all (no apt / qemu cannot be installed): skipped, said loudly.
# Environment: FORKD_VM=off (skip, loudly), FORKD_VM_CACHE (default /var/cache/forkd-vm),
# FORKD_VM_TIMEOUT (seconds the guest may run, default 900), FORKD_VM_MEMORY
# (default 3G), FORKD_VM_ACCEL (default tcg; kvm where it works).
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE=${FORKD_VM_CACHE:-/var/cache/forkd-vm}
TIMEOUT=${FORKD_VM_TIMEOUT:-900}
MEMORY=${FORKD_VM_MEMORY:-3G}
ACCEL=${FORKD_VM_ACCEL:-tcg}
WORKSPACE=$PWD
say() { echo "cgroup-v2-vm: $*" >&2; }
skip() {
    say "############################################################"
    say "SKIPPED: $*"
    say "cgroup v2 memory/cpu/pids limits are UNTESTED on this machine"
    say "############################################################"
    exit 77
}
fail() {
    say "FAILED: $*"
    exit 1
}

if [ "${FORKD_VM:-on}" = off ]; then
    skip "FORKD_VM=off"
fi
[ "$(id -u)" = 0 ] || {
    say "run as root (it installs packages and builds a root filesystem)"
    exit 2
}

# --- tools -------------------------------------------------------------------
apt_install() {
    # Other package operations may hold the dpkg lock for a while: wait for it.
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get -o DPkg::Lock::Timeout=300 \
        install -y -qq --no-install-recommends "$@" >/dev/null
}
command -v apt-get >/dev/null || skip "no apt-get: the guest image is built from Debian packages"
# apt-cache needs package lists (a fresh machine may have none).
if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
    say "apt-get update (no package lists yet)"
    timeout 300 apt-get -o DPkg::Lock::Timeout=300 update -qq || skip "apt-get update failed"
fi
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v cpio >/dev/null || missing+=(cpio)
command -v objcopy >/dev/null || missing+=(binutils)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt_install "${missing[@]}" || skip "could not install ${missing[*]}"
fi

# --- guest image (cached) ----------------------------------------------------
# The guest runs the host's Debian release; packages come from the host's own
# apt sources (the first one that serves that release's main suite).
. /etc/os-release
SUITE=${VERSION_CODENAME:?/etc/os-release has no VERSION_CODENAME}
mirror_from_sources() {
    local f
    # deb822 (.sources) files: URIs: ... / Suites: ...
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            function stanza_end() { if (uri != "" && ok) print uri; uri = ""; ok = 0 }
            /^$/ { stanza_end() }
            /^URIs:/ { uri = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
            END { stanza_end() }' "$f"
    done
    # one-line format: deb [opts] URI SUITE COMPONENTS
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        awk -v suite="$SUITE" '$1 == "deb" { sub(/\[[^]]*\] */, ""); if ($3 == suite) print $2 }'
    true
}
MIRROR=$(mirror_from_sources | sed -n 1p)
[ -n "$MIRROR" ] || skip "no apt source for $SUITE in /etc/apt/sources.list{,.d}"
KERNEL_PKG=$(apt-cache depends linux-image-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
[ -n "$KERNEL_PKG" ] || skip "apt knows no kernel package behind linux-image-amd64"
KERNEL_VERSION=$(apt-cache show --no-all-versions "$KERNEL_PKG" | awk '/^Version:/ { print $2; exit }')
KEY=$( { echo "$SUITE $KERNEL_PKG $KERNEL_VERSION"; cat tests/vm/build-image.sh; } | sha256sum | cut -c1-16)
IMAGE=$CACHE/$SUITE-$KEY
mkdir -p "$CACHE"
started=$(date +%s)
(
    # One build at a time (parallel runs wait for the first to finish).
    flock 9
    if [ ! -d "$IMAGE" ]; then
        say "building the guest image (first run only): $SUITE, $KERNEL_PKG $KERNEL_VERSION, python3-numpy"
        t0=$(date +%s)
        tests/vm/build-image.sh "$IMAGE" "$SUITE" "$MIRROR" "$KERNEL_PKG"
        say "guest image built in $(($(date +%s) - t0)) s: $IMAGE ($(du -sh "$IMAGE" | cut -f1))"
        # Older images (other kernel or recipe) are of no further use.
        find "$CACHE" -mindepth 1 -maxdepth 1 -type d -name "$SUITE-*" ! -path "$IMAGE" \
            -exec rm -rf {} +
    fi
) 9>"$CACHE/.lock" || fail "could not build the guest image (see above)"

# --- test binaries -----------------------------------------------------------
# The guest runs the compiled tests at their host paths (Cargo bakes absolute
# paths such as CARGO_BIN_EXE_forkd into them).
# Whole-workspace builds, as scripts/test.sh does, so that inside it these
# are no-ops (per-package builds can unify features differently and rebuild).
say "building forkd and the tests"
cargo build --quiet --workspace --bins --lib
json=$(cargo test --quiet --workspace --no-run --message-format=json)
test_exe() { # the executable of integration test $1 (the forkd crate's first)
    local hits
    hits=$(grep -F '"kind":["test"]' <<<"$json" | grep -F "\"name\":\"$1\"")
    { grep -F '/forkd#' <<<"$hits" || echo "$hits"; } |
        grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | tail -1
}
# What the guest runs: test binary, then an optional name filter.
GUEST_TESTS=(
    "limits"
    "rootless"
    "warm request_limits_are_applied_to_a_warm_child"
    "leaks"
    "escapes_outside"
    "cgroups"
    "sessions pause_stops_cpu_and_resume_continues"
    "branch a_branch_copies_state_and_scratch_then_diverges"
    "branch spare_branches_are_made_ready_and_handed_out"
    "branch a_branch_outlives_its_killed_parent"
    "branch a_branch_of_a_branch"
    "checkpoint restore_puts_back_memory_modules_seeds_scratch_and_open_files"
    "checkpoint quotas_refusals_records_and_cycles"
    "egress a_session_keeps_its_allowlist_across_cells_and_commands"
    "egress a_sandbox_reaches_its_allowlist_by_name_and_address_and_nothing_else"
)
TESTS=()
test_list=
for entry in "${GUEST_TESTS[@]}"; do
    name=${entry%% *}
    exe=$(test_exe "$name")
    [ -x "$exe" ] || fail "no test executable for $name"
    TESTS+=("$exe")
    test_list+="$exe${entry#"$name"}"$'\n'
done
TARGET_DIR=$(dirname "$(dirname "${TESTS[0]}")") # target/debug
FORKD_BIN=$TARGET_DIR/forkd
ZYGOTE_LIB=$TARGET_DIR/libforkd_zygote.so
[ -x "$FORKD_BIN" ] && [ -f "$ZYGOTE_LIB" ] || fail "missing $FORKD_BIN or $ZYGOTE_LIB"

# --- initramfs: cached rootfs + this run's overlay ----------------------------
run=$(mktemp -d /tmp/forkd-vm.XXXXXX)
qemu_pid=
cleanup() {
    [ -n "$qemu_pid" ] && kill -KILL "$qemu_pid" 2>/dev/null
    rm -rf "$run"
}
trap cleanup EXIT
overlay=$run/overlay
mkdir -p "$overlay"
install -m 755 tests/vm/init.sh "$overlay/init"
for f in "${TESTS[@]}" "$FORKD_BIN" "$ZYGOTE_LIB"; do
    mkdir -p "$overlay$(dirname "$f")"
    # Debug info is most of a test binary's size and the guest unpacks
    # everything into its RAM.
    objcopy --strip-debug "$f" "$overlay$f"
done
printf '%s' "$test_list" >"$overlay/forkd-vm.tests"
(cd "$overlay" && find . -print0 | cpio --null -o -H newc --quiet) >"$run/overlay.cpio"
# The kernel unpacks concatenated archives in order, later files on top.
cat "$IMAGE/rootfs.cpio" "$run/overlay.cpio" >"$run/initrd"

# --- boot ----------------------------------------------------------------------
# cgroup_no_v1=all: every controller stays on the v2 hierarchy. panic=-1 with
# -no-reboot: a guest whose init dies ends qemu instead of hanging.
log=$WORKSPACE/target/cgroup-v2-vm-console.log # kept for a look afterwards
: >"$log"
say "booting the guest (-accel $ACCEL, 2 vCPUs, $MEMORY; limit ${TIMEOUT}s)"
boot_started=$(date +%s)
qemu-system-x86_64 -accel "$ACCEL" -cpu max -smp 2 -m "$MEMORY" \
    -display none -nodefaults -no-user-config -serial stdio -no-reboot \
    -kernel "$IMAGE/vmlinuz" -initrd "$run/initrd" \
    -append "console=ttyS0 quiet loglevel=1 cgroup_no_v1=all panic=-1 rdinit=/init" \
    </dev/null >"$log" 2>&1 &
qemu_pid=$!
# Stream the console (without serial carriage returns) while it runs.
tail -n +1 -f --pid="$qemu_pid" "$log" | tr -d '\r' &
tail_pid=$!
deadline=$((boot_started + TIMEOUT))
while kill -0 "$qemu_pid" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        kill -KILL "$qemu_pid" 2>/dev/null || true
        wait "$tail_pid" 2>/dev/null || true
        fail "the guest did not finish within ${TIMEOUT}s (killed); console log above"
    fi
    sleep 1
done
wait "$qemu_pid" || true
qemu_pid=
wait "$tail_pid" 2>/dev/null || true
elapsed=$(($(date +%s) - boot_started))

verdict=$(tr -d '\r' <"$log" | grep -E '^FORKD-VM-RESULT: ' | tail -1 || true)
[ -n "$verdict" ] || fail "the guest ended without a verdict after ${elapsed}s (crash or boot failure; console log above)"
say "guest ran ${elapsed}s (total $(($(date +%s) - started))s): ${verdict#FORKD-VM-RESULT: }"
case $verdict in
"FORKD-VM-RESULT: PASS"*) exit 0 ;;
*) fail "cgroup v2 tests failed in the guest (output above)" ;;
esac
