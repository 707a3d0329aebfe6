#!/usr/bin/env bash
# FUSE volume benchmarks (issue 4): fio and small-file workloads on a real mount, each run in
# the same session against the same files on the local ext4 disk, printed as a table with
# ratios. Warm reads are measured twice on the same file: on a mount with FUSE passthrough
# (the default; the kernel reads an assembled local copy) and on one mounted with
# --no-passthrough (every read goes through the helper or the FUSE page cache).
# Run as root (FUSE, drop_caches):
#   bash benches/fuse/run.sh            full run (1 GiB file, 10k-file tree, 100k-file volume)
#   QUICK=1 bash benches/fuse/run.sh    smaller sizes, for a smoke test
#   SECTIONS=read,small,many            which parts to run (default: all)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sail/target}
(cd "$ROOT" && cargo build --release --quiet -p cli -p cowfsd -p benches --bin sail --bin sail-cowfs --bin wakeup)
SAIL=$CARGO_TARGET_DIR/release/sail
QUICK=${QUICK:-0}
SIZE_MIB=$([ "$QUICK" = 1 ] && echo 256 || echo 1024)
SMALL_FILES=$([ "$QUICK" = 1 ] && echo 2000 || echo 10000)
MANY_FILES=$([ "$QUICK" = 1 ] && echo 10000 || echo 100000)
RUNTIME=$([ "$QUICK" = 1 ] && echo 3 || echo 10)
SECTIONS=${SECTIONS:-read,small,many}
want() { [[ ",$SECTIONS," == *",$1,"* ]]; }

