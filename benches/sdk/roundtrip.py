"""Round-trip overhead of the Python SDK against the same exec through raw gRPC and the CLI,
in one run on one sailbox.

Rows (each N times, median and p90):
  raw gRPC      Exec + WaitExec through the generated stubs alone (the floor for a client)
  SDK exec      sb.exec("true").wait()
  CLI exec      `sail box exec ID -- true` (a new process and channel each time)
  SDK function  sb.exec(noop) with @sail.function() (upload payload, exec python3, result)
  raw python3   `python3 -c pass` through raw gRPC: what the guest's interpreter start costs
  raw import    python3 importing the function runtime's cloudpickle (from the uploaded zip)
                through raw gRPC: the floor under a function call in the guest

Usage (root; the VM kit installed, the SDK installed in the Python that runs this):
  SAIL_AGENT_BIN=... python benches/sdk/roundtrip.py [--n 30] [--image debian]
It starts its own `sail up` on a temporary directory (binaries from SAIL_BIN_DIR, default
~/.cache/sail/target/release) unless SAIL_API_URL points at a running one.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time

import sail


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


@sail.function()
def noop() -> None:
    return None


def start_service(bin_dir: str) -> tuple[subprocess.Popen, str, str]:
    root = tempfile.mkdtemp(prefix="sail-bench-sdk-")
    proc = subprocess.Popen([os.path.join(bin_dir, "sail"), "up", "--data-dir", os.path.join(root, "data"),
                             "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = threading.Event()
    endpoint = []

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if m and not found.is_set():
                endpoint.append(m.group(1))
                found.set()

    threading.Thread(target=drain, daemon=True).start()
    if not found.wait(60):
        proc.kill()
        raise SystemExit("`sail up` did not start")
    return proc, endpoint[0], root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--image", default="debian")
    args = ap.parse_args()
    bin_dir = os.environ.get("SAIL_BIN_DIR") or os.path.expanduser("~/.cache/sail/target/release")
    proc = root = None
    if not os.environ.get("SAIL_API_URL"):
        proc, endpoint, root = start_service(bin_dir)
        os.environ["SAIL_API_URL"] = endpoint
    endpoint = os.environ["SAIL_API_URL"]
    sb = None
    try:
        t = time.monotonic()
        sail.ensure_image(args.image, timeout=1800)
        sb = sail.Sailbox.create(app="bench", image=args.image)
        print(f"sailbox {sb.id} ({args.image}) ready in {time.monotonic() - t:.1f} s; {args.n} round trips per row")

        from sail._pb import sailbox_pb2 as pb
        from sail._pb import sailbox_pb2_grpc
        import grpc

        chan = grpc.insecure_channel(endpoint.split("://", 1)[1])
        stub = sailbox_pb2_grpc.SailboxServiceStub(chan)

        def raw(cmd: str) -> None:
            h = stub.Exec(pb.ExecRequest(sailbox_id=sb.id, command=cmd))
            r = stub.WaitExec(pb.WaitExecRequest(exec_id=h.exec_id))
            assert r.return_code == 0

        def sdk() -> None:
            assert sb.exec("true").wait().returncode == 0

        def cli() -> None:
            subprocess.run([os.path.join(bin_dir, "sail"), "--endpoint", endpoint, "box", "exec", sb.id, "--", "true"],
                           check=True, stdout=subprocess.DEVNULL)

        def fn() -> None:
            assert sb.exec(noop) is None

        from sail import functions

        fn()  # uploads the runtime zip
        rt_path = functions._runtime()[0]
        import_rt = f"python3 -c 'import sys; sys.path.insert(0, \"{rt_path}\"); import cloudpickle'"
        rows = [("raw gRPC exec", lambda: raw("true")), ("SDK exec", sdk), ("CLI exec", cli),
                ("SDK function", fn), ("raw gRPC python3 -c pass", lambda: raw("python3 -c pass")),
                ("raw gRPC import cloudpickle", lambda: raw(import_rt))]
        results = {}
        for name, f in rows:
            f()  # warm: channel, runtime upload
            times = []
            for _ in range(args.n):
                t = time.perf_counter()
                f()
                times.append((time.perf_counter() - t) * 1000)
            results[name] = times
        base = statistics.median(results["raw gRPC exec"])
        print(f"{'row':<28}{'median ms':>10}{'p90 ms':>10}{'vs raw':>9}")
        for name, times in results.items():
            med = statistics.median(times)
            print(f"{name:<28}{med:>10.2f}{pct(times, 90):>10.2f}{med / base:>8.2f}x")
    finally:
        if sb is not None:
            try:
                sb.terminate()
            except sail.SailError:
                pass
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
