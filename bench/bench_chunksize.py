#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Which default chunk size? Full and incremental backups at several sizes.

For each chunk size, on the same ext4 image of real files (default 1 GiB):
a full backup, then a "day of use" (scattered rewrites of 4 KiB blocks,
default 3% of them), then the incremental. Reports time, chunks stored (index
entries), bytes sent by the incremental and repository growth.

Run by hand: `.venv/bin/python bench/bench_chunksize.py [--size 1G]`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_backup import Qbackup  # noqa: E402
from workload import day_of_use, machine, make_image  # noqa: E402

from qbackup.commands.common import parse_size  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="image size (default 1G)")
    ap.add_argument("--chunk-sizes", default="64K,256K,1M,4M")
    ap.add_argument("--change", type=float, default=0.03)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="qbackup-chunks-", dir=args.workdir))
    rows = []
    try:
        image = work / "image.img"
        data = make_image(image, size)
        for cs in args.chunk_sizes.split(","):
            run = work / cs
            run.mkdir()
            copy = run / "image.img"
            shutil.copyfile(image, copy)
            q = Qbackup(run, copy, cs)
            try:
                q.init()
                full_s = q.backup("full")
                full = q.last
                grown = q.repo_bytes()
                day_of_use(q.image, args.change)
                inc_s = q.backup("day")
                inc = q.last
                rows.append((cs, full_s, full["chunks_new"], grown, inc_s, inc["bytes_read"],
                             inc["bytes_sent"], inc["chunks_new"], q.repo_bytes() - grown))
            finally:
                q.close()
                shutil.rmtree(run, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mib = 2**20
    print(f"\nMachine: {machine()}. Image: {size / mib:.0f} MiB ext4 with {data / mib:.0f} MiB "
          f"of files; day of use: {args.change:.1%} of 4 KiB blocks rewritten.\n")
    print("| chunk size | full s | full MB/s | chunks stored | repo MiB | incr. s | incr. sent MiB "
          "| incr. new chunks | incr. repo growth MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cs, fs, fchunks, grown, is_, _read, sent, ichunks, igrow in rows:
        print(f"| {cs} | {fs:.1f} | {size / 1e6 / fs:.0f} | {fchunks} | {grown / mib:.0f} | "
              f"{is_:.1f} | {sent / mib:.0f} | {ichunks} | {igrow / mib:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