W=$(mktemp -d /var/tmp/sail-bench.XXXXXX)
UP_PID=
MOUNTS=()
cleanup() {
    for m in "${MOUNTS[@]}"; do "$SAIL" volume unmount "$m" >/dev/null 2>&1 || umount -l "$m" 2>/dev/null || true; done
    [ -n "$UP_PID" ] && kill "$UP_PID" 2>/dev/null && wait "$UP_PID" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT

"$SAIL" up --data-dir "$W/data" --listen 127.0.0.1:0 >"$W/up.log" 2>&1 &
UP_PID=$!
for _ in $(seq 300); do grep -q "listening on" "$W/up.log" && break; sleep 0.02; done
export SAIL_ENDPOINT=$(grep -o 'http://[0-9.:]*' "$W/up.log" | head -1)
"$SAIL" volume create bench >/dev/null

mount_vol() { # [PIN=CPU] mount_vol DIR CACHE_DIR [MOUNT FLAGS...]; PIN pins the helper to CPU
    mkdir -p "$1"
    MOUNTS+=("$1")
    ${PIN:+taskset -c "$PIN"} "$SAIL" --cache-dir "$2" volume mount "${@:3}" bench "$1" >/dev/null
}
status_field() { # status_field MOUNT FIELD
    "$SAIL" --json volume status "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$2"
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
wait_cache_filled() { # wait_cache_filled MOUNT: until its background cache fills stop
    local prev=-1 cur
    for _ in $(seq 100); do cur=$(status_field "$1" cache_bytes); [ "$cur" = "$prev" ] && break; prev=$cur; sleep 0.3; done
}
# Busy CPU-seconds of the whole machine so far (user, nice, system, irq, softirq; guest time
# is inside user, steal is not ours): read around a run, it is the CPU that run cost.
cpu_busy_s() { awk '/^cpu /{ printf "%.2f\n", ($2 + $3 + $4 + $7 + $8) / 100 }' /proc/stat; }
fio_bw() { # fio_bw JOBFILE FILE JOBS -> MiB/s
    FILE=$2 JOBS=$3 RUNTIME=$RUNTIME fio --output-format=json "$HERE/jobs/$1" | python3 "$HERE/fio_result.py"
}
fio_iops() {
    FILE=$2 JOBS=1 RUNTIME=$RUNTIME fio --output-format=json "$HERE/jobs/$1" | python3 "$HERE/fio_result.py" iops
}
now() { date +%s.%N; }
ms_between() { python3 -c "import sys; print(f'{(float(sys.argv[2]) - float(sys.argv[1])) * 1000:.0f}')" "$1" "$2"; }
ms_since() { ms_between "$1" "$(now)"; }
ttfb_ms() { # time to the first 4 KiB of a file, in ms (process start excluded)
    python3 -c '
import os, sys, time
t = time.perf_counter(); fd = os.open(sys.argv[1], os.O_RDONLY); os.read(fd, 4096)
print(f"{(time.perf_counter() - t) * 1000:.1f}")' "$1"
}
median() { python3 -c 'import statistics,sys; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.1f}")' "$@"; }

ROWS=()
row() { ROWS+=("$1|$2|$3|$4|$5"); } # name | local | sail | ratio | target

mount_vol "$W/m1" "$W/cache1"
mount_vol "$W/m2" "$W/cache2"
if want read; then
echo "bench: preparing a ${SIZE_MIB} MiB file ($W)" >&2
mkdir -p "$W/local"
head -c "${SIZE_MIB}M" /dev/urandom >"$W/local/big.bin"
cp "$W/local/big.bin" "$W/m1/big.bin"
"$SAIL" volume commit "$W/m1" >/dev/null

# Cold sequential read: empty cache, chunks in the local backend, page cache dropped.
mount_vol "$W/cold" "$W/cache-cold"
drop_caches
c0=$(cpu_busy_s); cold_local=$(fio_bw seqread.fio "$W/local/big.bin" 1); c1=$(cpu_busy_s)
drop_caches
c2=$(cpu_busy_s); cold_sail=$(fio_bw seqread.fio "$W/cold/big.bin" 1)
wait_cache_filled "$W/cold"; sync; c3=$(cpu_busy_s)
row "seq read cold, 256k, 1 job (MiB/s)" "$cold_local" "$cold_sail" "" ">= 60%"
# What the cold read costs in CPU (fio, the helper, volumed and the kernel for them), and
# the throughput that cost allows when every CPU of the machine does nothing else.
per_gib() { python3 -c 'import sys; print(f"{(float(sys.argv[2]) - float(sys.argv[1])) * 1024e3 / float(sys.argv[3]):.0f}")' "$1" "$2" "$SIZE_MIB"; }
cpu_local=$(per_gib "$c0" "$c1"); cpu_sail=$(per_gib "$c2" "$c3")
row "  CPU time per GiB read, whole machine (ms)" "$cpu_local" "$cpu_sail" "" ""
ceiling=$(python3 -c 'import os, sys; print(f"{os.cpu_count() * 1024e3 / max(float(sys.argv[1]), 0.001):.0f}")' "$cpu_sail")
row "  CPU-bound ceiling of the mount at $(nproc) CPUs (MiB/s)" "$cold_local" "$ceiling" "" ""

# Time to first byte, cold (fresh mount and cache each time).
t_local=(); t_sail=()
for i in 1 2 3 4 5; do
    mount_vol "$W/ttfb$i" "$W/cache-ttfb$i"
    drop_caches
    t_local+=("$(ttfb_ms "$W/local/big.bin")")
    t_sail+=("$(ttfb_ms "$W/ttfb$i/big.bin")")
done
row "time to first byte, cold (ms, median of 5)" "$(median "${t_local[@]}")" "$(median "${t_sail[@]}")" "" "<= 20 ms"

# Warm: mounts that have read the file once (and finished filling their caches): m2 with
# passthrough (the default), m3 without.
mount_vol "$W/m3" "$W/cache3" --no-passthrough
warm() { # warm MOUNT
    "$SAIL" volume reload "$1" >/dev/null
    cat "$1/big.bin" >/dev/null
    wait_cache_filled "$1"
}
warm "$W/m2"
warm "$W/m3"
# Passthrough reads an assembled copy of the file; an open of the fully cached file starts
# building it in the background. Wait until it is there.
for _ in $(seq 600); do
    [ "$(status_field "$W/m2" assembled_files)" -ge 1 ] && [ "$(status_field "$W/m2" assembling)" = 0 ] && break
    head -c 1 "$W/m2/big.bin" >/dev/null
    sleep 0.1
done
sync
cat "$W/local/big.bin" >/dev/null
pt_before=$(status_field "$W/m2" passthrough_opens)
for jobs in 1 4; do
    l=$(fio_bw seqread_warm.fio "$W/local/big.bin" $jobs)
    p=$(fio_bw seqread_warm.fio "$W/m2/big.bin" $jobs)
    s=$(fio_bw seqread_warm.fio "$W/m3/big.bin" $jobs)
    row "seq read warm, 256k, $jobs job(s), passthrough (MiB/s)" "$l" "$p" "" ">= 80%"
    row "seq read warm, 256k, $jobs job(s), --no-passthrough (MiB/s)" "$l" "$s" "" ">= 80%"
done
l=$(fio_iops randread.fio "$W/local/big.bin")
p=$(fio_iops randread.fio "$W/m2/big.bin")
s=$(fio_iops randread.fio "$W/m3/big.bin")
row "rand read warm, 4k, 1 job, passthrough (IOPS)" "$l" "$p" "" ">= 50%"
row "rand read warm, 4k, 1 job, --no-passthrough (IOPS)" "$l" "$s" "" ">= 50%"
# Chunks cached locally but the page cache dropped (a reader long after the first one):
# passthrough reads the assembled file from disk; the plain path reads and verifies chunks.
drop_caches
l=$(fio_bw seqread.fio "$W/local/big.bin" 1)
drop_caches
p=$(fio_bw seqread.fio "$W/m2/big.bin" 1)
drop_caches
s=$(fio_bw seqread.fio "$W/m3/big.bin" 1)
row "seq read, chunks cached, no page cache, passthrough (MiB/s)" "$l" "$p" "" ""
row "seq read, chunks cached, no page cache, --no-passthrough (MiB/s)" "$l" "$s" "" ""
pt_opens=$(( $(status_field "$W/m2" passthrough_opens) - pt_before ))
echo "bench: $pt_opens passthrough opens on the passthrough mount, $(status_field "$W/m3" passthrough_opens) on the --no-passthrough one" >&2
[ "$pt_opens" -ge 7 ] || echo "bench: WARNING: the passthrough rows did not use passthrough (see the helper log)" >&2
fi

# Small files: unpack a source tree, then commit it; reload + find on another mount.
if want small; then
echo "bench: small files ($SMALL_FILES)" >&2
python3 "$HERE/gen_tree.py" "$W/tree" "$SMALL_FILES" 25
tar -C "$W/tree" -cf "$W/tree.tar" .
drop_caches
mkdir -p "$W/local/src"
t0=$(now); tar -C "$W/local/src" -xf "$W/tree.tar"; t1=$(now); sync -f "$W/local/src"; l=$(ms_since "$t0")
l_tar=$(ms_between "$t0" "$t1")
mkdir -p "$W/m1/src"
t0=$(now); tar -C "$W/m1/src" -xf "$W/tree.tar"; t1=$(now); "$SAIL" --json volume commit "$W/m1" >"$W/commit.json"; s=$(ms_since "$t0")
s_tar=$(ms_between "$t0" "$t1")
echo "bench: of which tar $s_tar ms, then commit:" \
    "$(python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print(", ".join(f"{k} {c[k]:.0f}" for k in ("elapsed_ms","hash_ms","upload_ms","publish_ms")), "(%d batches)" % c["batches"])' "$W/commit.json")" >&2
row "unpack $SMALL_FILES files (+ commit) (ms)" "$l" "$s" "" "<= 3x local"
row "  of which tar -x alone (ms)" "$l_tar" "$s_tar" "" ""
# Diagnostic: the same unpack with tar and a fresh helper both on CPU 0. Every FUSE request
# wakes the helper and every reply wakes tar; on different CPUs each wake-up is an IPI,
# which on this kind of VM costs more than the request itself (docs/benchmarks.md).
mkdir -p "$W/local/src-cpu0"
PIN=0 mount_vol "$W/m4" "$W/cache4"
mkdir -p "$W/m4/src-cpu0"
drop_caches
t0=$(now); taskset -c 0 tar -C "$W/local/src-cpu0" -xf "$W/tree.tar"; l=$(ms_since "$t0")
t0=$(now); taskset -c 0 tar -C "$W/m4/src-cpu0" -xf "$W/tree.tar"; s=$(ms_since "$t0")
row "  tar -x alone, tar and helper on CPU 0 (ms, diagnostic)" "$l" "$s" "" ""
# The floor under those requests: one synchronous round trip, as a thread ping-pong (no
# FUSE) and as a getxattr the helper answers from memory, on m1 (helper placed by the
# scheduler) and on m4 (helper pinned to CPU 0).
echo "bench: round trips on $W/m1 (helper unpinned), then on $W/m4 (helper on CPU 0)" >&2
"$CARGO_TARGET_DIR/release/wakeup" --rounds 5000 --mount "$W/m1"
"$CARGO_TARGET_DIR/release/wakeup" --rounds 5000 --mount "$W/m4"
t0=$(now); find "$W/local/src" | wc -l >/dev/null; l=$(ms_since "$t0")
t0=$(now); "$SAIL" volume reload "$W/m2" >/dev/null; find "$W/m2/src" | wc -l >/dev/null; s=$(ms_since "$t0")
row "reload + find over them on another mount (ms)" "$l" "$s" "" ""
fi

# One changed file in a mounted volume of many files, committed from the CLI.
if want many; then
echo "bench: $MANY_FILES-file volume" >&2
python3 "$HERE/gen_tree.py" "$W/many" "$MANY_FILES" 100 tiny
half=$((MANY_FILES / 2))
(cd "$W/many" && find . -type f | sort >"$W/many.list")
mkdir -p "$W/m1/many"
head -n "$half" "$W/many.list" | tar -C "$W/many" -cf - -T - | tar -C "$W/m1/many" -xf -
"$SAIL" volume commit "$W/m1" >/dev/null
tail -n +"$((half + 1))" "$W/many.list" | tar -C "$W/many" -cf - -T - | tar -C "$W/m1/many" -xf -
"$SAIL" volume commit "$W/m1" >/dev/null
target=$W/m1/many/$(sed -n "$((half + 7))p" "$W/many.list")
times=()
for i in 1 2 3 4 5 6 7; do
    echo "change $i" >"$target"
    t0=$(now); "$SAIL" volume commit "$W/m1" >/dev/null; times+=("$(ms_since "$t0")")
done
row "commit 1 changed file of $MANY_FILES, CLI end to end (ms, median of 7)" "" "$(median "${times[@]}")" "" "<= 50 ms"
fi

printf '\n%-66s %12s %12s %8s  %s\n' "benchmark" "local ext4" "sail mount" "ratio" "target"
for r in "${ROWS[@]}"; do
    IFS='|' read -r name l s _ tgt <<<"$r"
    ratio=""
    if [ -n "$l" ] && [ -n "$s" ]; then
        case "$name" in
        *"(ms"*) ratio=$(python3 -c 'import sys; print(f"{float(sys.argv[1]) / max(float(sys.argv[2]), 0.001):.2f}x")' "$s" "$l") ;;
        *) ratio=$(python3 -c 'import sys; print(f"{100 * float(sys.argv[1]) / max(float(sys.argv[2]), 0.001):.0f}%")' "$s" "$l") ;;
        esac
    fi
    printf '%-66s %12s %12s %8s  %s\n' "$name" "$l" "$s" "$ratio" "$tgt"
done
