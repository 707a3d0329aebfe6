#!/usr/bin/env bash
# Builds what runs inside guests statically (glibc with crt-static), so it runs in any image:
# the guest agent (PID 1) and the volume mount helper (sail-volume-fuse).
# An explicit --target keeps these RUSTFLAGS away from host builds (and their artefacts in
# target/x86_64-unknown-linux-gnu/, where vmm-host looks for them).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
# Debug info is stripped: both binaries are copied into every guest's RAM (/run/sail), where
# line tables would cost ~30 MB per guest (symbols stay, so backtraces still name functions).
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static -C strip=debuginfo" \
    cargo build --release --quiet --target x86_64-unknown-linux-gnu \
    -p agent --bin sail-agent -p guest-fuse --bin sail-volume-fuse "$@"
for bin in sail-agent sail-volume-fuse; do
    out="${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release/$bin"
    file "$out" 2>/dev/null | grep -q 'statically linked\|static-pie linked' || {
        echo "build-agent: $out is not statically linked" >&2
        exit 1
    }
    echo "build-agent: $out"
done
