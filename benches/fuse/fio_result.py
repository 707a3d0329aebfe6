"""Reads fio's JSON on stdin; prints read bandwidth in MiB/s (default) or IOPS (`iops`)."""
import json
import sys

read = json.load(sys.stdin)["jobs"][0]["read"]
if len(sys.argv) > 1 and sys.argv[1] == "iops":
    print(f"{read['iops']:.0f}")
else:
    print(f"{read['bw_bytes'] / 2**20:.0f}")
