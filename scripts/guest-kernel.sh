#!/usr/bin/env bash
# Builds the guest kit that vmm-host boots sailboxes with, from Debian packages only:
#   - vmlinux: the uncompressed kernel of Debian's cloud kernel package (trixie, 6.12), for
#     PVH direct boot (QEMU microvm, Cloud Hypervisor)
#   - modules/*.ko (decompressed) + modules/order: the virtio and vsock modules the
#     initramfs loads, in dependency order
#   - busybox: static busybox (initramfs shell, and the `minimal` image)
#   - kernel.release
# It uses a private apt configuration (nothing is installed or added to the system's
# sources) and skips the work when the kit for the newest kernel is already there.
#   bash scripts/guest-kernel.sh [OUT_DIR]   (default: $SAIL_GUEST_DIR or ~/.cache/sail/guest)
set -euo pipefail
OUT=${1:-${SAIL_GUEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sail/guest}}
SUITE=${SAIL_GUEST_SUITE:-trixie}
MIRROR=${SAIL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Load order: each module after the ones it depends on (modinfo's depends= field).
MODULES="virtio_mmio virtio_blk failover net_failover virtio_net vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport virtio-rng"

for tool in apt-get dpkg zstd xz modinfo python3; do
    command -v "$tool" >/dev/null || { echo "guest-kernel: $tool missing (bash scripts/setup.sh vm)" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
apt_dir=${OUT%/}.apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main" >"$apt_dir/sources.list"
APT=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o Dir::State::status=/dev/null
     -o APT::Sandbox::User=root -qq)
apt-get "${APT[@]}" update
pkg=$(apt-cache "${APT[@]}" search --names-only '^linux-image-[0-9.]+.*-cloud-amd64-unsigned$' | awk '{print $1}' | sort -V | tail -1)
[ -n "$pkg" ] || { echo "guest-kernel: no cloud kernel package found in $SUITE" >&2; exit 1; }
release=${pkg#linux-image-}
release=${release%-unsigned}
if [ -f "$OUT/kernel.release" ] && [ "$(cat "$OUT/kernel.release")" = "$release" ] && [ -f "$OUT/vmlinux" ] \
    && [ -f "$OUT/busybox" ] && [ "$(cat "$OUT/modules/order" 2>/dev/null | tr '\n' ' ')" = "$(echo $MODULES | tr ' ' '\n' | tr '\n' ' ')" ]; then
    echo "guest-kernel: $OUT already holds $release"
    exit 0
fi
echo "guest-kernel: fetching $pkg and busybox-static from $SUITE"
(cd "$work" && apt-get "${APT[@]}" download "$pkg" busybox-static)
dpkg -x "$work"/linux-image-*.deb "$work/k"
dpkg -x "$work"/busybox-static_*.deb "$work/bb"

stage="$work/out"
mkdir -p "$stage/modules"
# The bzImage carries a zstd payload: find its magic and decompress from there (zstd
# complains about the trailing bytes after the frame; the ELF is complete).
python3 - "$work/k/boot/vmlinuz-$release" "$work/payload.zst" <<'EOF'
import sys
data = open(sys.argv[1], "rb").read()
at = data.find(b"\x28\xb5\x2f\xfd")
if at < 0:
    sys.exit("no zstd payload in the kernel image")
open(sys.argv[2], "wb").write(data[at:])
EOF
zstd -dcq "$work/payload.zst" >"$stage/vmlinux" 2>/dev/null || true
head -c 4 "$stage/vmlinux" | grep -q ELF || { echo "guest-kernel: vmlinux extraction failed" >&2; exit 1; }
for m in $MODULES; do
    f=$(find "$work/k/usr/lib/modules/$release" -name "$m.ko.xz" | head -1)
    [ -n "$f" ] || { echo "guest-kernel: module $m not in $pkg" >&2; exit 1; }
    xz -dc "$f" >"$stage/modules/$m.ko"
    echo "$m" >>"$stage/modules/order"
done
cp "$work/bb/usr/bin/busybox" "$stage/busybox"
chmod 0755 "$stage/busybox"
echo "$release" >"$stage/kernel.release"
mkdir -p "$(dirname "$OUT")"
rm -rf "$OUT.old"
[ -d "$OUT" ] && mv "$OUT" "$OUT.old"
mv "$stage" "$OUT"
rm -rf "$OUT.old"
echo "guest-kernel: $OUT holds $release ($(du -sh "$OUT" | cut -f1))"
