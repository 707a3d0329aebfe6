#!/bin/busybox sh
# The initramfs init of every sailbox (built into the initramfs by vmm-host, see guest/mod.rs):
# loads the virtio and vsock modules, mounts the root disk, puts the agent on a tmpfs at
# /run/sail (so images need no agent of their own and an upgrade is a new initramfs), and
# hands PID 1 over to the agent inside the root. It also brings up the network devices
# (docs/networking.md), found by their MACs: the outbound NIC (passt; only when the sailbox
# has the outbound network) and the host NIC (the volume gateway at 10.0.3.2:7420).
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
/bin/busybox mount -t sysfs sys /sys
/bin/busybox ip link set lo up
outbound=
for dev in /sys/class/net/*; do
    name=${dev##*/}
    case "$(/bin/busybox cat "$dev/address" 2>/dev/null)" in
    52:54:00:5a:11:01)
        outbound=$name
        /bin/busybox ip addr add 10.0.2.15/24 dev "$name" || say "cannot address $name"
        # passt's own MTU (what it offers over DHCP): downloads ran ~1.8x faster than at 1500.
        /bin/busybox ip link set "$name" mtu 65520 || say "cannot set the MTU of $name"
        /bin/busybox ip link set "$name" up || say "cannot bring up $name"
        /bin/busybox ip route add default via 10.0.2.2 dev "$name" || say "no default route via $name"
        ;;
    52:54:00:5a:11:02)
        /bin/busybox ip addr add 10.0.3.15/24 dev "$name" || say "cannot address $name"
        # Also passt (in the sailbox's own namespace): its MTU, as for the outbound NIC.
        /bin/busybox ip link set "$name" mtu 65520 || say "cannot set the MTU of $name"
        /bin/busybox ip link set "$name" up || say "cannot bring up $name"
        ;;
    esac
done
if [ -n "$outbound" ]; then
    # Replaced, not written through: a symlink would point outside the new root from here.
    /bin/busybox mkdir -p /newroot/etc
    /bin/busybox rm -f /newroot/etc/resolv.conf
    echo "nameserver 10.0.2.3" >/newroot/etc/resolv.conf || say "cannot write resolv.conf"
fi
/bin/busybox umount /sys
/bin/busybox umount /proc
/bin/busybox umount /dev
exec /bin/busybox switch_root /newroot /run/sail/sail-agent
