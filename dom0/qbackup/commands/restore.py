# SPDX-License-Identifier: GPL-2.0-or-later
"""`qbackup verify` and `qbackup restore` to files or block devices (recreating
qubes, `restore --qubes`, is in qbackup.commands.qubes_restore)."""

from __future__ import annotations

import argparse
import os

from qbackup import restore as restore_mod
from qbackup.commands.common import (EXIT_INTEGRITY, EXIT_OK, Context, ask_passphrase,
                                     clean, find_snapshot, open_history, print_json)
from qbackup.errors import QbackupError, UsageError
from qbackup.progress import Progress, human_bytes


def sample_percent(text: str) -> float:
    try:
        percent = float(text)
    except ValueError:
        percent = -1.0
    if not 0.01 <= percent <= 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage from 0.01 to 100")
    return percent


def _check_json(snap_id: bytes, result: restore_mod.CheckResult) -> dict:
    return {"snapshot": snap_id.hex(), "ok": result.ok, "errors": result.errors,
            "chunks": result.chunks, "bytes": result.bytes, "skipped": result.skipped}


def _report_check(snap_id: bytes, result: restore_mod.CheckResult, verb: str) -> None:
    status = "OK" if result.ok else f"FAILED ({len(result.errors)} errors)"
    skipped = f" ({result.skipped} more not sampled)" if result.skipped else ""
    print(f"snapshot {snap_id.hex()[:16]}: {verb} {status}: {result.chunks} chunks{skipped}, "
          f"{human_bytes(result.bytes)}")
    for error in result.errors:
        print(f"  {clean(error)}")


def cmd_verify(ctx: Context, args: argparse.Namespace) -> int:
    if args.all and args.snapshot:
        raise UsageError("give a snapshot or --all, not both")
    passphrase = ask_passphrase(args)
    sample = None if args.sample is None else restore_mod.Sample(args.sample / 100)
    with ctx.session() as session:
        keys, history = open_history(ctx, args, session, passphrase, warn_damaged=not args.all)
        snapshots = history if args.all else [find_snapshot(history, args.snapshot or "latest")]
        results = [(d.id, restore_mod.CheckResult(False, [f"snapshot manifest: {d.reason}"], 0, 0))
                   for d in history.damaged] if args.all else []
        label = "verify " + (f"{len(snapshots)} snapshots" if args.all else snapshots[0].id.hex()[:16])
        with Progress(0, label) as progress:  # the total is known once the chunk maps are read
            checked = restore_mod.verify_snapshots(session, keys, snapshots, progress=progress,
                                                   sample=sample)
        results += [(snap.id, result) for snap, result in zip(snapshots, checked)]
    ok = all(r.ok for _, r in results)
    if args.json:
        print_json({"ok": ok, "sample_percent": args.sample,
                    "results": [_check_json(s, r) for s, r in results]})
        return EXIT_OK if ok else EXIT_INTEGRITY
    if not results:
        print("no snapshots")
    if sample is not None:
        print(f"sample: {args.sample:g}% of the distinct data chunks, drawn at random for this "
              "run; every chunk map node checked")
    for snap_id, result in results:
        _report_check(snap_id, result, "verify")
    return EXIT_OK if ok else EXIT_INTEGRITY


def volume_target(text: str) -> tuple[tuple[str, str], str]:
    qube_vol, sep, path = text.partition("=")
    qube, colon, vol = qube_vol.partition(":")
    if not (sep and colon and qube and vol and path):
        raise argparse.ArgumentTypeError(f"{text!r}: expected QUBE:VOLUME=PATH")
    return (qube, vol), path


def _snapshot_volumes(snap: restore_mod.SnapshotInfo) -> list[tuple[str, str]]:
    return sorted((qube, vol) for qube, settings in snap.qubes.items()
                  for vol in settings["volumes"])


def _restore_targets(args: argparse.Namespace,
                     snap: restore_mod.SnapshotInfo) -> dict[tuple[str, str], str]:
    available = _snapshot_volumes(snap)
    if args.volume_target:
        if args.qube:
            raise UsageError("--qube goes with --to, not with --volume-target")
        targets = dict(args.volume_target)
        missing = sorted(set(targets) - set(available))
        if missing:
            raise UsageError("not in this snapshot: "
                             + ", ".join(f"{q}:{v}" for q, v in missing))
        return targets
    qubes = set(args.qube) if args.qube else {q for q, _ in available}
    unknown = sorted(qubes - {q for q, _ in available})
    if unknown:
        raise UsageError(f"qube not in this snapshot: {', '.join(clean(q) for q in unknown)}")
    # Names from an authenticated manifest: manifest.decode allows no "/"
    # and no leading "." in them, so they are safe path components.
    return {(qube, vol): os.path.join(args.to, qube, vol + ".img")
            for qube, vol in available if qube in qubes}


QUBES_ONLY = ("rename", "pool", "replace", "skip_missing", "dry_run")


def cmd_restore(ctx: Context, args: argparse.Namespace) -> int:
    if args.qubes is not None:
        if args.qube or args.force:
            raise UsageError("--qube and --force go with --to or --volume-target; with "
                             "--qubes, name the qubes after it, and --replace QUBE")
        from qbackup.commands.qubes_restore import cmd_restore_qubes  # only for --qubes
        return cmd_restore_qubes(ctx, args)
    given = [o for o in QUBES_ONLY if getattr(args, o)]
    if given:
        raise UsageError(f"--{given[0].replace('_', '-')} goes with --qubes")
    passphrase = ask_passphrase(args)
    with ctx.session() as session:
        keys, history = open_history(ctx, args, session, passphrase)
        snap = find_snapshot(history, args.snapshot)
        targets = _restore_targets(args, snap)
        existing = sorted(p for p in targets.values() if os.path.lexists(p))
        if existing and not args.force:  # checked before creating any directory
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise QbackupError(f"{existing[0]} exists{more}: refusing to overwrite "
                               "without --force")
        if args.to:
            for path in targets.values():
                os.makedirs(os.path.dirname(path), exist_ok=True)
        total = sum(snap.qubes[q]["volumes"][v]["size"] for q, v in targets)
        with Progress(total, f"restore {snap.id.hex()[:16]}") as progress:
            result = restore_mod.restore(session, keys, snap, targets, force=args.force,
                                         progress=progress)
    _report_check(snap.id, result, "restore")
    if result.ok:
        for (qube, vol), path in sorted(targets.items()):
            print(f"  {qube}/{vol} -> {path}")
    return EXIT_OK if result.ok else EXIT_INTEGRITY
