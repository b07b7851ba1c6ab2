#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""The floor: what the speed targets need from the per-byte work alone.

Builds the workload of bench_incremental / bench_read (a 2 GiB ext4 image of
real files, then two realistic days of use, as root: loop mounts), counts
the bytes each step must handle, and measures, on those very chunks, one
core's CPU per byte of the work no implementation of this format can skip:

  id        HMAC-SHA256 of the plaintext (the chunk's keyed id)
  compress  zstd at crypto.ZSTD_LEVEL (the sealer's rule: raw if >= 97 %)
  seal      AES-256-GCM of the compressed body
  seal raw  for comparison: AES-256-GCM of the whole plaintext, not compressed
  open      crypto.open_blob: AES-GCM, zstd decompression, HMAC re-identification

From those, per step, the least wall time any implementation could take on
`--cores` cores if the daemon cost nothing, nothing was read from disk,
Python cost nothing and every core were busy all the time:

  full backup     non-zero bytes of the image x (id + compress + seal)
  incremental     bytes of the chunks the day touched x (id + compress + seal)
  restore         non-zero bytes of the latest image x open
  verify          distinct non-zero chunk bytes of the three images x open

and the least ratio incremental / full: the ratio of the bytes (a fixed cost
per run, which both pay, only raises it). Compare with the measured steps
in bench/README.md. Run as root:

    .venv/bin/python bench/bench_floor.py [--size 2G] [--chunk-sizes 256K,64K]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from workload import machine, make_image, realistic_day  # noqa: E402

from qbackup import crypto  # noqa: E402
from qbackup.commands.common import parse_size  # noqa: E402


def chunks(path: Path, chunk_size: int):
    """(index, bytes) of every chunk of the image that is not all zero."""
    zero = bytes(chunk_size)
    with open(path, "rb") as f:
        index = 0
        while chunk := f.read(chunk_size):
            if chunk != zero[:len(chunk)]:
                yield index, chunk
            index += 1


def costs(keys: crypto.Keys, image: Path, chunk_size: int) -> dict:
    """One core's CPU seconds for each kind of work over the image's chunks."""
    sealer = crypto.Sealer(keys)
    spent = {"id": 0.0, "seal": 0.0, "open": 0.0, "seal raw": 0.0}
    plain = 0
    clock = time.thread_time
    for _, chunk in chunks(image, chunk_size):
        plain += len(chunk)
        t0 = clock()
        chunk_id = keys.chunk_id(chunk)
        t1 = clock()
        blob = sealer.seal(crypto.TYPE_DATA, chunk_id, chunk)
        t2 = clock()
        crypto.open_blob(keys, crypto.TYPE_DATA, chunk_id, blob, chunk_size)
        t3 = clock()
        sealer.seal(crypto.TYPE_DATA, chunk_id, chunk, compress=False)
        spent["seal raw"] += clock() - t3
        spent["id"] += t1 - t0
        spent["seal"] += t2 - t1  # compress + AES-GCM
        spent["open"] += t3 - t2
    return {k: v / plain for k, v in spent.items()} | {"plain": plain}


def content(image: Path, chunk_size: int) -> dict[int, tuple[bytes, int]]:
    """Each non-zero chunk's index: (a digest of its content, its length)."""
    return {i: (hashlib.blake2b(c, digest_size=16).digest(), len(c))
            for i, c in chunks(image, chunk_size)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2G", help="image size (default 2G)")
    ap.add_argument("--chunk-sizes", default="256K,64K", help="comma-separated (default 256K,64K)")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                    help="cores the floor may use (default: this machine's)")
    ap.add_argument("--workdir", default=None, help="where to work (default: a temp dir)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_floor.py needs root (the days of use loop-mount the image)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="qbackup-floor-", dir=args.workdir))
    try:
        images = [work / "day0.img", work / "day1.img", work / "day2.img"]
        files = make_image(images[0], parse_size(args.size))
        for day in (1, 2):
            shutil.copyfile(images[day - 1], images[day])
            realistic_day(images[day], seed=day)
        print(f"{machine()}; image {args.size}, {files >> 20} MiB of files; "
              f"zstd level {crypto.ZSTD_LEVEL}; floor on {args.cores} cores, "
              "daemon, disk and Python free\n")
        print("| chunk size | work | CPU ns per byte (one core) |")
        print("|---|---|---:|")
        rows = []
        for chunk_size in (parse_size(s) for s in args.chunk_sizes.split(",")):
            keys = crypto.create_keys(chunk_size)
            c = costs(keys, images[0], chunk_size)
            for k in ("id", "seal", "open", "seal raw"):
                print(f"| {chunk_size >> 10}K | {k} | {c[k] * 1e9:.2f} |")
            maps = [content(p, chunk_size) for p in images]  # one read of each image
            distinct = dict(entry for m in maps for entry in m.values())  # digest -> length
            touched = [sum(length for i, (digest, length) in maps[d].items()
                           if maps[d - 1].get(i, (None,))[0] != digest) for d in (1, 2)]
            latest = sum(length for _, length in maps[2].values())
            backup = c["id"] + c["seal"]
            rows.append((chunk_size, c["plain"], touched, latest, sum(distinct.values()), backup,
                         c["open"]))
        print("\n| chunk size | step | bytes (MiB) | floor s |")
        print("|---|---|---:|---:|")
        n = args.cores
        for chunk_size, full, touched, latest, distinct, backup, opened in rows:
            k = f"{chunk_size >> 10}K"
            print(f"| {k} | full backup | {full >> 20} | {full * backup / n:.2f} |")
            for d, t in enumerate(touched, 1):
                print(f"| {k} | incremental day {d} (touched) | {t >> 20} | {t * backup / n:.2f} |")
            print(f"| {k} | restore of the latest | {latest >> 20} | {latest * opened / n:.2f} |")
            print(f"| {k} | verify of 3 snapshots (distinct) | {distinct >> 20} | "
                  f"{distinct * opened / n:.2f} |")
            print(f"| {k} | least incremental ÷ full | | "
                  f"{min(touched) / full:.3f} – {max(touched) / full:.3f} |")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
