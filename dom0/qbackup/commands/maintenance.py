# SPDX-License-Identifier: GPL-2.0-or-later
"""Maintenance done by the backup qube, started from dom0: `qbackup gc`
(garbage collection, no passphrase), `qbackup check-storage` (the keyless
pack check, damage named by snapshot, qube and volume) and `qbackup stats`
(stored and logical sizes, dedup ratio, each snapshot's unique size).

The backup qube does the work without keys and its figures are untrusted
(bounded by `proto.Session`): they are only reported. What needs keys — the
names of qubes and volumes, logical sizes — comes from dom0's authenticated
history (docs/GC.md §6, PROTOCOL.md §5).
"""

from __future__ import annotations

import argparse
from typing import Any

from qbackup import restore as restore_mod
from qbackup.commands.common import (EXIT_INTEGRITY, EXIT_OK, Context, ask_passphrase,
                                     local_time, open_history, print_json)
from qbackup.errors import IntegrityError, RemoteError
from qbackup.progress import PhaseProgress, human_bytes

EXIT_STORAGE_DAMAGED = EXIT_INTEGRITY


def repack_percent(text: str) -> int:
    if not text.isdigit() or int(text) > 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage from 0 to 100")
    return int(text)


def cmd_gc(ctx: Context, args: argparse.Namespace) -> int:
    progress = PhaseProgress("gc")
    try:
        with ctx.session() as session:
            session.open(write=False)   # the collector takes the writer lock itself, in rounds
            untrusted = session.gc(repack_below=args.repack_below, dry_run=args.dry_run,
                                   progress=progress)
    except RemoteError as e:
        if e.code == "damaged":
            raise IntegrityError(f"the backup qube refused to collect garbage ({e.message}); "
                                 "nothing was deleted: run `qbackup check-storage --read-data`"
                                 ) from None
        raise
    finally:
        progress.close()
    if args.json:
        print_json(untrusted)
        return EXIT_OK
    would = "would be " if untrusted["dry_run"] else ""
    kept = (f", {untrusted['packs_kept']} kept because a live blob in them is damaged "
            "(see check-storage)" if untrusted["packs_kept"] else "")
    print(f"gc of {ctx.repo} in {ctx.backup_vm} (figures from the backup qube): "
          f"{untrusted['snapshots']} snapshots reach {untrusted['live_blobs']} blobs; "
          f"{untrusted['packs_deleted']} packs {would}deleted, {untrusted['packs_repacked']} "
          f"{would}repacked into {untrusted['packs_written']} "
          f"({human_bytes(untrusted['bytes_copied'])} copied){kept}; "
          f"{human_bytes(untrusted['bytes_freed'])} {would}freed")
    return EXIT_OK


def _affected_json(found: list[restore_mod.Affected],
                   history: restore_mod.History) -> list[dict[str, Any]]:
    times = {s.id: s.time for s in history}
    return [{"snapshot": a.snapshot.hex(), "time": times.get(a.snapshot), "qube": a.qube,
             "volume": a.volume} for a in found]


