#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""A full backup of one image by two versions of qbackup, side by side.

Builds a real ext4 image (workload.make_image) in a sim's plain volume and
an empty repository, then runs `qbackup backup --all` on it --rounds times
with this checkout and with --baseline REV (a git worktree of REV; its
client, daemon and sim), the two alternating, each time on a fresh copy of
the empty repository and, as root, with the page cache dropped. Prints the
median wall time, the client's CPU and the daemon's CPU of each, and the
ratio: a change measured against what it replaces, in the same minutes on
the same machine (run-to-run noise on a shared machine is larger than most
changes).

    .venv/bin/python bench/bench_ab.py --baseline REV [--size 1G] [--chunk-size 256K] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from workload import (QbackupCli, children_cpu, drop_caches, machine, make_image,  # noqa: E402
                      process_cpu)

from qbackup.commands.common import parse_size  # noqa: E402
from qbackup_sim.daemon import daemon_pid, stop_daemon  # noqa: E402
from qbackup_sim.inventory import create_sim  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def backup(sim: Path, fresh: Path, passphrase: Path, checkout: Path) -> tuple[float, float, float]:
    """(wall, client CPU, daemon CPU) seconds of one full backup by `checkout`."""
    stop_daemon(sim)
    for name in ("storage", "dom0-state"):
        shutil.rmtree(sim / name, ignore_errors=True)
        shutil.copytree(fresh / name, sim / name, symlinks=True)
    drop_caches()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        str(checkout / d) for d in ("dom0", "vm-service", "sim")))
    cpu = children_cpu()
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qbackup_sim", "run", str(sim), "--passphrase-file",
                    str(passphrase), "backup", "--all"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    client = children_cpu() - cpu
    daemon = process_cpu(daemon_pid(sim))
    stop_daemon(sim)
    return wall, client, daemon


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, metavar="REV", help="the version to compare with")
    ap.add_argument("--size", default="1G", help="image size (default 1G)")
    ap.add_argument("--chunk-size", default="256K", help="chunk size (default 256K)")
    ap.add_argument("--rounds", type=int, default=3, help="backups by each version (default 3)")
    ap.add_argument("--workdir", default=None, help="where to work (default: a temp dir)")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="qbackup-ab-", dir=args.workdir))
    base = work / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.baseline],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sim = work / "sim"
    try:
        create_sim(sim, {"bench": {"class": "AppVM", "volumes": {"private": size}}})
        files = make_image(sim / "volumes/bench/private.img", size)
        q = QbackupCli(sim, work, args.chunk_size)
        q.init()
        stop_daemon(sim)
        fresh = work / "fresh"
        for name in ("storage", "dom0-state"):
            shutil.copytree(sim / name, fresh / name, symlinks=True)
        sides = {"this checkout": ROOT, f"baseline {args.baseline}": base}
        runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in sides}
        for _ in range(args.rounds):
            for name, checkout in sides.items():
                runs[name].append(backup(sim, fresh, q.pw, checkout))
        cold = drop_caches()
        print(f"\n{machine()}. Image {size >> 20} MiB ext4 ({files >> 20} MiB of files), "
              f"chunk size {args.chunk_size}, {args.rounds} full backups each, alternating, "
              f"{'page cache dropped before each' if cold else 'page cache warm (not root)'}. "
              "Medians:\n")
        print("| version | wall s | client CPU s | daemon CPU s | wall ÷ baseline |")
        print("|---|---:|---:|---:|---:|")
        medians = {k: [statistics.median(r[i] for r in v) for i in range(3)] for k, v in runs.items()}
        base_wall = medians[f"baseline {args.baseline}"][0]
        for name, (wall, client, daemon) in medians.items():
            print(f"| {name} | {wall:.2f} | {client:.2f} | {daemon:.2f} | {wall / base_wall:.3f} |")
        return 0
    finally:
        stop_daemon(sim)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                       check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
