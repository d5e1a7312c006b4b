#!/bin/bash
# Runs inside the guest booted by systemd-vm.sh (systemd is PID 1, forkd and
# its packaging are installed at the packaged paths). Prints VMCHECK lines to
# the console and powers the guest off.
set -u
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
say() { echo "VMCHECK $*"; }
ok() { say "ok $*"; }
fail() { say "FAIL $*"; }
# forkd's own error and warning lines from the journal (last N), on one line.
journal() {
    journalctl -u forkd.service -b --no-pager -o cat | sed 's/\x1b\[[0-9;]*m//g' |
        grep -E '^forkd: |ERROR|WARN|error' | tail -n "${1:-2}" | tr '\n' '|'
}

# Runs CODE in a sandbox with extra forkd-run ARGS; prints its output.
run() {
    local code=$1
    shift
    timeout 120 forkd-run --timeout 60 "$@" -c "$code" 2>&1
}

# The checks every configuration must pass; prints why on failure.
smoke() {
    local out
    out=$(run 'import numpy; print(numpy.zeros(5).tolist())')
    [ "$out" = "[0.0, 0.0, 0.0, 0.0, 0.0]" ] || { echo "numpy snippet: $out"; return 1; }
    out=$(run 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
c = socket.create_connection(s.getsockname()); a, _ = s.accept()
c.sendall(b"ping"); print(a.recv(4).decode())')
    [ "$out" = "ping" ] || { echo "own loopback: $out"; return 1; }
    out=$(run 'open("/tmp/x", "w").write("scratch"); print(open("/tmp/x").read())')
    [ "$out" = "scratch" ] || { echo "scratch write: $out"; return 1; }
    out=$(run 'import ctypes; cb = ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 7); print(cb())')
    [ "$out" = "7" ] || { echo "ctypes callback: $out"; return 1; }
    out=$(timeout 60 forkd-run --timeout 1 --json -c 'import time; time.sleep(30)' 2>&1)
    grep -q '"killed_by": "timeout"' <<<"$out" || { echo "timeout: $(tr -d '\n' <<<"$out" | head -c 300)"; return 1; }
    out=$(run 'b = bytearray(512 << 20); print(len(b))' --memory 64M --json)
    if ! grep -q '"killed_by": "oom"' <<<"$out" || ! grep -q '"cgroup_enforced": true' <<<"$out"; then
        echo "memory limit: $(tr -d '\n' <<<"$out" | head -c 400)"
        return 1
    fi
    return 0
}

restart_clean() {
    systemctl reset-failed forkd.service forkd.socket 2>/dev/null
    systemctl start forkd.socket
    systemctl restart forkd.service
}

say "guest: $(uname -r), systemd $(systemctl --version | awk 'NR == 1 { print $2 }'), $(stat -f -c %T /sys/fs/cgroup), controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"

systemd-tmpfiles --create /usr/lib/tmpfiles.d/forkd.conf
[ "$(stat -c '%a %U %G' /run/forkd)" = "755 root root" ] && ok "tmpfiles made /run/forkd 0755 root:root" || fail "tmpfiles: $(stat -c '%a %U %G' /run/forkd 2>&1)"
systemctl daemon-reload
systemctl enable --now forkd.socket >/dev/null 2>&1
[ "$(systemctl is-active forkd.service)" = inactive ] && ok "forkd.socket listening, forkd.service not started yet" || fail "forkd.service active before any connection"

# First connection activates the daemon.
started=$(date +%s%N)
out=$(run 'import numpy; print(numpy.zeros(5).tolist())')
elapsed=$((($(date +%s%N) - started) / 1000000))
[ "$out" = "[0.0, 0.0, 0.0, 0.0, 0.0]" ] && ok "socket activation: first request answered in ${elapsed} ms (daemon start included, TCG)" || fail "first request: $out | $(journal 8)"
if why=$(smoke); then ok "shipped unit: numpy, own loopback, scratch, ctypes callback, timeout, memory limit (OOM) all work"; else fail "shipped unit: $why | $(journal 8)"; fi

if journalctl -u forkd.service -b --no-pager -o cat | grep -qi 'landlock'; then
    fail "landlock: $(journalctl -u forkd.service -b --no-pager -o cat | grep -i landlock | head -n 1)"
else
    ok "no landlock degradation logged"
fi

main_pid=$(systemctl show -p MainPID --value forkd.service)
say "info MainPID cgroup: $(cat /proc/"$main_pid"/cgroup)"
unit_cg=/sys/fs/cgroup$(systemctl show -p ControlGroup --value forkd.service)
say "info unit cgroup tree: $(cd "$unit_cg" && find . -maxdepth 3 -type d | sort | tr '\n' ' ')"
say "info $unit_cg/cgroup.subtree_control: $(cat "$unit_cg/cgroup.subtree_control")"
# A running sandbox's cgroup must be inside the unit's delegated subtree.
timeout 60 forkd-run -c 'import time; time.sleep(5)' >/dev/null 2>&1 &
sleep 2
sandbox_cg=$(find "$unit_cg" -type d -name 'sb*' | head -n 1)
[ -n "$sandbox_cg" ] && ok "a running sandbox's cgroup is $sandbox_cg (memory.max $(cat "$sandbox_cg/memory.max"))" || fail "no sandbox cgroup below $unit_cg: $(find "$unit_cg" -type d | tr '\n' ' ')"
wait

say "info $(systemd-analyze security forkd.service 2>/dev/null | tail -n 1)"
systemd-analyze security forkd.service 2>/dev/null | sed "s/^/VMCHECK security /"

# Restart after a crash, and stop/reactivation through the socket.
kill -9 "$main_pid"
sleep 4
new_pid=$(systemctl show -p MainPID --value forkd.service)
out=$(run 'print("again")')
[ "$out" = again ] && [ "$new_pid" != "$main_pid" ] && ok "kill -9: restarted (pid $main_pid -> $new_pid) and serving" || fail "after kill -9: pid $new_pid, output $out | $(journal 8)"
systemctl stop forkd.service
[ -S /run/forkd/forkd.sock ] && [ "$(systemctl is-active forkd.socket)" = active ] && ok "stop: socket file and forkd.socket stay" || fail "stop removed the socket"
left=$(find "$unit_cg" -mindepth 1 -type d 2>/dev/null | wc -l)
[ "$left" = 0 ] && ok "stop: no cgroup left below $unit_cg" || fail "stop: $left cgroups left below $unit_cg"
out=$(run 'print("reactivated")')
[ "$out" = reactivated ] && ok "a connection after stop reactivates forkd" || fail "reactivation: $out"

# Options the shipped unit leaves out: add each alone, record what happens
# (forkd.probes=0 on the kernel command line skips this, forkd.probes=caps
# only removes each capability of the unit's bounding set in turn).
if grep -qw 'forkd.probes=0' /proc/cmdline; then
    systemctl disable --now forkd.socket forkd.service >/dev/null 2>&1
    say "done"
    systemctl poweroff --no-block
    exit 0
fi
dropin=/run/systemd/system/forkd.service.d
mkdir -p "$dropin"
probe() {
    # The empty assignment first: list settings (RestrictAddressFamilies=,
    # SystemCallFilter=, CapabilityBoundingSet=, ...) would otherwise be
    # merged with the unit's own.
    printf '[Service]\n%s=\n%s\n' "${1%%=*}" "$1" >"$dropin/probe.conf"
    systemctl daemon-reload
    local why label=${2:-$1}
    if ! timeout 180 systemctl restart forkd.service 2>/dev/null; then
        say "option $label: breaks: forkd does not start: $(journal 2)"
    elif why=$(smoke); then
        say "option $label: works"
    else
        say "option $label: breaks: $why | $(journal 2)"
    fi
    rm -f "$dropin/probe.conf"
    systemctl daemon-reload
    restart_clean
}
if grep -qw 'forkd.probes=caps' /proc/cmdline; then
    caps=$(sed -n 's/^CapabilityBoundingSet=//p' /usr/lib/systemd/system/forkd.service)
    for cap in $caps; do
        probe "CapabilityBoundingSet=$(tr ' ' '\n' <<<"$caps" | grep -vx "$cap" | tr '\n' ' ')" "without $cap"
    done
    systemctl disable --now forkd.socket forkd.service >/dev/null 2>&1
    say "done"
    systemctl poweroff --no-block
    exit 0
fi
probe "ProtectControlGroups=yes"
probe "ProtectHostname=yes"
probe "RestrictNamespaces=yes"
probe "PrivateUsers=yes"
probe "MemoryDenyWriteExecute=yes"
probe "ProcSubset=pid"
probe "ProtectHome=yes"
probe "IPAddressDeny=any"
probe "RestrictAddressFamilies=AF_UNIX AF_NETLINK"
probe "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"
probe "SystemCallFilter=@system-service"
probe "SystemCallFilter=@system-service @mount @privileged @resources @pkey"
probe "SystemCallFilter=~@privileged"
probe "CapabilityBoundingSet=CAP_SYS_ADMIN CAP_SETPCAP CAP_NET_ADMIN CAP_SYS_CHROOT CAP_SYS_RESOURCE CAP_KILL CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER CAP_CHOWN CAP_SETUID CAP_SETGID CAP_SYS_PTRACE"
probe "CapabilityBoundingSet=CAP_SYS_ADMIN CAP_SETPCAP CAP_NET_ADMIN CAP_SYS_RESOURCE"
probe "CapabilityBoundingSet=CAP_SYS_ADMIN CAP_SETPCAP"

systemctl disable --now forkd.socket forkd.service >/dev/null 2>&1
say "done"
systemctl poweroff --no-block
