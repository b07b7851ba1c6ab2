#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Garbage collection at scale: time, peak daemon memory, writer-lock holds.

Builds a synthetic repository straight through qbackupd.storage: one volume
of CHUNKS chunks (1,400,000 = 342 GiB at 256 KiB) backed up SNAPSHOTS times
(7), each backup after the first rewriting REWRITE scattered chunks
(100,000), with a chunk-map tree of 1,024-ref leaves and a root as dom0
writes them; the blobs themselves are tiny (48 bytes), so the figures are
the metadata's. Then every snapshot but the newest is deleted: about 30 %
of the ~2 million blobs (0.5 TiB logical) are garbage, spread over the
packs as a real history spreads it (the oldest packs lose most).

Then the real daemon (`python -m qbackupd serve`) is started on the
repository and, over its socket through dom0's protocol client: `usage`,
`gc` (default threshold), `check` and `check --read-data`; each timed, the
daemon's peak RSS (VmHWM) read after each, the longest writer-lock hold of
the sweep read from the daemon's log. Prints a markdown table.

    .venv/bin/python bench/bench_gc.py [--chunks 1400000] [--snapshots 7] [--rewrite 100000] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import array
import hashlib
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from workload import machine  # noqa: E402

from qbackup.proto import Session  # noqa: E402
from qbackup.transport import unix_socket  # noqa: E402
from qbackupd.storage import Storage  # noqa: E402

FANOUT = 1024
DATA = b"x" * 48


def chunk_id(position: int, version: int) -> bytes:
    return hashlib.sha256(b"%d:%d" % (position, version)).digest()


def build(storage: Storage, chunks: int, snapshots: int, rewrite: int) -> tuple[int, float]:
    """The history; returns (blobs stored, seconds)."""
    rng = random.Random(1)
    version = array.array("B", bytes(chunks))
    start = time.perf_counter()
    stored = 0
    with storage.create("big", b"opaque config", 64 << 20, "bench") as repo:
        for snap in range(snapshots):
            changed = range(chunks) if snap == 0 else sorted(rng.sample(range(chunks), rewrite))
            for position in changed:
                version[position] = snap
                stored += repo.put(chunk_id(position, snap), 1, DATA, None)
            leaves = []
            for first in range(0, chunks, FANOUT):
                ids = [chunk_id(p, version[p]) for p in range(first, min(first + FANOUT, chunks))]
                leaf = hashlib.sha256(b"".join(ids)).digest()
                stored += repo.put(leaf, 2, DATA, list(dict.fromkeys(ids)))
                leaves.append(leaf)
            root = hashlib.sha256(b"".join(leaves)).digest()
            stored += repo.put(root, 2, DATA, leaves)
            repo.commit(hashlib.sha256(b"snapshot %d" % snap).digest(), b"manifest", [root])
            print(f"  snapshot {snap}: {stored:,} blobs stored", file=sys.stderr)
        repo.delete_snapshots([hashlib.sha256(b"snapshot %d" % s).digest() for s in range(snapshots - 1)])
    return stored, time.perf_counter() - start


def vm_hwm_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def start_daemon(work: Path) -> tuple[subprocess.Popen, Path, Path]:
    sock, log = work / "sock", work / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qbackupd", "serve", "--socket", str(sock), "--storage", str(work / "store")],
            stdout=out, stderr=out,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(sock))
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log.read_text())
                time.sleep(0.05)
    return proc, sock, log


def timed(call, phases: dict[str, float]):
    """Run call(progress) and note when each phase began."""
    start = time.perf_counter()

    def progress(phase: str, done: int, total: int) -> None:
        phases.setdefault(phase, time.perf_counter() - start)

    result = call(progress)
    return result, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=1_400_000)
    ap.add_argument("--snapshots", type=int, default=7)
    ap.add_argument("--rewrite", type=int, default=100_000)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qbgc-", dir=args.dir))
    proc = None
    try:
        storage = Storage(work / "store")
        print("building the repository...", file=sys.stderr)
        stored, build_s = build(storage, args.chunks, args.snapshots, args.rewrite)
        with storage.open("big", False, "bench") as repo:
            before = repo.stats()
        proc, sock, log = start_daemon(work)
        rows = []
        with Session(unix_socket(str(sock), "big"), stall_timeout=3600) as session:
            session.open(False)
            used, usage_s = timed(lambda p: session.usage(progress=p), {})
            rows.append(("`usage` (per-snapshot unique sizes)", f"{usage_s:.0f} s", vm_hwm_mib(proc.pid)))
            phases: dict[str, float] = {}
            summary, gc_s = timed(lambda p: session.gc(progress=p), phases)
            rows.append(("`gc` (default: repack below 70 % live)", f"{gc_s:.0f} s", vm_hwm_mib(proc.pid)))
            _, check_s = timed(lambda p: session.check(progress=p), {})
            rows.append(("`check` (trailers, index, refs)", f"{check_s:.0f} s", vm_hwm_mib(proc.pid)))
            report, read_s = timed(lambda p: session.check(read_data=True, progress=p), {})
            rows.append(("`check --read-data`", f"{read_s:.0f} s", vm_hwm_mib(proc.pid)))
            assert report["problems"] == [], report["problems"]
            after = session.stats()
        rounds = [float(s) for s in re.findall(r"sweep round: .* in ([0-9.]+) s under", log.read_text())]
        dead = used["unreferenced_blobs"]
        print(f"\nMachine: {machine()}.\n")
        print("| measure | value |")
        print("|---|---|")
        print(f"| repository | {before['blobs']:,} blobs ({args.chunks:,} chunk positions, {args.snapshots} "
              f"backups of {args.rewrite:,} rewritten chunks), {before['packs']} packs of up to 65,536 records, "
              f"{args.snapshots - 1} of {args.snapshots} snapshots deleted |")
        print(f"| logical size at 256 KiB chunks | {before['blobs'] * 256 / 2**30:.2f} TiB |")
        print(f"| build (straight through storage) | {build_s:.0f} s |")
        print(f"| garbage (`usage`: unreferenced) | {dead:,} blobs = {dead / before['blobs']:.1%} |")
        for label, seconds, rss in rows:
            print(f"| {label} | {seconds}, daemon peak RSS {rss:.0f} MiB |")
        phase_list = ", ".join(f"{name} at {t:.0f} s" for name, t in phases.items())
        print(f"| `gc` phases began | {phase_list} |")
        print(f"| `gc` result | {summary['packs_deleted']} packs deleted, {summary['packs_repacked']} repacked "
              f"into {summary['packs_written']}, {summary['bytes_copied'] / 2**20:.0f} MiB copied, "
              f"{summary['bytes_freed'] / 2**20:.0f} MiB freed |")
        print(f"| blobs before / after | {before['blobs']:,} / {after['blobs']:,} |")
        rounds.sort()
        median = rounds[len(rounds) // 2] if rounds else 0
        print(f"| writer lock held per sweep round, median / longest | {median:.2f} s / "
              f"{max(rounds, default=0):.2f} s ({len(rounds)} rounds) |")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
