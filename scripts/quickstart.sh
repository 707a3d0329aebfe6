#!/usr/bin/env bash
# Quickstart on the embedded local defaults: starts the services (`sail up`) on a temporary
# data directory, creates a volume and mounts it twice through FUSE, writes files in one
# mount, commits, reloads the other and reads them lazily, shows two concurrent commits
# merging; then boots a sailbox (a microVM under QEMU), runs commands in it, moves a file in
# and out, and reaches a web server inside it through its ingress listener; last, the same
# from the Python SDK (installed into ~/.cache/sail/sdk-venv). It prints what
# happened with timings and cleans up (terminates, unmounts, stops the service).
# Needs root and /dev/fuse. SKIP_SAILBOX=1 skips the VM part (and its setup).
# SAIL_BIN_DIR=DIR runs the `sail` and `sail-cowfs` already built there instead of building
# them (CI sets it after the test build: a build of just these two packages unifies
# features differently from the workspace build and would recompile part of the tree).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
if [ "${SKIP_SAILBOX:-0}" = 1 ]; then bash scripts/setup.sh; else bash scripts/setup.sh vm; fi
if [ -z "${SAIL_BIN_DIR:-}" ]; then
    echo "== building sail (release; the first build takes a while)"
    cargo build --release -q -p cli -p cowfsd
fi
[ "${SKIP_SAILBOX:-0}" = 1 ] || bash scripts/build-agent.sh
bin_dir="${SAIL_BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}"
sail() { "$bin_dir/sail" "$@"; }

