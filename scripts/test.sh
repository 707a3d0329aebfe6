#!/usr/bin/env bash
# The whole test suite: installs what it needs, builds once in release, runs every unit,
# integration and doc test (FUSE tests need root and /dev/fuse; sailbox tests boot real VMs
# under QEMU), the Python SDK's tests, then each fuzz target for a bounded time.
#   FUZZ_SECONDS=N  seconds per fuzz target (default 30; 0 skips fuzzing)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export PATH="$HOME/.cargo/bin:$PATH"

# Style first: it fails fast and costs nothing (rustfmt.toml holds the settings).
cargo fmt --all --check
# Release everywhere: one compile serves tests, benches and binaries.
cargo build --release --workspace --all-targets
# Lints: clippy under [workspace.lints] (Cargo.toml), every warning an error. --release
# shares the build scripts' outputs (RocksDB's C++ build) with the build above.
cargo clippy --release --workspace --all-targets -- -D warnings
# The crate graph keeps its directions, and docs/architecture.md shows the real one.
python3 scripts/crate-graph.py --check >/dev/null
# vmm-host links the cowfs library only; the FUSE daemon (cowfsd, fuser) stays out of it.
vmm_tree=$(cargo tree -p vmm-host -e normal); if grep -q fuser <<<"$vmm_tree"; then echo "error: vmm-host links fuser (it must use the cowfs library, not the cowfsd daemon)" >&2; exit 1; fi
# The FUSE mount helper runs inside guests: its normal dependencies must never reach the
# server side (volumed, RocksDB's C++ library, the HTTP server, the S3 SDK). It links
# volume-client and volume-model instead (docs/volume-client.md).
# The same holds for the agent (PID 1 of every guest), which serves gRPC itself (tonic's
# router brings axum, so axum is allowed there).
for guest_crate in guest-fuse agent; do
    forbidden='volumed|vmm-host|rocksdb|librocksdb-sys|aws-sdk-[a-z0-9-]+'
    [ "$guest_crate" = guest-fuse ] && forbidden="$forbidden|axum"
    guest_deps=$(cargo tree -p "$guest_crate" -e normal --prefix none --format '{p}')
    if server_side=$(grep -E "^($forbidden) " <<<"$guest_deps"); then
        echo "$guest_crate runs in guests and must not depend on server-side crates, but its dependency tree has:" >&2
        sort -u <<<"$server_side" >&2
        exit 1
    fi
done
# The guest agent and mount helper, statically linked (guests boot the agent as PID 1); the
# VM tests find them here.
bash scripts/build-agent.sh
export SAIL_AGENT_BIN="${CARGO_TARGET_DIR:-$PWD/target}/x86_64-unknown-linux-gnu/release/sail-agent"
results=$(mktemp)
trap 'rm -f "$results"' EXIT
cargo test --release --workspace --no-fail-fast 2>&1 | tee "$results"

# The Python SDK, installed as a user installs it (the build generates its gRPC stubs from
# proto/), against real FUSE mounts and real VMs served by the binaries just built. pytest
# runs from outside the source tree so it imports the installed package.
sdk_venv="$HOME/.cache/sail/sdk-venv"
[ -x "$sdk_venv/bin/python" ] || python3 -m venv "$sdk_venv"
"$sdk_venv/bin/pip" install --quiet --disable-pip-version-check pytest grpcio-tools
"$sdk_venv/bin/pip" install --quiet --disable-pip-version-check ./sdk/python
"$sdk_venv/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps ./sdk/python
(cd /tmp && SAIL_BIN_DIR="${CARGO_TARGET_DIR:-$PWD/target}/release" SAIL_PROTO_DIR="$OLDPWD/proto/proto" \
    "$sdk_venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$OLDPWD/sdk/python" "$OLDPWD/sdk/python/tests") 2>&1 | tee -a "$results"

fuzz_seconds="${FUZZ_SECONDS:-30}"
if [ "$fuzz_seconds" -gt 0 ]; then
    # cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
    export RUSTC_BOOTSTRAP=1
    # Sanitizer-flag builds get their own target dir so they never invalidate the main one.
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}/fuzz"
    (cd fuzz && cargo fuzz build --release --sanitizer none)
    for target in tree_node_decode commit_validate path_normalize batch_frames; do
        echo "fuzz: $target for ${fuzz_seconds}s"
        mkdir -p "fuzz/corpus/$target" "fuzz/seeds/$target"
        # New inputs go to corpus/ (not committed); seeds/ holds committed valid inputs
        # so every run reaches the accept path from its first second.
        (cd fuzz && cargo fuzz run --release --sanitizer none "$target" "corpus/$target" "seeds/$target" -- \
            -max_total_time="$fuzz_seconds" -print_final_stats=1 2>&1 | tail -n 12)
    done
fi
# One closing line summing every cargo test result (unit, integration and doc tests).
awk '/^test result:/ { p += $4; f += $6 }
     / passed in / { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$results"
