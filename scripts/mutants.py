#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Mutation check of dom0's trust modules: every mutant must be killed.

docs/mutants.toml lists reviewed, invariant-breaking mutants of the six dom0
modules that handle bytes from the backup qube (proto, crypto, chunkmap,
manifest, restore, state). Each is one or more exact source replacements
(an anchor that must occur exactly once, so the list cannot rot silently)
and the tests of its docs/INVARIANTS.md row that must fail because of it.

For each mutant a copy of dom0/qbackup with the replacements applied is put
first on sys.path (and PYTHONPATH, for the tests' subprocesses), and its
tests run with pytest in a child forked from this process, which has
already imported pytest and the libraries (so a mutant costs its tests, not
an interpreter start). A mutant is killed when its tests fail; it survives
when they pass (or are skipped); anything else (no such test, a collection
error, a hang past the limit) is an error. Exit 0 only if every mutant was
killed.

    scripts/mutants.py [--list] [--jobs N] [MUTANT-ID ...]
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import selectors
import shutil
import signal
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "docs" / "mutants.toml"
INVARIANTS = ROOT / "docs" / "INVARIANTS.md"
PACKAGE = ROOT / "dom0" / "qbackup"
MODULES = {"proto.py", "crypto.py", "chunkmap.py", "manifest.py", "restore.py", "state.py"}
LIMIT = 180  # seconds a mutant's tests may take: far beyond any of them, against hangs


class ListError(Exception):
    """docs/mutants.toml does not match the source or docs/INVARIANTS.md."""


@dataclass
class Mutant:
    id: str
    invariant: int
    module: str
    what: str
    edits: list[tuple[str, str]]
    tests: list[str]


def invariant_rows(text: str) -> dict[int, str]:
    """The rows of INVARIANTS.md's table: invariant number -> the row's text."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|", line)
        if match:
            rows[int(match[1])] = line
    return rows


def load(path: Path = MUTANTS, package: Path = PACKAGE, invariants: Path = INVARIANTS) -> list[Mutant]:
    """The mutant list, checked: known modules, anchors found exactly once,
    unique ids, and every test named in its invariant's row."""
    doc = tomllib.loads(path.read_text())
    rows = invariant_rows(invariants.read_text())
    mutants, seen = [], set()
    for entry in doc["mutant"]:
        m = Mutant(entry["id"], entry["invariant"], entry["module"], entry["what"],
                   [(e["anchor"], e["replace"]) for e in entry["edit"]], entry["tests"])
        where = f"{path.name}: mutant {m.id}"
        if m.id in seen:
            raise ListError(f"{where}: id used twice")
        seen.add(m.id)
        if m.module not in MODULES:
            raise ListError(f"{where}: {m.module} is not one of the trust modules {sorted(MODULES)}")
        source = (package / m.module).read_text()
        for anchor, replacement in m.edits:
            count = source.count(anchor)
            if count != 1:
                raise ListError(f"{where}: its anchor occurs {count} times in {m.module}, not once"
                                f" (the source changed: review the mutant): {anchor.strip()[:80]!r}")
            if anchor == replacement:
                raise ListError(f"{where}: a replacement changes nothing")
        row = rows.get(m.invariant)
        if row is None:
            raise ListError(f"{where}: invariant {m.invariant} has no row in {invariants.name}")
        if not m.tests:
            raise ListError(f"{where}: no tests")
        for test in m.tests:
            name = test.split("::")[-1].split("[")[0]
            if name not in row:
                raise ListError(f"{where}: {test} is not named in row {m.invariant} of "
                                f"{invariants.name}")
        mutants.append(m)
    return mutants


def mutate(m: Mutant, into: Path) -> Path:
    """A copy of the package with the mutant's replacements applied."""
    target = into / m.id / "qbackup"
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__"))
    module = target / m.module
    source = module.read_text()
    for anchor, replacement in m.edits:
        source = source.replace(anchor, replacement, 1)
    module.write_text(source)
    return target.parent


def _child(m: Mutant, path: Path, log: int) -> None:
    """In the forked child: run the mutant's tests; exit with pytest's code."""
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.chdir(ROOT)
        sys.path.insert(0, str(path))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(path)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        os.environ["QBACKUP_MUTANT_DIR"] = str(path)
        import pytest
        code = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "--no-header", *m.tests])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))
    except BaseException:  # noqa: BLE001 - the child must never return into the parent's code
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(99)


