#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Backup, restore and whole-repository verify: qbackup against restic and borg.

Builds a real ext4 image (workload.make_image) and times `zstd -3 -T0` of
it (what compressing alone costs); backs it up with each tool (full backup,
then two realistic days of use through the kernel, workload.realistic_day,
each followed by an incremental: three snapshots; the sim's plain image
files have no change tracking, so every tool reads the whole image, as the
issue's workload does); then, in the same run and with the page cache
dropped before every step, backups included:

  restore of the latest snapshot to a file   qbackup restore --volume-target,
                                             restic restore, borg extract
  verify of every snapshot, reading the data qbackup verify --all,
                                             restic check --read-data,
                                             borg check --verify-data

qbackup's verify runs twice: in pack order (protocol 3, `locate`), then as
against a version-2 daemon, in the order the chunk maps first name the
chunks.

Every restored image is compared with the original (cmp). qbackup's peak
RSS (the dom0 process, from GNU time) and the daemon's CPU time are reported.
Prints a markdown table. Run by hand, as root (loop mounts, drop_caches):

    .venv/bin/python bench/bench_read.py [--size 2G] [--chunk-size 256K]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from workload import (Borg, QbackupCli, Restic, drop_caches, machine,  # noqa: E402
                      make_image, process_cpu, realistic_day)

from qbackup.commands.common import parse_size  # noqa: E402
from qbackup_sim.daemon import daemon_pid  # noqa: E402
from qbackup_sim.inventory import create_sim  # noqa: E402

DEVNULL = subprocess.DEVNULL
UNORDERED = "qbackup, maps' order (protocol 2)"
BACKUPS = ("full backup", "incremental day1", "incremental day2")


def run(argv: list[str], **kw) -> tuple[float, int]:
    """(wall seconds, peak RSS in KiB of the process) of one command.

    The peak comes from GNU time, not from our own wait4: Linux starts a
    child's peak RSS at its parent's high-water mark (fork, then exec), so
    this script's own peak would show up in every figure."""
    with tempfile.NamedTemporaryFile("r") as peak:
        t = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-q", "-f", "%M", "-o", peak.name, *argv], **kw)
        elapsed = time.perf_counter() - t
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, argv)
        return elapsed, int(peak.read().split()[-1])


class Qbackup(QbackupCli):
    def __init__(self, work: Path, size: int, chunk_size: str) -> None:
        sim = work / "sim"
        create_sim(sim, {"bench": {"class": "AppVM", "volumes": {"private": size}}})
        super().__init__(sim, work, chunk_size)
        self.image = sim / "volumes/bench/private.img"

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "qbackup_sim", "run", str(self.sim),
                "--passphrase-file", str(self.pw), *args]

    def restore(self, target: Path) -> tuple[float, int]:
        return run(self.argv("restore", "latest", "--volume-target",
                             f"bench:private={target}"), stdout=DEVNULL)

    def verify(self) -> tuple[float, int]:
        return run(self.argv("verify", "--all"), stdout=DEVNULL)

    def verify_unordered(self) -> tuple[float, int]:
        """verify --all as against a version-2 qbackupd (no locate): the
        chunks in the order the chunk maps first name them."""
        code = ("import sys; from qbackup import proto; proto.SUPPORTED_VERSIONS = (1, 2); "
                "from qbackup_sim.__main__ import main; sys.exit(main(sys.argv[1:]))")
        return run([sys.executable, "-c", code, *self.argv("verify", "--all")[3:]], stdout=DEVNULL)


class ResticRead(Restic):
    def restore(self, target: Path) -> tuple[float, int]:
        out = target.parent / "restic-out"
        t = run(["restic", "restore", "latest", "--target", str(out)], env=self.env, stdout=DEVNULL)
        os.replace(out / self.image.relative_to("/"), target)
        shutil.rmtree(out)
        return t

    def verify(self) -> tuple[float, int]:
        return run(["restic", "check", "--read-data"], env=self.env, stdout=DEVNULL)