def cmd_check_storage(ctx: Context, args: argparse.Namespace) -> int:
    passphrase = ask_passphrase(args)
    progress = PhaseProgress("check-storage")
    try:
        with ctx.session() as session:
            _, history = open_history(ctx, args, session, passphrase)
            untrusted = session.check(read_data=args.read_data, progress=progress)
    finally:
        progress.close()
    found = restore_mod.affected_volumes(history, untrusted)
    bad = bool(untrusted["problems_total"] or untrusted["damaged_total"] or found)
    code = EXIT_STORAGE_DAMAGED if bad else EXIT_OK
    if args.json:
        print_json({"ok": not bad, "read_data": args.read_data,
                    "problems": untrusted["problems"], "problems_total": untrusted["problems_total"],
                    "damaged_blobs": untrusted["damaged_total"], "complete": untrusted["complete"],
                    "affected": _affected_json(found, history)})
        return code
    for line in untrusted["problems"]:
        print(f"backup qube: {line}")
    if untrusted["problems_total"] > len(untrusted["problems"]):
        print(f"backup qube: ... and {untrusted['problems_total'] - len(untrusted['problems'])} "
              "more problems")
    if not untrusted["complete"]:
        print("the damage is too wide to attribute exactly: every snapshot is listed")
    times = {s.id: s.time for s in history}
    for a in found:
        where = (f"qube {a.qube} volume {a.volume}" if a.qube else
                 "(its own file, or a volume its manifest does not name)")
        when = local_time(times[a.snapshot]) if a.snapshot in times else f"{'?':19}"
        print(f"DAMAGED: snapshot {a.snapshot.hex()[:16]}  {when}  {where}")
    what = "every byte of every pack read" if args.read_data else \
        "pack trailers, index and references (add --read-data to read every byte)"
    if bad:
        print(f"check-storage FAILED: {untrusted['damaged_total']} damaged or missing blobs, "
              f"{len({a.snapshot for a in found})} snapshots affected ({what})")
    else:
        print(f"check-storage OK ({what})")
    return code


def cmd_stats(ctx: Context, args: argparse.Namespace) -> int:
    passphrase = ask_passphrase(args)
    with ctx.session() as session:
        _, history = open_history(ctx, args, session, passphrase)
        untrusted_stats = session.stats()
        untrusted_usage = (session.usage(progress=PhaseProgress("stats"))
                           if session.version >= 2 and not args.quick else None)
    logical = sum(s.bytes_total for s in history)
    stored = untrusted_stats["pack_bytes"]
    unique = {} if untrusted_usage is None else {
        id: (blobs, size) for id, blobs, size in untrusted_usage["snapshots"]}
    report: dict[str, Any] = {
        "snapshots": len(history), "logical_bytes": logical, "stored_bytes": stored,
        "dedup_ratio": round(logical / stored, 2) if stored else None,
        "backup_qube": untrusted_stats,
        "per_snapshot": [{"id": s.id.hex(), "time": s.time, "logical_bytes": s.bytes_total,
                          "unique_stored_bytes": unique[s.id][1] if s.id in unique else None}
                         for s in history]}
    if untrusted_usage is not None:
        report["shared_stored_bytes"] = untrusted_usage["shared_bytes"]
        report["garbage_stored_bytes"] = untrusted_usage["unreferenced_bytes"]
    if args.json:
        print_json(report)
        return EXIT_OK
    print(f"repository {ctx.repo} in {ctx.backup_vm}: {len(history)} snapshots")
    print(f"  logical size:  {human_bytes(logical)} (the volumes of every snapshot, from "
          "the authenticated manifests)")
    print(f"  stored size:   {human_bytes(stored)} in {untrusted_stats['packs']} packs "
          f"(as reported by the backup qube)")
    if stored:
        print(f"  dedup ratio:   {logical / stored:.2f} (logical / stored, compression included)")
    print(f"  file system:   {human_bytes(untrusted_stats['fs_free'])} free of "
          f"{human_bytes(untrusted_stats['fs_size'])}")
    if untrusted_usage is None:
        if not args.quick:
            print(f"  (the backup qube's qbackupd speaks protocol version {session.version}: "
                  "per-snapshot unique sizes need version 2)")
        return EXIT_OK
    print(f"  shared by 2+ snapshots: {human_bytes(untrusted_usage['shared_bytes'])}; "
          f"garbage (no snapshot uses it; `qbackup gc` frees it): "
          f"{human_bytes(max(0, untrusted_usage['unreferenced_bytes']))}")
    print(f"{'ID':16}  {'TIME':19}  {'LOGICAL':>10}  {'UNIQUE':>10}")
    for s in history:
        only = human_bytes(unique[s.id][1]) if s.id in unique else "?"
        print(f"{s.id.hex()[:16]}  {local_time(s.time)}  {human_bytes(s.bytes_total):>10}  "
              f"{only:>10}")
    print("UNIQUE: stored bytes only that snapshot uses (what deleting it alone would free)")
    return EXIT_OK
