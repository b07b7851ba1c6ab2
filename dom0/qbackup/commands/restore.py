# SPDX-License-Identifier: GPL-2.0-or-later
"""`qbackup verify` and `qbackup restore` to files or block devices (recreating
qubes, `restore --qubes`, is in qbackup.commands.qubes_restore)."""

from __future__ import annotations

import argparse
import os

from qbackup import restore as restore_mod
from qbackup.commands.common import (EXIT_INTEGRITY, EXIT_OK, Context, ask_passphrase,
                                     clean, find_snapshot, open_history, print_json)
from qbackup.commands.qubes_restore import cmd_restore_qubes
from qbackup.errors import QbackupError, UsageError
from qbackup.progress import Progress, human_bytes


def _check_json(snap: restore_mod.SnapshotInfo, result: restore_mod.CheckResult) -> dict:
    return {"snapshot": snap.id.hex(), "ok": result.ok, "errors": result.errors,
            "chunks": result.chunks, "bytes": result.bytes}


def _report_check(snap: restore_mod.SnapshotInfo, result: restore_mod.CheckResult,
                  verb: str) -> None:
    status = "OK" if result.ok else f"FAILED ({len(result.errors)} errors)"
    print(f"snapshot {snap.id.hex()[:16]}: {verb} {status}: {result.chunks} chunks, "
          f"{human_bytes(result.bytes)}")
    for error in result.errors:
        print(f"  {clean(error)}")


def cmd_verify(ctx: Context, args: argparse.Namespace) -> int:
    if args.all and args.snapshot:
        raise UsageError("give a snapshot or --all, not both")
    passphrase = ask_passphrase(args)
    with ctx.session() as session:
        keys, history = open_history(ctx, args, session, passphrase)
        snapshots = history if args.all else [find_snapshot(history, args.snapshot or "latest")]
        results = []
        for snap in snapshots:
            with Progress(snap.bytes_total, f"verify {snap.id.hex()[:16]}") as progress:
                results.append((snap, restore_mod.verify(session, keys, snap,
                                                         progress=progress)))
    if args.json:
        print_json({"ok": all(r.ok for _, r in results),
                     "results": [_check_json(s, r) for s, r in results]})
    else:
        if not results:
            print("no snapshots")
        for snap, result in results:
            _report_check(snap, result, "verify")
    return EXIT_OK if all(r.ok for _, r in results) else EXIT_INTEGRITY


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
    _report_check(snap, result, "restore")
    if result.ok:
        for (qube, vol), path in sorted(targets.items()):
            print(f"  {qube}/{vol} -> {path}")
    return EXIT_OK if result.ok else EXIT_INTEGRITY
