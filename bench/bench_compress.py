#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""zstd levels (1-3 by default) and the "incompressible: store raw" rule, on real chunks.

Builds a real ext4 image (workload.make_image), cuts it into chunks of
--chunk-size, drops the all-zero ones (never stored) and, for each zstd
level and each raw threshold, measures in this process (one core):

  seal      compress (the sealer's rule: raw when the frame is not smaller
            than threshold x plain), then AES-256-GCM, as crypto.Sealer does
  open      crypto.open_blob: decrypt, decompress if compressed, HMAC id
  stored    bytes stored (blobs), and how many chunks went raw

Prints a markdown table (MB/s of plaintext, CPU seconds). Run by hand:

    .venv/bin/python bench/bench_compress.py [--size 1G] [--chunk-size 256K]
        [--levels 1,2,3] [--thresholds 1.0,0.97]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from workload import machine, make_image  # noqa: E402

from qbackup import crypto  # noqa: E402
from qbackup.commands.common import parse_size  # noqa: E402


def chunks_of(image: Path, chunk_size: int) -> list[bytes]:
    out = []
    with open(image, "rb") as f:
        while chunk := f.read(chunk_size):
            if chunk.count(0) != len(chunk):
                out.append(chunk)
    return out


def measure(keys: crypto.Keys, chunks: list[bytes], level: int, threshold: float) -> dict:
    crypto.ZSTD_LEVEL, crypto.RAW_THRESHOLD = level, threshold
    crypto._tls.__dict__.clear()  # new compressor at this level
    sealer = crypto.Sealer(keys)
    ids = [keys.chunk_id(c) for c in chunks]
    t = time.process_time()
    blobs = [sealer.seal(crypto.TYPE_DATA, i, c) for i, c in zip(ids, chunks)]
    seal = time.process_time() - t
    t = time.process_time()
    for i, b in zip(ids, blobs):
        crypto.open_blob(keys, crypto.TYPE_DATA, i, b, keys.chunk_size)
    opened = time.process_time() - t
    plain = sum(map(len, chunks))
    raw = sum(1 for b, c in zip(blobs, chunks) if len(b) == crypto.max_blob_size(len(c)))
    return {"seal": seal, "open": opened, "stored": sum(map(len, blobs)), "plain": plain, "raw": raw}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="image size (default 1G)")
    ap.add_argument("--chunk-size", default="256K", help="chunk size (default 256K)")
    ap.add_argument("--levels", default="1,2,3",
                    help="comma-separated zstd levels; negative ones are zstd's --fast "
                         "(default 1,2,3)")
    ap.add_argument("--thresholds", default="1.0,0.97",
                    help="comma-separated raw thresholds (default 1.0,0.97)")
    args = ap.parse_args()
    size, cs = parse_size(args.size), parse_size(args.chunk_size)
    with tempfile.TemporaryDirectory(prefix="qbackup-bench-compress-") as work:
        image = Path(work) / "image.img"
        data = make_image(image, size)
        chunks = chunks_of(image, cs)
    keys = crypto.create_keys(cs)
    plain = sum(map(len, chunks))
    print(f"\nMachine: {machine()}. Image: {size / 2**20:.0f} MiB ext4 ({data / 2**20:.0f} MiB "
          f"of files from /usr): {len(chunks)} non-zero chunks of {args.chunk_size}, "
          f"{plain / 2**20:.0f} MiB. One core, CPU time.\n")
    print("| zstd level | raw if frame ≥ | chunks stored raw | stored MiB | ratio | "
          "seal MB/s | open MB/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for level in (int(x) for x in args.levels.split(",")):
        for threshold in (float(x) for x in args.thresholds.split(",")):
            r = measure(keys, chunks, level, threshold)
            print(f"| {level} | {threshold:.0%} | {r['raw']} | {r['stored'] / 2**20:.0f} | "
                  f"{r['stored'] / plain:.3f} | {plain / r['seal'] / 1e6:.0f} | "
                  f"{plain / r['open'] / 1e6:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