class BorgRead(Borg):
    def last(self) -> str:
        return subprocess.run(["borg", "list", "--last", "1", "--short", str(self.repo)],
                              env=self.env, check=True, stdout=subprocess.PIPE,
                              text=True).stdout.strip()

    def restore(self, target: Path) -> tuple[float, int]:
        out = target.parent / "borg-out"
        out.mkdir()
        t = run(["borg", "extract", "--sparse", f"{self.repo}::{self.last()}"], env=self.env,
                cwd=out, stdout=DEVNULL)
        os.replace(out / self.image.relative_to("/"), target)
        shutil.rmtree(out)
        return t

    def verify(self) -> tuple[float, int]:
        return run(["borg", "check", "--verify-data", str(self.repo)], env=self.env,
                   stdout=DEVNULL, stderr=DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2G", help="image size (default 2G)")
    ap.add_argument("--chunk-size", default="256K", help="qbackup chunk size (default 256K)")
    ap.add_argument("--workdir", default=None, help="where to work (default: a temp dir)")
    args = ap.parse_args()

    size = parse_size(args.size)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # bytecode cached, as installed (borg too)
    work = Path(tempfile.mkdtemp(prefix="qbackup-bench-read-", dir=args.workdir))
    q = None
    try:
        image = work / "image.img"
        data = make_image(image, size)
        q = Qbackup(work, size, args.chunk_size)
        shutil.copyfile(image, q.image)
        missing = [cls.name for cls in (ResticRead, BorgRead) if not shutil.which(cls.name)]
        if missing:
            print(f"not installed, left out: {', '.join(missing)}", file=sys.stderr)
        tools: list = [q] + [cls(work, Path(shutil.copyfile(image, work / f"{cls.name}.img")))
                             for cls in (ResticRead, BorgRead) if cls.name not in missing]
        dropped = drop_caches()
        zstd = run(["zstd", "-3", "-T0", "-q", "-c", str(image)], stdout=DEVNULL)[0]
        image.unlink()
        rows: dict[str, dict[str, tuple[float, int | None]]] = {}
        daemon_cpu: dict[str, float] = {}
        for tool in tools:
            tool.init()
            for step in BACKUPS:
                if step != "full backup":
                    realistic_day(tool.image, seed=BACKUPS.index(step))
                dropped &= drop_caches()
                before = process_cpu(daemon_pid(q.sim))
                rows.setdefault(tool.name, {})[step] = (tool.backup(step.split()[-1]), None)
                if tool is q:
                    daemon_cpu[step] = process_cpu(daemon_pid(q.sim)) - before
            print(f"{tool.name}: 3 snapshots", file=sys.stderr)

        for step in ("restore", "verify"):
            for tool in tools:
                dropped &= drop_caches()
                before = process_cpu(daemon_pid(q.sim))
                if step == "restore":
                    target = work / f"restored-{tool.name}.img"
                    rows.setdefault(tool.name, {})[step] = tool.restore(target)
                    if subprocess.run(["cmp", "-s", str(tool.image), str(target)]).returncode:
                        print(f"{tool.name}: RESTORED IMAGE DIFFERS", file=sys.stderr)
                        return 1
                    target.unlink()
                else:
                    rows[tool.name][step] = tool.verify()
                if tool is q:
                    daemon_cpu[step] = process_cpu(daemon_pid(q.sim)) - before
                if tool is q and step == "verify":
                    dropped &= drop_caches()
                    rows[UNORDERED] = {step: q.verify_unordered()}

        mb = size / 1e6
        print(f"\nMachine: {machine()}. Image: {size / 2**20:.0f} MiB ext4 "
              f"({data / 2**20:.0f} MiB of files from /usr), 3 snapshots, qbackup chunk size "
              f"{args.chunk_size}; page cache {'dropped' if dropped else 'NOT dropped'} "
              "before each step.\n")
        print("| step | tool | seconds | MB/s (image) | peak RSS MiB | ÷ restic | ÷ borg | ÷ zstd -3 -T0 |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        print(f"| compress the image | zstd -3 -T0 | {zstd:.1f} | {mb / zstd:.0f} | | | | |")
        for step in (*BACKUPS, "restore", "verify"):
            for name, r in rows.items():
                if step not in r:
                    continue
                secs, rss = r[step]
                ratios = [f"{secs / rows[o][step][0]:.2f}" if o in rows and o != name else ""
                          for o in ("restic", "borg")]
                ratios.append(f"{secs / zstd:.2f}" if step == "full backup" else "")
                shown = "" if rss is None else f"{rss / 1024:.0f}"
                print(f"| {step} | {name} | {secs:.1f} | {mb / secs:.0f} | {shown} | "
                      f"{' | '.join(ratios)} |")
        for step, cpu in daemon_cpu.items():
            print(f"| {step} | qbackupd CPU seconds | {cpu:.1f} | | | | | |")
    finally:
        if q is not None:
            q.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
