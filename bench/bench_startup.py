#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""The fixed cost of a command, scrypt left out: interpreter, imports,
connection, hello.

Against a sim (the real daemon over its socket) holding an empty
repository, runs each of these --runs times with bytecode caches written
(as an installed package has them) and prints the median wall and CPU time:

  python -c pass                    the interpreter alone
  python -c 'import qbackup.cli'    the client's imports
  qbackup stats                     imports, connection, hello, open, stats
                                    (no passphrase: no scrypt)

`qbackup stats` goes through the simulated dom0 (`python -m qbackup_sim run`),
which adds its own imports; the real client adds the qrexec call instead.
Run by hand: `.venv/bin/python bench/bench_startup.py [--runs 15]`.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from workload import machine  # noqa: E402

from qbackup_sim.daemon import stop_daemon  # noqa: E402
from qbackup_sim.inventory import create_sim  # noqa: E402


def timed(argv: list[str], env: dict) -> tuple[float, float]:
    """(wall, CPU) seconds of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="qbackup-bench-startup-") as work:
        sim = Path(work) / "sim"
        create_sim(sim, {"work": {"class": "AppVM", "volumes": {"private": 1 << 20}}})
        pw = Path(work) / "pw"
        pw.write_text("bench-passphrase")
        run = [py, "-m", "qbackup_sim", "run", str(sim)]
        subprocess.run(run + ["--passphrase-file", str(pw), "init", "--scrypt-n", "16384"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        try:
            rows = []
            for label, argv in (("python -c pass", [py, "-c", "pass"]),
                                ("import qbackup.cli", [py, "-c", "import qbackup.cli"]),
                                ("qbackup stats (sim)", run + ["stats"])):
                timed(argv, env)  # writes the bytecode caches
                runs = [timed(argv, env) for _ in range(args.runs)]
                rows.append((label, statistics.median(w for w, _ in runs),
                             statistics.median(c for _, c in runs)))
        finally:
            stop_daemon(sim)
    print(f"\nMachine: {machine()}; median of {args.runs} runs, bytecode cached.\n")
    print("| what | wall s | CPU s |")
    print("|---|---:|---:|")
    for label, wall, cpu in rows:
        print(f"| {label} | {wall:.3f} | {cpu:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
