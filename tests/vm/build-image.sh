#!/usr/bin/env bash
# Builds the guest image for tests/vm/cgroup-v2-vm.sh into OUT (a new
# directory): `vmlinuz` (Debian's kernel, extracted from its .deb; nothing is
# installed on the host) and `rootfs.cpio` (a debootstrap tree with python3 and
# python3-numpy, packed as an initramfs: the whole guest runs from RAM, so the
# kernel needs no disk or virtio modules). Called only on a cache miss.
#   usage: build-image.sh OUT SUITE MIRROR KERNEL_PACKAGE
set -euo pipefail
out=$1 suite=$2 mirror=$3 kernel_pkg=$4
rm -rf "$out.tmp"
work=$(mktemp -d "${out}.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 755 "$work" # apt-get download runs as _apt, which must reach deb/

# The kernel: download the .deb (as the unprivileged _apt user, which needs a
# directory it can write) and extract only /boot.
mkdir "$work/deb" && chmod 777 "$work/deb"
(cd "$work/deb" && timeout 600 apt-get download -qq "$kernel_pkg")
dpkg-deb -x "$work/deb"/"$kernel_pkg"_*.deb "$work/kernel"
cp "$work"/kernel/boot/vmlinuz-* "$work/vmlinuz"
cp "$work"/kernel/boot/config-* "$work/kernel-config"

# The root filesystem. minbase already has util-linux (mount, setpriv) and
# passwd (useradd) for the guest's init script; iproute2 and the veth module
# are for the egress tests' test hosts (a veth pair into a network namespace);
# uidmap (setuid newuidmap/newgidmap) for the rootless subordinate-id test.
timeout 1200 debootstrap --variant=minbase --include=python3,python3-numpy,iproute2,uidmap \
    "$suite" "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -30 "$work/debootstrap.log" >&2
    echo "build-image.sh: debootstrap $suite from $mirror failed (log above)" >&2
    exit 1
}
cp "$work"/kernel/lib/modules/*/kernel/drivers/net/veth.ko "$work/rootfs/lib/veth.ko"
# brd: a RAM block device, for the block I/O throttle test (io.max needs a
# disk and the guest's root is in RAM).
cp "$work"/kernel/lib/modules/*/kernel/drivers/block/brd.ko "$work/rootfs/lib/brd.ko"
# overlay: policies with private_locks (and overlay workspaces) mount it.
cp "$work"/kernel/lib/modules/*/kernel/fs/overlayfs/overlay.ko "$work/rootfs/lib/overlay.ko"
# Trim what the guest never reads: every megabyte is unpacked into its RAM.
rm -rf "$work"/rootfs/usr/share/{doc,man,info,locale,lintian} \
    "$work"/rootfs/var/cache/apt/*.bin "$work"/rootfs/var/cache/apt/archives/*.deb \
    "$work"/rootfs/var/lib/apt/lists/*
(cd "$work/rootfs" && find . -print0 | cpio --null -o -H newc --quiet) >"$work/rootfs.cpio"

mkdir "$out.tmp"
mv "$work/vmlinuz" "$work/kernel-config" "$work/rootfs.cpio" "$out.tmp/"
mv "$out.tmp" "$out"
