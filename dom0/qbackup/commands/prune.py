# SPDX-License-Identifier: GPL-2.0-or-later
"""`qbackup prune` (retention rules) and `qbackup protect` / `unprotect`.

dom0 decides what goes, from the authenticated times and qubes of the
snapshots (qbackup.retention); the backup qube deletes. Protection is
recorded in dom0's local state, where the backup qube cannot remove it.
"""

from __future__ import annotations

import argparse

from qbackup import restore as restore_mod, retention
from qbackup.commands.common import (EXIT_OK, Context, ask_passphrase, find_snapshot,
                                     local_time, open_history, print_json)
from qbackup.commands.repository import DELETE_FREES_NOTHING
from qbackup.errors import UsageError


def keep_within(text: str) -> retention.Within:
    try:
        return retention.parse_within(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _policy(args: argparse.Namespace) -> retention.Policy:
    policy = retention.Policy(args.keep_last, args.keep_hourly, args.keep_daily, args.keep_weekly,
                              args.keep_monthly, args.keep_yearly, args.keep_within)
    if policy.empty():
        raise UsageError("give at least one --keep-* rule (prune never decides on none)")
    return policy


def _report(decisions: list[retention.Decision], damaged: list[restore_mod.Damaged],
            dry_run: bool) -> None:
    go = "would delete" if dry_run else "delete"
    for d in decisions:
        snap = d.snapshot
        what = f"keep ({', '.join(d.reasons)})" if d.keep else go
        print(f"{snap.id.hex()[:16]}  {local_time(snap.time)}  {', '.join(sorted(snap.qubes)):30}"
              f"  {what}")
    for bad in damaged:
        print(f"{bad.id.hex()[:16]}  {'?':19}  {'?':30}  keep (damaged: prune leaves it alone)")


def cmd_prune(ctx: Context, args: argparse.Namespace) -> int:
    policy = _policy(args)
    passphrase = ask_passphrase(args)
    state = ctx.state()
    with ctx.session() as session:
        keys, history = open_history(ctx, args, session, passphrase, write=not args.dry_run)
        decisions = retention.plan(history, policy, state.load(keys.repo_id).protected,
                                   per_qube=args.per_qube)
        victims = [d.snapshot for d in reversed(decisions) if not d.keep]  # oldest first
        if not args.dry_run and victims:
            restore_mod.delete_snapshots(session, keys, state, victims, history)
    if args.json:
        print_json({"dry_run": args.dry_run, "snapshots": [
            {"id": d.snapshot.id.hex(), "time": d.snapshot.time, "qubes": sorted(d.snapshot.qubes),
             "keep": d.keep, "reasons": d.reasons} for d in decisions],
            "damaged": [d.id.hex() for d in history.damaged]})
        return EXIT_OK
    _report(decisions, history.damaged, args.dry_run)
    kept = len(decisions) - len(victims)
    if args.dry_run:
        print(f"dry run: would delete {len(victims)} and keep {kept} snapshots")
    else:
        print(f"deleted {len(victims)} snapshots, kept {kept}")
        if victims:
            print(DELETE_FREES_NOTHING)
    return EXIT_OK


def cmd_protect(ctx: Context, args: argparse.Namespace) -> int:
    protect = args.command == "protect"
    passphrase = ask_passphrase(args)
    with ctx.session() as session:
        keys, history = open_history(ctx, args, session, passphrase)
        snap = find_snapshot(history, args.snapshot)
    ctx.state().set_protected(keys.repo_id, snap.id, protect)
    if protect:
        print(f"snapshot {snap.id.hex()} is protected: prune keeps it and delete refuses it "
              f"(recorded in {ctx.state_dir})")
    else:
        print(f"snapshot {snap.id.hex()} is no longer protected")
    return EXIT_OK