@dataclass
class Outcome:
    mutant: Mutant
    verdict: str  # killed, SURVIVED, ERROR
    seconds: float
    output: str


def _verdict(status: int, timed_out: bool) -> str:
    if timed_out:
        return "ERROR"
    code = os.waitstatus_to_exitcode(status)
    return {1: "killed", 0: "SURVIVED"}.get(code, "ERROR")


def run(mutants: list[Mutant], jobs: int, report) -> list[Outcome]:
    """Run the mutants, `jobs` at a time, calling report(outcome) as each ends."""
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="qbackup-mutants-") as tmp:
        pending = list(mutants)
        running: dict[int, tuple[Mutant, int, float, bytearray]] = {}
        selector = selectors.DefaultSelector()
        while pending or running:
            while pending and len(running) < jobs:
                m = pending.pop(0)
                path = mutate(m, Path(tmp))
                read_end, write_end = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(read_end)
                    _child(m, path, write_end)
                os.close(write_end)
                running[pid] = (m, read_end, time.monotonic(), bytearray())
                selector.register(read_end, selectors.EVENT_READ, pid)
            for key, _ in selector.select(timeout=1.0):
                pid = key.data
                chunk = os.read(key.fd, 1 << 16)
                if chunk:
                    running[pid][3].extend(chunk)
                    continue
                selector.unregister(key.fd)
                os.close(key.fd)
                m, _, started, output = running.pop(pid)
                _, status = os.waitpid(pid, 0)
                outcome = Outcome(m, _verdict(status, False), time.monotonic() - started,
                                  output.decode(errors="replace"))
                outcomes.append(outcome)
                report(outcome)
            for pid, (m, fd, started, output) in list(running.items()):
                if time.monotonic() - started > LIMIT:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    selector.unregister(fd)
                    os.close(fd)
                    del running[pid]
                    outcome = Outcome(m, "ERROR", time.monotonic() - started,
                                      output.decode(errors="replace") + f"\ntimed out after {LIMIT} s")
                    outcomes.append(outcome)
                    report(outcome)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ids", nargs="*", metavar="MUTANT-ID", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="check and list the mutants, run none")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="mutants run at once (default: 2, or 1 on one core)")
    args = parser.parse_args(argv)
    try:
        mutants = load()
    except (ListError, KeyError, tomllib.TOMLDecodeError) as e:
        print(f"mutants: error: {e}", file=sys.stderr)
        return 2
    if args.ids:
        unknown = set(args.ids) - {m.id for m in mutants}
        if unknown:
            print(f"mutants: error: no mutant {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        mutants = [m for m in mutants if m.id in args.ids]
    if args.list:
        for m in mutants:
            print(f"{m.id:40} #{m.invariant:<3} {m.module:12} {m.what}")
        return 0
    started = time.monotonic()

    def report(o: Outcome) -> None:
        print(f"mutants: {o.verdict:8} {o.mutant.id:40} (invariant {o.mutant.invariant}, "
              f"{o.seconds:.1f} s)", flush=True)
        if o.verdict != "killed":
            print(f"  {o.mutant.what}; tests: {' '.join(o.mutant.tests)}")
            print("  " + "\n  ".join(o.output.strip().splitlines()[-25:]), flush=True)

    outcomes = run(mutants, max(1, args.jobs), report)
    bad = [o for o in outcomes if o.verdict != "killed"]
    print(f"mutants: {len(outcomes) - len(bad)} of {len(outcomes)} killed in "
          f"{time.monotonic() - started:.0f} s", flush=True)
    return 1 if bad else 0


# What every child needs, imported once here so that forking replaces an
# interpreter start; never qbackup itself (each child imports its mutant).
PRELOAD = ("cryptography.hazmat.primitives.ciphers.aead", "hypothesis", "msgpack", "pytest",
           "zstandard")

if __name__ == "__main__":
    for name in PRELOAD:
        importlib.import_module(name)
    assert "qbackup" not in sys.modules
    sys.exit(main())
