"""Writes a synthetic source tree: FILES files spread over directories of PER_DIR files,
with sizes like a code base (mostly 0.2-16 KiB). Deterministic for a given seed."""
import os, random, sys

root, files, per_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
small = len(sys.argv) > 4 and sys.argv[4] == "tiny"
rng = random.Random(42)
exts = [".rs", ".py", ".c", ".h", ".md", ".toml", ".json", ".txt"]
for i in range(files):
    d = os.path.join(root, f"pkg{i // per_dir // 20:03d}", f"mod{i // per_dir:04d}")
    if i % per_dir == 0:
        os.makedirs(d, exist_ok=True)
    size = 100 if small else int(min(16384, rng.lognormvariate(8.0, 1.0)))
    with open(os.path.join(d, f"file{i:06d}{rng.choice(exts)}"), "wb") as f:
        f.write(rng.randbytes(size))
