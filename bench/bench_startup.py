#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""The fixed cost of a command: interpreter, imports, connection, hello;
and the scrypt unwrap every command with a passphrase adds.

Against a sim (the real daemon over its socket) holding an empty
repository, runs each of these --runs times with bytecode caches written
(as an installed package has them) and prints the median wall and CPU time:

  python -c pass                    the interpreter alone
  the client's libraries alone      importing only the standard and third-party
                                    modules the client loads to parse (its floor)
  import qbackup.cli                the client's imports (parsing needs no more),
                                    in the dev venv (editable install) and installed
  qbackup gc --dry-run              imports, connection, hello, open, one request
                                    (no passphrase: no scrypt)
  qbackup stats                     the same plus the scrypt unwrap (n = 2^14, the
                                    smallest allowed) and the repository's history

"Installed" is a scratch venv whose site-packages holds a copy of the
package, as pip or the rpm installs it: without the editable install's
import hooks, which cost the dev venv about 25 ms. The commands go through
the simulated dom0 (`python -m qbackup_sim run`), which adds its own
imports; the real client runs qrexec-client instead.

--baseline REV runs every row with REV's dom0/qbackup as well, the two
alternating, so that a change is measured side by side on a loaded machine.
Run by hand: `.venv/bin/python bench/bench_startup.py [--runs 15] [--baseline main]`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from workload import machine  # noqa: E402

from qbackup_sim.daemon import stop_daemon  # noqa: E402
from qbackup_sim.inventory import create_sim  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRYPT_N = 2**14
# What `import qbackup.cli` loads besides qbackup itself (tests/dom0/test_package.py
# keeps the rest out): the floor of the client's imports.
LIBRARIES = ("argparse, typing, json, hashlib, hmac, getpass, queue, dataclasses, concurrent.futures, "
             "subprocess, socket, msgpack, zstandard, cryptography.hazmat.primitives.ciphers.aead, "
             "cryptography.hazmat.primitives.kdf.hkdf")


def timed(argv: list[str], env: dict) -> tuple[float, float]:
    """(wall, CPU) seconds of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def installed(venv: Path, package: Path) -> str:
    """The python of a new venv holding a copy of `package` as qbackup; the
    libraries, the sim and the daemon come from this venv and checkout."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True,
                               text=True).stdout.strip())
    shutil.copytree(package, site / "qbackup", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "qbackup-bench.pth").write_text(
        f"{sysconfig.get_paths()['purelib']}\n{ROOT / 'sim'}\n{ROOT / 'vm-service'}\n")
    return python


def scrypt_seconds(runs: int) -> float:
    """The median time of the unwrap's scrypt at SCRYPT_N, in this process."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        hashlib.scrypt(b"bench-passphrase", salt=bytes(16), n=SCRYPT_N, r=8, p=1,
                       maxmem=1 << 30)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--baseline", metavar="REV",
                    help="also measure REV's dom0/qbackup (a git revision), side by side")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    with tempfile.TemporaryDirectory(prefix="qbackup-bench-startup-") as work:
        pythons = {"now": installed(Path(work) / "now", ROOT / "dom0" / "qbackup")}
        if args.baseline:
            subprocess.run(f"git -C {ROOT} archive {args.baseline} dom0/qbackup"
                           f" | tar -x -C {work}", shell=True, check=True)
            pythons = {"baseline": installed(Path(work) / "baseline",
                                             Path(work) / "dom0" / "qbackup"), **pythons}
        sim = Path(work) / "sim"
        create_sim(sim, {"work": {"class": "AppVM", "volumes": {"private": 1 << 20}}})
        pw = Path(work) / "pw"
        pw.write_text("bench-passphrase")
        run = ["-m", "qbackup_sim", "run", str(sim)]
        subprocess.run([pythons["now"], *run, "--passphrase-file", str(pw), "init",
                        "--scrypt-n", str(SCRYPT_N)], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        rows = [("python -c pass", ["-c", "pass"]),
                ("the client's libraries alone", ["-c", f"import {LIBRARIES}"]),
                ("import qbackup.cli", ["-c", "import qbackup.cli"]),
                ("qbackup gc --dry-run (sim)", [*run, "gc", "--dry-run"]),
                (f"qbackup stats (sim, scrypt n=2^{SCRYPT_N.bit_length() - 1})",
                 [*run, "--passphrase-file", str(pw), "stats"])]
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        try:
            for label, argv in rows:
                for which, py in pythons.items():
                    timed([py, *argv], env)  # writes the bytecode caches
                for _ in range(args.runs):
                    for which, py in pythons.items():
                        results.setdefault((label, which), []).append(timed([py, *argv], env))
            dev = "import qbackup.cli (dev venv, editable)"
            results[(dev, "now")] = [timed([sys.executable, "-c", "import qbackup.cli"], env)
                                     for _ in range(args.runs)]
            rows.insert(3, (dev, []))  # after the installed import
        finally:
            stop_daemon(sim)
    scrypt = scrypt_seconds(args.runs)
    load = os.getloadavg()
    print(f"\nMachine: {machine()}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
          f"median of {args.runs} runs, bytecode cached; installed unless said.\n")
    names = list(pythons)
    print("| what | " + " | ".join(f"{n} wall s | {n} CPU s" for n in names) + " |")
    print("|---|" + "---:|---:|" * len(names))
    for label, _ in rows:
        cells = []
        for which in names:
            runs = results.get((label, which))
            cells += ["" , ""] if runs is None else [
                f"{statistics.median(w for w, _ in runs):.3f}",
                f"{statistics.median(c for _, c in runs):.3f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\nscrypt n=2^{SCRYPT_N.bit_length() - 1} alone (in process): {scrypt:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