work=$(mktemp -d)
server_pid=""
box=""
child=""
cleanup() {
    for b in $child $box; do "$bin_dir/sail" box terminate "$b" >/dev/null 2>&1; done
    for m in "$work/a" "$work/b"; do
        mountpoint -q "$m" 2>/dev/null && { "$bin_dir/sail" volume unmount "$m" >/dev/null 2>&1 || umount -l "$m"; }
    done
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
t0=$(date +%s%N)
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

step "sail up: volumed on a free port, data in $work/data"
RUST_LOG=warn "$bin_dir/sail" up --data-dir "$work/data" --listen 127.0.0.1:0 >"$work/up.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
    grep -q "listening on" "$work/up.log" 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/up.log"; exit 1; }
    sleep 0.1
done
export SAIL_ENDPOINT=$(sed -n 's/.*listening on \(http:\/\/[^ ]*\).*/\1/p' "$work/up.log")
# `sail up` kept its first admin key where the CLI and SDK find it (docs/tenancy.md): no
# SAIL_API_KEY needed on this machine.
# Every mount reads through a verified chunk cache (one per host; here one per mount, so
# that mount B really fetches lazily).
cat "$work/up.log"
sail key whoami

step "create a volume and mount it twice (two FUSE helpers, like two sailboxes)"
sail volume create demo
mkdir -p "$work/a" "$work/b"
sail --cache-dir "$work/cache-a" volume mount demo "$work/a"
sail --cache-dir "$work/cache-b" volume mount demo "$work/b"
echo "   control socket of mount A: $(getfattr --only-values -n user.sail.control "$work/a" 2>/dev/null || echo '(install attr to see it)')"

step "write in mount A: a notebook, 20 source files and a 40 MiB data file"
mkdir -p "$work/a/src" "$work/a/data"
printf '{"cells": [{"source": "print(1)"}]}\n' > "$work/a/analysis.ipynb"
for i in $(seq 1 20); do printf 'def f%d():\n    return %d\n' "$i" "$i" > "$work/a/src/mod$i.py"; done
head -c $((40 << 20)) /dev/urandom > "$work/data.bin"
cp "$work/data.bin" "$work/a/data/samples.bin"
sail volume status "$work/a"
echo "   mount B sees nothing yet (no live remote view): $(ls "$work/b" | wc -l) entries"

step "commit mount A (only dirty files are chunked; chunks go straight to the store)"
sail volume commit "$work/a"

step "reload mount B: metadata only, no file bytes move yet"
sail volume reload "$work/b"
ls -la "$work/b" "$work/b/data"

step "read in mount B: bytes are fetched on first read, verified, and cached"
t=$(date +%s%N); cmp "$work/b/data/samples.bin" "$work/data.bin" && echo "   data/samples.bin: 40 MiB identical, first read $(ms_since $t) ms"
t=$(date +%s%N); cmp "$work/b/data/samples.bin" "$work/data.bin" && echo "   second read $(ms_since $t) ms (page cache)"
sail volume status "$work/b"

step "edit one byte in the middle of the data file in A: the commit uploads one 8 MiB chunk"
printf 'X' | dd of="$work/a/data/samples.bin" bs=1 seek=$((20 << 20)) conv=notrunc status=none
sail volume commit "$work/a"

step "two mounts commit different files at the same time: both survive (merge)"
echo "from mount A" > "$work/a/a.txt"
echo "from mount B" > "$work/b/b.txt"
sail volume commit "$work/a" & pa=$!
sail volume commit "$work/b" & pb=$!
wait $pa $pb
sail volume reload "$work/a"
sail volume reload "$work/b"
echo "   mount A: $(cat "$work/a/a.txt") / $(cat "$work/a/b.txt")"
echo "   mount B: $(cat "$work/b/a.txt") / $(cat "$work/b/b.txt")"

step "reload discards uncommitted changes"
echo "scratch" > "$work/b/scratch.txt"
sail volume reload "$work/b"
[ -e "$work/b/scratch.txt" ] || echo "   scratch.txt is gone, as promised"

step "the commit log"
sail volume log demo

step "unmount"
sail volume unmount "$work/a"
sail volume unmount "$work/b"

if [ "${SKIP_SAILBOX:-0}" != 1 ]; then
    step "sail doctor: what this host runs sailboxes with"
    sail doctor

    step "create a sailbox (minimal busybox image; the default is Debian with python3)"
    t=$(date +%s%N)
    box=$(sail --json box create --image minimal --port 8080 | python3 -c 'import json,sys; print(json.load(sys.stdin)["sailbox_id"])')
    echo "   $box running after $(ms_since $t) ms (create returns when the guest agent answers)"
    sail box info "$box"

    step "exec: output streams back, the exit code is the command's"
    sail box exec "$box" -- 'uname -sr; echo "$(nproc) cpu, $(free -m | awk "/Mem/ {print \$2}") MiB"; df -h / | tail -1'
    t=$(date +%s%N); sail box exec "$box" -- true; echo "   exec round trip of 'true': $(ms_since $t) ms (including the CLI's start)"
    set +e; sail box exec "$box" -- 'echo failing >&2; exit 3'; code=$?; set -e
    echo "   exit code: $code"

    step "files: 32 MiB in and back out, same hash"
    head -c $((32 << 20)) /dev/urandom > "$work/blob"
    t=$(date +%s%N); sail box write "$box" /data/blob < "$work/blob"; echo "   written in $(ms_since $t) ms"
    sail box read "$box" /data/blob | cmp - "$work/blob" && echo "   read back: identical"

    step "ingress: a web server in the guest, reached from the host"
    sail box exec "$box" -- 'mkdir -p /www && echo "hello from $(hostname)" > /www/index.html'
    sail box exec --background "$box" -- 'httpd -f -p 8080 -h /www'
    sail box listeners "$box" --port 8080 --wait 30
    url=$(sail --json box listeners "$box" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["url"])')
    echo "   curl $url/ -> $(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode().strip())' "$url/")"

    step "snapshots: checkpoint while it runs, fork it, sleep it and wake it with a request"
    sail box exec --background "$box" -- 'i=0; while true; do i=$((i+1)); echo $i > /run/count; sleep 0.2; done'
    sail box checkpoint "$box"
    child=$(sail box fork "$box")
    echo "   fork $child: its counter carries on from the parent's memory: $(sail box exec "$child" -- cat /run/count)"
    sail box exec "$child" -- 'echo "I am the child" > /www/index.html'
    echo "   parent serves: $(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode().strip())' "$url/")"
    sail box terminate "$child"
    child=""
    sail box sleep "$box"
    t=$(date +%s%N)
    echo "   asleep; a request wakes it: $(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=120).read().decode().strip())' "$url/") ($(ms_since $t) ms)"

    step "terminate"
    sail box terminate "$box"
    box=""

    step "one volume mounted in two sailboxes: commit in one, reload in the other"
    t=$(date +%s%N)
    box=$(sail box create --image minimal --name worker-1 --volume shared-data:/mnt/shared --mint)
    child=$(sail box create --image minimal --name worker-2 --volume shared-data:/mnt/shared)
    echo "   $box and $child running with shared-data mounted after $(ms_since $t) ms"
    sail box info "$box" | grep volume
    sail box exec "$box" -- 'echo "{}" > /mnt/shared/nb.ipynb && sail-volume-fuse commit /mnt/shared'
    echo "   worker-2 reloads to $(sail box exec "$child" -- sail-volume-fuse reload /mnt/shared) and reads: $(sail box exec "$child" -- cat /mnt/shared/nb.ipynb)"
    echo "   the host sees it too: $(sail volume cat shared-data nb.ipynb)"
    sail box terminate "$child"
    child=""
    sail box terminate "$box"
    box=""

    step "the same from Python: the SDK (pip install ./sdk/python; here into ~/.cache/sail/sdk-venv)"
    venv="$HOME/.cache/sail/sdk-venv"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check ./sdk/python
    (cd "$work" && "$venv/bin/python" - <<'PY'
import time
import sail

t = time.monotonic()
app = sail.App.find(name="quickstart")
with sail.Sailbox.create(app=app, image="minimal", name="from-python") as sb:
    print(f"   {sb.id} running after {(time.monotonic() - t) * 1000:.0f} ms")
    r = sb.exec("echo hello from $(hostname); exit 7").wait()
    print(f"   exec: {r.stdout.strip()!r}, return code {r.returncode}")
    sb.write("/data/greeting.txt", "hi from Python")
    print(f"   read back: {sb.read('/data/greeting.txt').decode()!r}")
    try:
        sb.exec("sleep 2")
        sb.exec("true")
    except sail.SailboxExecAlreadyRunningError as e:
        print(f"   one exec at a time: {type(e).__name__}")
print("   terminated on leaving the with block")
PY
    )
fi

printf '\nquickstart finished in %s ms; cleaning up %s\n' "$(ms_since $t0)" "$work"
