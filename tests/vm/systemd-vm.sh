#!/usr/bin/env bash
# Checks forkd's systemd packaging for real: boots a Debian 12 guest (systemd
# 252, cgroup v2 with memory/cpu/pids) under QEMU, installs the release
# binaries with packaging/systemd/* and packaging/forkd.toml at their packaged
# paths, and inside it
#   - activates forkd through forkd.socket and runs sandboxes (numpy output,
#     a loopback listener, a memory limit reported as OOM from the delegated
#     cgroup v2 subtree), checks where the sandbox cgroups live, restart on
#     kill -9, reactivation after stop;
#   - records `systemd-analyze security forkd.service`;
#   - adds, one at a time, each hardening option the unit leaves out and
#     records whether forkd still works and, if not, what broke.
# The results are printed (lines starting with VMCHECK) and kept in
# $WORK/result.txt. Not part of scripts/test.sh: it takes several minutes
# (the guest runs under software emulation, TCG: KVM hangs in nested VMs).
#
# Usage, as root from anywhere: tests/vm/systemd-vm.sh [WORK_DIR]
# FORKD_VM_PROBES=0 skips the option-by-option part (about 15 minutes).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-/var/tmp/forkd-systemd-vm}
mkdir -p "$work"
export DEBIAN_FRONTEND=noninteractive

need=()
for tool in debootstrap:debootstrap qemu-system-x86_64:qemu-system-x86 cpio:cpio; do
    command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    apt-get install -y -q "${need[@]}" >/dev/null
fi

# The mirror this machine already uses (never hard-coded).
mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
if [ -z "$mirror" ]; then
    mirror=$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
fi
[ -n "$mirror" ] || { echo "systemd-vm.sh: no apt mirror found in /etc/apt" >&2; exit 2; }

# Guest root file system, made once: systemd, Debian's python3 with numpy.
if [ ! -x "$work/root/lib/systemd/systemd" ]; then
    rm -rf "$work/root"
    debootstrap --variant=minbase \
        --include=systemd,systemd-sysv,python3,python3-numpy,procps,iproute2,kmod \
        bookworm "$work/root" "$mirror" >"$work/debootstrap.log"
fi
# The kernel Debian installs for linux-image-amd64 (extracted, not installed).
if ! ls "$work"/kernel/boot/vmlinuz-* >/dev/null 2>&1; then
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ { print $2; exit }')
    (cd "$work" && rm -f linux-image-*.deb && apt-get download -q "$pkg" >/dev/null)
    dpkg-deb -x "$work"/linux-image-*.deb "$work/kernel"
fi
vmlinuz=$(ls "$work"/kernel/boot/vmlinuz-* | head -n 1)

(cd "$repo" && cargo build --release --quiet -p forkd -p forkd-zygote)

# Merged /usr: the overlay must not hold /lib, /bin or /sbin, or its
# directory would replace the base's symlink while unpacking.
# The base archive (the root file system) is made once; the overlay (forkd,
# its packaging and the check) every run. The kernel unpacks both, in order.
if [ ! -f "$work/base.cpio" ]; then
    (cd "$work/root" && find . -xdev | cpio --quiet -o -H newc >"$work/base.cpio.tmp")
    mv "$work/base.cpio.tmp" "$work/base.cpio"
fi
overlay="$work/overlay"
rm -rf "$overlay"
install -D -m 0755 "$repo/target/release/forkd" "$overlay/usr/bin/forkd"
install -D -m 0755 "$repo/target/release/forkd-run" "$overlay/usr/bin/forkd-run"
install -D -m 0644 "$repo/target/release/libforkd_zygote.so" "$overlay/usr/lib/forkd/libforkd_zygote.so"
install -D -m 0755 "$repo/packaging/systemd/forkd-cgroup-leaf" "$overlay/usr/lib/forkd/forkd-cgroup-leaf"
install -D -m 0644 "$repo/packaging/systemd/forkd.service" "$overlay/usr/lib/systemd/system/forkd.service"
install -D -m 0644 "$repo/packaging/systemd/forkd.socket" "$overlay/usr/lib/systemd/system/forkd.socket"
install -D -m 0644 "$repo/packaging/systemd/forkd.conf" "$overlay/usr/lib/tmpfiles.d/forkd.conf"
# The packaged config, with the cgroup v2 line enabled (the guest is v2).
mkdir -p "$overlay/etc/forkd"
sed 's|^# v2_root = |v2_root = |' "$repo/packaging/forkd.toml" >"$overlay/etc/forkd/forkd.toml"
install -D -m 0755 "$repo/tests/vm/systemd-check-guest.sh" "$overlay/usr/local/sbin/forkd-vm-check"
mkdir -p "$overlay/etc/systemd/system/multi-user.target.wants"
cat >"$overlay/etc/systemd/system/forkd-vm-check.service" <<'EOF'
[Unit]
Description=forkd packaging check
After=basic.target
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/forkd-vm-check
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
EOF
ln -sf ../forkd-vm-check.service "$overlay/etc/systemd/system/multi-user.target.wants/forkd-vm-check.service"
# No logins on the console: only the check writes there.
for unit in serial-getty@ttyS0.service getty@tty1.service; do
    ln -sf /dev/null "$overlay/etc/systemd/system/$unit"
done
cat >"$overlay/init" <<'EOF'
#!/bin/sh
# The initramfs root cannot be pivot_root'ed away from (forkd's zygotes do
# that for every sandbox root), so boot systemd from a copy on a tmpfs.
mount -t proc proc /proc
mkdir -p /newroot
mount -t tmpfs -o size=80% tmpfs /newroot
for entry in /*; do
    case "$entry" in /proc|/sys|/dev|/newroot|/init) ;; *) cp -a "$entry" /newroot/ ;; esac
done
mkdir -p /newroot/proc /newroot/sys /newroot/dev /newroot/run /newroot/tmp
umount /proc
exec switch_root /newroot /lib/systemd/systemd
EOF
chmod 0755 "$overlay/init"
(cd "$overlay" && find . | cpio --quiet -o -H newc >"$work/overlay.cpio")
cat "$work/base.cpio" "$work/overlay.cpio" >"$work/initrd.cpio"

echo "systemd-vm.sh: booting the guest (TCG; several minutes)..."
timeout 1800 qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 3072 -nographic -no-reboot \
    -kernel "$vmlinuz" -initrd "$work/initrd.cpio" \
    -append "console=ttyS0 rdinit=/init panic=-1 quiet systemd.show_status=0 forkd.probes=${FORKD_VM_PROBES:-1}" \
    </dev/null >"$work/console.log" 2>&1 || true
grep -a '^VMCHECK' "$work/console.log" | tr -d '\r' >"$work/result.txt" || true
cat "$work/result.txt"
if ! grep -q '^VMCHECK done' "$work/result.txt"; then
    echo "systemd-vm.sh: the check did not finish; see $work/console.log" >&2
    exit 1
fi
! grep -q '^VMCHECK FAIL' "$work/result.txt"
