#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""End-to-end backup benchmark: qbackup against cat, b2sum, zstd, restic, borg.

Builds a real ext4 image (default 2 GiB, ~65% real files from /usr), then,
in one run and on the same file:

  cat > /dev/null, b2sum, zstd -3 -T0       what reading / hashing /
                                            compressing alone costs
  qbackup full backup, unchanged re-run,    through the simulated dom0 and
  "day of use" incremental, verify, restore the real daemon over its socket
  restic, borg (Debian packages)            the same three backups

and prints a markdown table (seconds, MB/s of the image size, repository
growth, ratio to qbackup). The page cache is warm for every tool alike (the
image is read once first); this machine cannot reliably drop caches.

Run by hand: `.venv/bin/python bench/bench_backup.py [--size 2G]`.
restic and borg come from `QBACKUP_BENCH=1 scripts/setup.sh`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from workload import (Borg, QbackupCli, Restic, day_of_use, machine, make_image,  # noqa: E402
                      timed)

from qbackup.commands.common import parse_size  # noqa: E402
from qbackup_sim.inventory import create_sim  # noqa: E402

DEVNULL = subprocess.DEVNULL


class Qbackup(QbackupCli):
    def __init__(self, work: Path, image: Path, chunk_size: str) -> None:
        sim = work / "sim"
        create_sim(sim, {"bench": {"class": "AppVM", "volumes": {"private": image.stat().st_size}}})
        super().__init__(sim, work, chunk_size)
        self.image = sim / "volumes/bench/private.img"
        os.replace(image, self.image)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2G", help="image size (default 2G)")
    ap.add_argument("--chunk-size", default="256K", help="qbackup chunk size (default 256K)")
    ap.add_argument("--change", type=float, default=0.03,
                    help="fraction of 4 KiB blocks rewritten for the incremental (default 0.03)")
    ap.add_argument("--workdir", default=None, help="where to work (default: a temp dir in /work or /tmp)")
    ap.add_argument("--no-others", action="store_true", help="skip restic and borg")
    args = ap.parse_args()

    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="qbackup-bench-", dir=args.workdir))
    rows: list[tuple[str, float, int | None, str]] = []
    try:
        image = work / "image.img"
        data = make_image(image, size)
        print(f"image: {size / 2**20:.0f} MiB ext4, {data / 2**20:.0f} MiB of real files", file=sys.stderr)
        timed(["cat", str(image)], stdout=DEVNULL)  # warm the page cache for everyone
        for label, argv in [("cat > /dev/null", ["cat", str(image)]),
                            ("b2sum", ["b2sum", str(image)]),
                            ("zstd -3 -T0", ["zstd", "-3", "-T0", "-c", "-q", str(image)])]:
            rows.append((label, timed(argv, stdout=DEVNULL), None, ""))

        # Every tool gets its own copy of the image so all see the same bytes.
        q_image = work / "q.img"
        shutil.copyfile(image, q_image)
        tools: list = [Qbackup(work, q_image, args.chunk_size)]
        if not args.no_others:
            for cls in (Restic, Borg):
                if shutil.which(cls.name):
                    copy = work / f"{cls.name}.img"
                    shutil.copyfile(image, copy)
                    tools.append(cls(work, copy))
                else:
                    print(f"{cls.name} not installed: skipped", file=sys.stderr)
        image.unlink()

        results: dict[str, dict[str, tuple[float, int]]] = {}
        for tool in tools:
            tool.init()
            r: dict[str, tuple[float, int]] = {}
            before = tool.repo_bytes()
            r["full backup"] = (tool.backup("full"), tool.repo_bytes() - before)
            before = tool.repo_bytes()
            r["unchanged re-run"] = (tool.backup("again"), tool.repo_bytes() - before)
            day_of_use(tool.image, args.change)
            timed(["cat", str(tool.image)], stdout=DEVNULL)
            before = tool.repo_bytes()
            r[f"incremental ({args.change:.0%} of blocks changed)"] = (
                tool.backup("day"), tool.repo_bytes() - before)
            results[tool.name] = r
        q = tools[0]
        verify_s = q.cli("verify", "latest", "--json")
        restore_dir = work / "restore"
        restore_s = q.cli("restore", "latest", "--to", str(restore_dir))
        if subprocess.run(["cmp", str(q.image), str(restore_dir / "bench/private.img")]).returncode:
            print("RESTORED IMAGE DIFFERS", file=sys.stderr)
            return 1
        q.close()

        mb = size / 1e6
        print(f"\nMachine: {machine()}. Image: {size / 2**20:.0f} MiB ext4 "
              f"({data / 2**20:.0f} MiB of files from /usr), warm page cache, "
              f"qbackup chunk size {args.chunk_size}.\n")
        print("| step | tool | seconds | MB/s (image) | repo growth MiB | time vs qbackup |")
        print("|---|---|---:|---:|---:|---:|")
        for label, secs, _, _ in rows:
            print(f"| read/hash/compress alone | {label} | {secs:.1f} | {mb / secs:.0f} | | |")
        for step in results["qbackup"]:
            base = results["qbackup"][step][0]
            for name, r in results.items():
                secs, grew = r[step]
                print(f"| {step} | {name} | {secs:.1f} | {mb / secs:.0f} | "
                      f"{grew / 2**20:.0f} | {secs / base:.2f}x |")
        print(f"| verify (latest) | qbackup | {verify_s:.1f} | {mb / verify_s:.0f} | | |")
        print(f"| restore (latest, to file) | qbackup | {restore_s:.1f} | {mb / restore_s:.0f} | | |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
