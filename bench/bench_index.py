#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""How the daemon's metadata scales with the number of chunks.

Stores N small blobs (default 4,194,304: one per 256 KiB chunk of 1 TiB)
directly through qbackupd.storage, each leaf-like blob of 1,024 carrying
refs as chunk maps do, then reports the index size per blob, the number of
files, `have` latency for 4,096 random ids, opening time, and the process's
peak RSS. The data itself is tiny, so the figures are the metadata's alone.

Run by hand: `.venv/bin/python bench/bench_index.py [--blobs 4194304]`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from workload import machine  # noqa: E402

from qbackupd.storage import Storage  # noqa: E402


def blob_id(n: int) -> bytes:
    return hashlib.sha256(n.to_bytes(8, "big")).digest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blobs", type=int, default=4 << 20)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qbackup-index-", dir=args.workdir))
    try:
        storage = Storage(work)
        repo = storage.create("scale", b"opaque config", 64 << 20, "bench")
        t = time.perf_counter()
        leaf: list[bytes] = []
        for n in range(args.blobs):
            i = blob_id(n)
            repo.put(i, 1, b"x" * 48, None)
            leaf.append(i)
            if len(leaf) == 1024:
                repo.put(hashlib.sha256(b"leaf" + i).digest(), 2, b"y" * 64, leaf)
                leaf = []
        repo.flush()
        put_s = time.perf_counter() - t
        repo.close()

        t = time.perf_counter()
        repo = storage.open("scale", True, "bench")
        open_s = time.perf_counter() - t
        rng = random.Random(1)
        lat = []
        for _ in range(20):
            ids = [blob_id(rng.randrange(args.blobs)) if k % 2 else os.urandom(32) for k in range(4096)]
            t = time.perf_counter()
            missing = repo.have(ids)
            lat.append(time.perf_counter() - t)
            assert len(missing) == 2048
        repo.close()
        index = sum(p.stat().st_size for p in (work / "scale").glob("index.sqlite*"))
        files = sum(1 for p in (work / "scale").rglob("*") if p.is_file())
        stats_blobs = args.blobs + args.blobs // 1024
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        lat.sort()
        print(f"\nMachine: {machine()}.\n")
        print("| measure | value |")
        print("|---|---|")
        print(f"| blobs (data + chunk-map nodes with refs) | {stats_blobs:,} |")
        print(f"| store time | {put_s:.0f} s ({stats_blobs / put_s:,.0f} blobs/s) |")
        print(f"| index size (SQLite, WAL) | {index / 2**20:.0f} MiB = {index / stats_blobs:.0f} bytes per blob |")
        print(f"| index / data at 256 KiB chunks | {index / (args.blobs * 256 * 1024):.3%} |")
        print(f"| files in the repository | {files} |")
        print(f"| open for writing (quick_check) | {open_s:.2f} s |")
        print(f"| `have` of 4,096 ids (half held), median / max | "
              f"{lat[len(lat) // 2] * 1000:.0f} ms / {lat[-1] * 1000:.0f} ms |")
        print(f"| peak RSS of the process | {rss:.0f} MiB |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
