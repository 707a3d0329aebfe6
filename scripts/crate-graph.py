#!/usr/bin/env python3
"""The workspace's crate graph, from `cargo metadata`, and the rules it must keep.

    python3 scripts/crate-graph.py            print the graph (normal dependencies only)
    python3 scripts/crate-graph.py --check    also fail if docs/architecture.md's graph
                                              differs, or a forbidden arrow exists
    python3 scripts/crate-graph.py --write    rewrite the graph in docs/architecture.md

The graph in docs/architecture.md (between the `crate-graph` markers) is this script's output,
so the picture a reader sees is the one `cargo tree` would show. Dev-dependencies (tests
starting a real server, say) and build-dependencies are not arrows of the design.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- crate-graph:begin -->", "<!-- crate-graph:end -->"

# (from, to) pairs that must never appear, directly or through other crates of ours: the
# dependency directions of the design (what a guest runs never links server code).
FORBIDDEN = [
    ("chunkstore", "*"),
    ("sysutil", "*"),
    ("volume-model", "volumed"),
    ("volume-client", "volumed"),
    ("guest-fuse", "volumed"),
    ("guest-fuse", "vmm-host"),
    ("agent", "vmm-host"),
    ("agent", "volumed"),
    ("volumed", "vmm-host"),
    ("vmm-host", "guest-fuse"),
    ("vmm-host", "volumed"),
    ("cowfs", "cowfsd"),
    ("vmm-host", "cowfsd"),
    # Keys and identities are a leaf every side shares: no service, no client library.
    ("tenancy", "volumed"),
    ("tenancy", "vmm-host"),
    ("tenancy", "volume-client"),
    ("tenancy", "chunkstore"),
]


def graph():
    meta = json.loads(subprocess.check_output(
        ["cargo", "metadata", "--format-version", "1", "--no-deps", "--offline"], cwd=ROOT))
    ours = {p["name"] for p in meta["packages"]}
    edges = {}
    for p in meta["packages"]:
        deps = {d["name"] for d in p["dependencies"] if d["kind"] is None and d["name"] in ours}
        edges[p["name"]] = sorted(deps)
    return edges


def render(edges):
    width = max(len(n) for n in edges)
    lines = []
    for name in sorted(edges):
        deps = ", ".join(edges[name]) or "(nothing of ours)"
        lines.append(f"{name.ljust(width)} -> {deps}")
    return "\n".join(lines)


def reach(edges, start):
    seen, todo = set(), list(edges.get(start, []))
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(edges.get(n, []))
    return seen


def main():
    edges = graph()
    text = render(edges)
    print(text)
    if "--write" in sys.argv:
        doc = DOC.read_text()
        head, rest = doc.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        DOC.write_text(f"{head}{BEGIN}\n```\n{text}\n```\n{END}{tail}")
        return 0
    if "--check" not in sys.argv:
        return 0
    bad = []
    for src, dst in FORBIDDEN:
        if src not in edges:
            continue
        reached = reach(edges, src)
        if dst == "*" and reached:
            bad.append(f"{src} must depend on nothing of ours, reaches {sorted(reached)}")
        elif dst in reached:
            bad.append(f"{src} must never reach {dst}")
    doc = DOC.read_text()
    try:
        block = doc.split(BEGIN, 1)[1].split(END, 1)[0]
        documented = block.strip().strip("`").strip()
    except IndexError:
        documented = None
    if documented != text:
        bad.append(f"{DOC.relative_to(ROOT)}: the crate graph between the markers is not the "
                   "one cargo metadata shows; paste this script's output there")
    for b in bad:
        print(f"crate-graph: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
