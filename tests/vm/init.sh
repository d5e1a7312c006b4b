#!/bin/sh
# pid 1 of the cgroup v2 test guest (tests/vm/cgroup-v2-vm.sh). Mounts a pure
# cgroup2 hierarchy, runs the compiled test binaries listed in
# /forkd-vm.tests (one per line: path, then an optional test name filter),
# prints a verdict line the host parses, and powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8

if [ "${1:-}" != stage2 ]; then
    # The initramfs root (rootfs) cannot be pivot_root'ed away, and forkd's
    # sandboxes pivot_root into their own root: re-root onto a bind mount of
    # it (as switch_root does), which can.
    mount -t proc proc /proc
    mkdir -p /newroot
    mount --bind / /newroot
    umount /proc
    cd /newroot && mount --move . / && exec chroot . /init stage2
    echo "FORKD-VM-RESULT: FAIL could not re-root the initramfs"
    echo o >/proc/sysrq-trigger
fi

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd # devtmpfs has no /dev/fd; the zygote script is read from /dev/fd/4
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
# /tmp stays on the (RAM-backed) root: a checkout under /tmp (a CI clone) put
# its test binaries there, at the paths cargo compiled into them.
chmod 1777 /tmp
mount -t tmpfs tmpfs /run
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
hostname forkd-vm
ip link set lo up 2>/dev/null || true
# veth for the egress tests' test hosts (no modprobe in the image: the
# module is loaded with finit_module).
python3 -c 'import ctypes, os; fd = os.open("/lib/veth.ko", os.O_RDONLY); ctypes.CDLL(None).syscall(313, fd, b"", 0)' 2>/dev/null || true
# brd (one 32 MiB RAM disk, /dev/ram0) for the block I/O throttle test.
python3 -c 'import ctypes, os; fd = os.open("/lib/brd.ko", os.O_RDONLY); ctypes.CDLL(None).syscall(313, fd, b"rd_nr=1 rd_size=32768", 0)' 2>/dev/null || true
# overlayfs for policies with private_locks.
python3 -c 'import ctypes, os; fd = os.open("/lib/overlay.ko", os.O_RDONLY); ctypes.CDLL(None).syscall(313, fd, b"", 0)' 2>/dev/null || true

poweroff_now() {
    sync
    echo o >/proc/sysrq-trigger
    sleep 30
}

echo "forkd-vm: kernel $(uname -r); $(nproc) CPUs; $(awk '/MemTotal/ {print $2 / 1024 " MiB"}' /proc/meminfo)"
echo "forkd-vm: cgroup mounts: $(awk '$3 ~ /^cgroup/ {print $2 " (" $3 ")"}' /proc/mounts | tr '\n' ' ')"
echo "forkd-vm: cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
if ! grep -qw memory /sys/fs/cgroup/cgroup.controllers; then
    echo "FORKD-VM-RESULT: FAIL no memory controller on cgroup2 (is cgroup_no_v1=all on the command line?)"
    poweroff_now
fi
# The harness's unprivileged user for tests/rootless.rs (created there too if
# missing; made here so its uid is stable).
useradd --system --no-create-home --shell /usr/sbin/nologin forkd-it 2>/dev/null

# The tests: the same binaries as on the host; the Debian interpreter with
# numpy is the zygotes' python. FORKD_TEST_EXPECT_CGROUP_V2 turns "this host
# has no cgroup v2 controllers" from a skip into a failure.
export FORKD_TEST_PYTHON=/usr/bin/python3 FORKD_TEST_EXPECT_CGROUP_V2=1
export RUST_BACKTRACE=1
cd /tmp
status=PASS
while read -r t filter <&3; do
    name="$(basename "$t")${filter:+ $filter}"
    echo "forkd-vm: ==== $name ===="
    start=$(date +%s)
    # One test at a time: the guest's 2 emulated CPUs are slow, and the leak
    # checks (fds) are only exact for a test running alone.
    # shellcheck disable=SC2086 # an empty filter is no argument
    { timeout 600 "$t" --test-threads=1 $filter </dev/null 2>&1; echo $? >/tmp/rc; } |
        tee -a /tmp/all-tests.log
    rc=$(cat /tmp/rc)
    echo "forkd-vm: ==== $name: exit $rc in $(($(date +%s) - start)) s ===="
    [ "$rc" = 0 ] || status=FAIL
done 3</forkd-vm.tests
counts=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
    END { printf "%d passed, %d failed", p, f }' /tmp/all-tests.log)
echo "FORKD-VM-RESULT: $status ($counts)"
poweroff_now
