#!/usr/bin/env bash
# Installs what building (and, with `test`, testing) needs, skipping what is already there.
# Debian 12, as root. Safe to run repeatedly.
#   bash scripts/setup.sh        build dependencies (apt)
#   bash scripts/setup.sh test   also the test tools (s3s-fs, cargo-fuzz)
set -euo pipefail

need_apt=()
for pkg in protobuf-compiler librocksdb-dev libclang-dev pkg-config fio fuse3 attr; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
    echo "setup: apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

export PATH="$HOME/.cargo/bin:$PATH"
[ "${1:-}" = test ] || exit 0
# pytest runs the Python SDK's tests against a real mount.
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
