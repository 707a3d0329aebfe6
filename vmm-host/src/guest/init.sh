#!/bin/busybox sh
# The initramfs init of every sailbox (built into the initramfs by vmm-host, see guest/mod.rs):
# loads the virtio and vsock modules, mounts the root disk, puts the agent on a tmpfs at
# /run/sail (so images need no agent of their own and an upgrade is a new initramfs), and
# hands PID 1 over to the agent inside the root.
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t proc proc /proc
say() { echo "sail-init: $*" >/dev/console; }
fail() { say "$*"; /bin/busybox sleep 1; /bin/busybox poweroff -f; }
while read -r m; do
    [ -n "$m" ] && { /bin/busybox insmod "/lib/modules/$m.ko" || say "insmod $m failed"; }
done </lib/modules/order
root=/dev/vda
for arg in $(/bin/busybox cat /proc/cmdline); do
    case "$arg" in sail.root=*) root="${arg#sail.root=}" ;; esac
done
i=0
while [ ! -b "$root" ]; do
    i=$((i + 1)); [ "$i" -gt 500 ] && fail "root device $root did not appear"
    /bin/busybox usleep 10000
done
/bin/busybox mount -t ext4 -o rw,noatime "$root" /newroot || fail "cannot mount $root"
/bin/busybox mkdir -p /newroot/run /newroot/proc /newroot/sys /newroot/dev
/bin/busybox mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run || fail "cannot mount /run"
/bin/busybox mkdir -p /newroot/run/sail
/bin/busybox cp /sail-agent /newroot/run/sail/sail-agent || fail "cannot install the agent"
/bin/busybox cp -r /sail-python /newroot/run/sail/python || say "cannot install the python module"
[ -f /sail-volume-fuse ] && { /bin/busybox cp /sail-volume-fuse /newroot/run/sail/sail-volume-fuse || say "cannot install the volume helper"; }
/bin/busybox umount /proc
/bin/busybox umount /dev
exec /bin/busybox switch_root /newroot /run/sail/sail-agent
