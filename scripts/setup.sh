#!/usr/bin/env bash
# Installs what building, running VMs and testing need, skipping what is already there.
# Debian 12, as root. Safe to run repeatedly.
#   bash scripts/setup.sh        build dependencies (apt)
#   bash scripts/setup.sh vm     also what sailboxes need: QEMU (bookworm-backports), image
#                                tools, passt (guest networking), the guest kernel kit
#   bash scripts/setup.sh test   everything above plus the test tools (s3s-fs, cargo-fuzz, pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-build}

apt_install() { # apt_install [-t SUITE] PKG...
    local suite=()
    if [ "$1" = -t ]; then suite=(-t "$2"); shift 2; fi
    local need=()
    for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
    ((${#need[@]})) || return 0
    echo "setup: apt-get install ${suite[*]} ${need[*]}"
    [ -n "${APT_UPDATED:-}" ] || { apt-get update -qq; APT_UPDATED=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${suite[@]}" "${need[@]}" >/dev/null
}

apt_install protobuf-compiler librocksdb-dev libclang-dev pkg-config fio fuse3 attr
export PATH="$HOME/.cargo/bin:$PATH"
[ "$mode" = build ] && exit 0

# Sailboxes: QEMU 10 from bookworm-backports (what docs/vmm-host.md was measured with).
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "setup: adding bookworm-backports to the apt sources"
    cat >/etc/apt/sources.list.d/sail-backports.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    APT_UPDATED=
fi
if ! dpkg-query -W -f '${Version}' qemu-system-x86 2>/dev/null | grep -q bpo12; then
    echo "setup: apt-get install -t bookworm-backports qemu-system-x86 qemu-utils"
    [ -n "${APT_UPDATED:-}" ] || { apt-get update -qq; APT_UPDATED=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t bookworm-backports \
        qemu-system-x86 qemu-system-data qemu-utils >/dev/null
fi
apt_install debootstrap e2fsprogs zstd xz-utils kmod cpio file ca-certificates
# Guest networking (docs/networking.md): passt backs both NICs; iproute2 configures the host
# NIC's namespace. bookworm's passt (a 2023-03 snapshot) now and then left a guest connection
# hanging (its FIN never reached the guest) in the network test; trixie's (2025-05) did not,
# and it builds from Debian's source in seconds (it needs a newer libc as a package). Installed
# to /usr/local/bin, ahead of /usr/bin on PATH.
apt_install iproute2 passt curl gcc make libc6-dev
PASST_VERSION=0.0~git20250503.587980c
PASST_SHA256=69d5eb843f7d648c2cc60bfbca6ea7b5014c6b6f07cdee362c2a8cf490515a49
# (A stamp, not `passt --version`: that prints nothing when stdout is not a terminal.)
passt_stamp=/usr/local/share/sail/passt.version
if [ ! -x /usr/local/bin/passt ] || [ "$(cat "$passt_stamp" 2>/dev/null)" != "$PASST_VERSION" ]; then
    echo "setup: building passt $PASST_VERSION from Debian's source"
    src=$(mktemp -d)
    curl -fsSL -o "$src/passt.tar.xz" "http://deb.debian.org/debian/pool/main/p/passt/passt_${PASST_VERSION}.orig.tar.xz"
    echo "$PASST_SHA256  $src/passt.tar.xz" | sha256sum -c --quiet -
    tar -xJf "$src/passt.tar.xz" -C "$src" --strip-components=1
    make -s -C "$src" passt VERSION="${PASST_VERSION#0.0~git}" >/dev/null
    install -m 755 "$src/passt" /usr/local/bin/passt
    mkdir -p "$(dirname "$passt_stamp")" && echo "$PASST_VERSION" >"$passt_stamp"
    rm -rf "$src"
fi
# pasta is passt's network-namespace mode (the binary picks it by name): image build steps
# reach the network through it (docs/images.md).
ln -sf passt /usr/local/bin/pasta
bash scripts/guest-kernel.sh
[ "$mode" = vm ] && exit 0

# Test tools. pytest runs the Python SDK's tests against a real mount.
if ! python3 -m pytest --version >/dev/null 2>&1; then
    echo "setup: pip install pytest"
    python3 -m pip install --quiet pytest
fi
# The S3-compatible server the tests start on 127.0.0.1 (verifies SigV4, supports presigned
# URLs and conditional writes; docs/chunkstore.md says why this one).
if ! command -v s3s-fs >/dev/null 2>&1; then
    echo "setup: cargo install s3s-fs (several minutes, once per machine)"
    cargo install --locked s3s-fs@0.14.1 --features binary --quiet
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "setup: cargo install cargo-fuzz"
    cargo install --locked cargo-fuzz --quiet
fi
