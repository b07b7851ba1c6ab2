#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Incremental backups with change tracking, against restic and borg.

As root (loop devices): a btrfs file system on a loop device holds a Qubes
file-reflink pool (the sim's --pool-dir, Qubes' layout); in it, a qube's
2 GiB private volume, an ext4 image holding real files of this machine.
Then, in one run, on the same image series for every tool:

  full backup                         qbackup, restic, borg
  unchanged re-run                    qbackup, restic, borg
  day 1 of use, then incremental      "
  day 2 of use, then incremental      "

A day of use (workload.realistic_day) goes through the kernel: the ext4
image is loop-mounted and changed with file operations (pages rewritten in
place inside files, logs appended, files replaced, new real files, files
deleted), then unmounted. Wall and CPU seconds (qbackup: client and
daemon; others: their process) for each step. qbackup reads only its reflink copies and,
after the first backup, only what FIEMAP says changed; restic and borg
read the whole image. For each day: the 4 KiB blocks and 256 KiB chunks
whose content changed (comparing the images), and what qbackup read.
The restored latest snapshot is compared with the image byte for byte.

Run: `QBACKUP_BENCH=1 scripts/setup.sh`, then as root
`.venv/bin/python bench/bench_incremental.py [--size 2G] [--workdir DIR]`.
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
from workload import (Borg, QbackupCli, Restic, children_cpu, machine,  # noqa: E402
                      make_image, process_cpu, realistic_day, timed, touched)

from qbackup.commands.common import parse_size  # noqa: E402
from qbackup_sim.daemon import daemon_pid  # noqa: E402
from qbackup_sim.inventory import create_sim  # noqa: E402

DEVNULL = subprocess.DEVNULL


class Qbackup(QbackupCli):
    def __init__(self, work: Path, pool: Path, size: int, chunk_size: str) -> None:
        sim = work / "sim"
        create_sim(sim, {"bench": {"class": "AppVM", "volumes": {"private": size}}},
                   pool_dir=pool)
        super().__init__(sim, work, chunk_size)
        self.image = pool / "appvms/bench/private.img"


def mount_btrfs(work: Path, size: int) -> Path:
    fs, mnt = work / "btrfs.img", work / "btrfs"
    with open(fs, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.btrfs", "-q", "-f", str(fs)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(fs), str(mnt)], check=True)
    return mnt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2G", help="image size (default 2G)")
    ap.add_argument("--workdir", default=None, help="where to work (default: a temp dir)")
    ap.add_argument("--chunk-size", default="256K", help="qbackup chunk size (default 256K)")
    ap.add_argument("--no-others", action="store_true", help="skip restic and borg")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_incremental.py needs root (loop devices, mount)", file=sys.stderr)
        return 2
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="qbackup-incr-", dir=args.workdir))
    mnt = None
    try:
        mnt = mount_btrfs(work, 3 * size + (2 << 30))
        pool = mnt / "pool"
        q = Qbackup(work, pool, size, args.chunk_size)
        chunk = parse_size(args.chunk_size)
        data = make_image(q.image, size)
        print(f"image: {size / 2**20:.0f} MiB ext4, {data / 2**20:.0f} MiB of real files, "
              f"in a file-reflink pool on btrfs", file=sys.stderr)
        tools: list = [q]
        if not args.no_others:
            tools += [cls(work, q.image) for cls in (Restic, Borg) if shutil.which(cls.name)]
        for tool in tools:
            tool.init()
        timed(["cat", str(q.image)], stdout=DEVNULL)  # warm cache, for every tool alike
        before = mnt / "before.img"  # on the btrfs: a reflink copy, no data copied
        rows: list[tuple[str, dict]] = []
        days: list[tuple[str, dict, tuple[int, int], dict]] = []

        def step(label: str, tag: str) -> None:
            result = {}
            for tool in tools:
                grown = tool.repo_bytes()
                daemon = daemon_pid(q.sim) if tool is q else None
                cpu = children_cpu() + process_cpu(daemon)
                secs = tool.backup(tag)
                cpu = children_cpu() + process_cpu(daemon) - cpu
                result[tool.name] = (secs, tool.repo_bytes() - grown, cpu)
                if tool is q:
                    result["qbackup-json"] = dict(q.last)
            rows.append((label, result))
            print(f"{label}: " + ", ".join(f"{n} {v[0]:.2f} s ({v[2]:.2f} s CPU)"
                                           for n, v in result.items() if n != "qbackup-json"),
                  file=sys.stderr)

        step("full backup", "full")
        step("unchanged re-run", "again")
        for day in (1, 2):
            subprocess.run(["cp", "--reflink=always", str(q.image), str(before)], check=True)
            done = realistic_day(q.image, seed=day)
            blocks, chunks = touched(before, q.image, chunk)
            before.unlink()
            timed(["cat", str(q.image)], stdout=DEVNULL)
            step(f"day {day}: incremental", f"day{day}")
            days.append((f"day {day}", done, (blocks, chunks), rows[-1][1]["qbackup-json"]))
        restore = work / "restored"
        restore_s = q.cli("restore", "latest", "--to", str(restore))
        same = subprocess.run(["cmp", str(q.image), str(restore / "bench/private.img")]).returncode == 0
        verify_s = q.cli("verify", "--all")
        q.close()

        mb = size / 1e6
        print(f"\nMachine: {machine()}; load average {os.getloadavg()[0]:.1f} at the end "
              f"(shared). Image: {size / 2**20:.0f} MiB ext4 ({data / 2**20:.0f} MiB of real "
              "files) in a file-reflink pool on btrfs (loop device), warm page cache, "
              f"qbackup chunk size {args.chunk_size}, scrypt N=16384; niceness "
              f"{os.nice(0)}.\n")
        print("| step | tool | wall s | CPU s | MB/s (image) | repo growth MiB | "
              "wall ÷ qbackup full | CPU ÷ qbackup full | wall ÷ qbackup | CPU ÷ qbackup |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        full_wall, _, full_cpu = rows[0][1]["qbackup"]
        for label, result in rows:
            wall_q, _, cpu_q = result["qbackup"]
            for tool in tools:
                secs, grew, cpu = result[tool.name]
                print(f"| {label} | {tool.name} | {secs:.2f} | {cpu:.2f} | {mb / secs:.0f} | "
                      f"{grew / 2**20:.0f} | {secs / full_wall:.2f} | {cpu / full_cpu:.2f} | "
                      f"{secs / wall_q:.1f}x | {cpu / cpu_q:.1f}x |")
        print(f"\n| day | what the day did | 4 KiB blocks changed | {args.chunk_size} chunks "
              "touched | qbackup read | read ÷ touched | how | chunks sent |")
        print("|---|---|---:|---:|---:|---:|---|---:|")
        for label, done, (blocks, chunks), js in days:
            what = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in done.items())
            read = js["bytes_read"]
            print(f"| {label} | {what} | {blocks} ({blocks * 4096 / 2**20:.0f} MiB) | "
                  f"{chunks} ({chunks * chunk / 2**20:.0f} MiB) | {read / 2**20:.1f} MiB | "
                  f"{read / max(1, chunks * chunk):.2f} | {js['reads'][0]['read']} | "
                  f"{js['chunks_new']} |")
        print(f"\nrestore (latest, to file): {restore_s:.1f} s, identical: {same}; "
              f"verify --all: {verify_s:.1f} s")
        return 0 if same else 1
    finally:
        if mnt is not None:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
