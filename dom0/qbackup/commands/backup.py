# SPDX-License-Identifier: GPL-2.0-or-later
"""`qbackup backup` and `qbackup cleanup`: choose the qubes and volumes, take
a copy of every volume first, then send (qbackup.copies, qbackup.backup);
list or remove the copies no backup needs."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from qbackup import jobs, restore as restore_mod
from qbackup.backup import BackupStats, backup
from qbackup.commands.common import (EXIT_ERROR, EXIT_OK, Context, ask_passphrase, clean,
                                     local_time, open_history, print_json, warn)
from qbackup.commands.jobs import job_run
from qbackup.copies import Copies, Leftover
from qbackup.errors import QbackupError, UsageError
from qbackup.progress import Progress, human_bytes
from qbackup.qubes import QubeInfo, VolumeInfo, volumes_to_backup


def _select_qubes(args: argparse.Namespace, qubes: list[QubeInfo],
                  backup_vm: str) -> list[QubeInfo]:
    """The qubes named, or with --all every qube but the backup qube (whose
    private volume holds the repository); minus --exclude."""
    by_name = {q.name: q for q in qubes}
    unknown = sorted(set(args.qubes + args.exclude) - set(by_name))
    if unknown:
        raise UsageError(f"no such qube: {', '.join(clean(n) for n in unknown)}")
    if args.all == bool(args.qubes):
        raise UsageError("name the qubes to back up, or give --all (not both)")
    names = set(by_name) - {backup_vm} if args.all else set(args.qubes)
    return [by_name[n] for n in sorted(names - set(args.exclude))]


def _targets(qubes: list[QubeInfo]) -> list[tuple[QubeInfo, VolumeInfo]]:
    targets = []
    for qube in qubes:
        for vol in volumes_to_backup(qube):
            if vol.path is None:
                raise QbackupError(f"{qube.name}: cannot back up volume {vol.name}: "
                                   f"{vol.unreadable}")
            targets.append((qube, vol))
    return targets


def _job_qubes(ctx: Context, args: argparse.Namespace, qubes: list[QubeInfo]) -> list[QubeInfo]:
    """The qubes of the context's job, after the checks of `qbackup check`:
    refused on any error, warnings on stderr."""
    assert ctx.job is not None
    if args.qubes or args.all or args.exclude:
        raise UsageError(f"job {ctx.job.name} chooses the qubes: give no QUBE, --all or "
                         "--exclude with --job")
    result = jobs.review(ctx.job, qubes)
    for warning in result.warnings:
        print(f"qbackup: warning: {clean(warning)}", file=sys.stderr)
    if result.errors:
        more = f" (and {len(result.errors) - 1} more: qbackup check {ctx.job.name})" \
            if len(result.errors) > 1 else ""
        raise QbackupError(f"job {ctx.job.name} refused: {result.errors[0]}{more}")
    by_name = {q.name: q for q in qubes}
    return [by_name[name] for name in result.selection.included]


def _report_problems(problems: list[str]) -> None:
    for problem in problems:
        warn(problem)


def cmd_backup(ctx: Context, args: argparse.Namespace) -> int:
    every_qube = ctx.backend.list_qubes()
    if ctx.job is None:
        return _backup(ctx, args, every_qube,
                       _select_qubes(args, every_qube, ctx.backup_vm), {})
    with job_run(ctx) as figures:
        return _backup(ctx, args, every_qube, _job_qubes(ctx, args, every_qube), figures)


def _backup(ctx: Context, args: argparse.Namespace, every_qube: list[QubeInfo],
            qubes: list[QubeInfo], figures: dict) -> int:
    """Back up `qubes` (of `every_qube`); their figures also go into `figures`."""
    if not qubes:
        raise UsageError("nothing to back up: every qube is excluded")
    targets = _targets(qubes)
    live = args.live or (ctx.job is not None and ctx.job.live)
    # Firewall rules and device assignments: only for the qubes backed up.
    settings = {q.name: {**q.settings(), **ctx.backend.qube_details(q.name).settings()}
                for q in qubes}
    passphrase, state = ask_passphrase(args), ctx.state()
    with ctx.session() as session:
        keys, history = open_history(ctx, args, session, passphrase, write=True)
        with Copies(state, keys.repo_id, keys.chunk_size) as copies:
            sources = copies.prepare(targets, history, every_qube, live=live,
                                     full=args.full)
            if ctx.verbose:
                for s in sources:
                    print(f"qbackup: {s.qube}/{s.volume}: {s.path} ({human_bytes(s.size)}, "
                          f"{s.origin['state']}): {s.how}{f' ({s.why})' if s.why else ''}",
                          file=sys.stderr)
            with Progress(sum(s.size for s in sources), "backup") as progress:
                # the new snapshot follows dom0's head for this repository
                stats = backup(session, keys, sources, settings, state=state,
                               progress=progress)
            snapshot = restore_mod.SnapshotInfo(stats.snapshot_id, time.time(), "", None, {}, 0)
            removed, problems = copies.committed(snapshot, history, every_qube)
    _report_problems(problems)
    figures.update(_figures(stats, qubes, sources, len(removed)))
    if args.json:
        print_json({**({"job": ctx.job.name} if ctx.job else {}), **figures})
        return EXIT_OK
    rate = stats.bytes_read / stats.seconds if stats.seconds > 0 else 0
    print(f"snapshot {stats.snapshot_id.hex()}")
    print(f"backed up {stats.volumes} volumes of {len(qubes)} qubes "
          f"({', '.join(q.name for q in qubes)}): {human_bytes(stats.bytes_total)}")
    print(f"  read {human_bytes(stats.bytes_read)}, sent {human_bytes(stats.bytes_sent)}")
    print(f"  chunks: {stats.chunks_total} in all, {stats.chunks_unchanged} unchanged (not "
          f"read), {stats.chunks_zero} zero, {stats.chunks_new} new, "
          f"{stats.chunks_dedup} already stored")
    for source, read in zip(sources, stats.reads):
        why = f": {read.why}" if read.why else ""
        print(f"  {read.qube}:{read.volume} ({source.origin['state']}, taken "
              f"{local_time(source.origin['taken'])}): {read.how}, "
              f"read {human_bytes(read.bytes_read)}{why}")
    print(f"  took {stats.seconds:.2f} s ({human_bytes(rate)}/s read)")
    return EXIT_OK


def _figures(stats: BackupStats, qubes: list[QubeInfo], sources: list, removed: int) -> dict:
    return {
        "snapshot": stats.snapshot_id.hex(), "qubes": [q.name for q in qubes],
        "volumes": stats.volumes, "bytes_total": stats.bytes_total,
        "bytes_read": stats.bytes_read, "bytes_sent": stats.bytes_sent,
        "chunks_total": stats.chunks_total, "chunks_zero": stats.chunks_zero,
        "chunks_new": stats.chunks_new, "chunks_dedup": stats.chunks_dedup,
        "chunks_unchanged": stats.chunks_unchanged, "seconds": stats.seconds,
        "copies_removed": removed,
        "reads": [{"qube": r.qube, "volume": r.volume, "read": r.how, "reason": r.why,
                   "bytes_read": r.bytes_read, "chunks_unchanged": r.chunks_unchanged,
                   "state": s.origin["state"], "taken": s.origin["taken"]}
                  for s, r in zip(sources, stats.reads)]}


def _leftover_json(leftover: Leftover) -> dict:
    return {"where": leftover.where, "kind": leftover.kind, "reason": leftover.why}


def cmd_cleanup(ctx: Context, args: argparse.Namespace) -> int:
    qubes = ctx.backend.list_qubes()
    passphrase, state = ask_passphrase(args), ctx.state()
    with ctx.session() as session, contextlib.ExitStack() as stack:
        keys = ctx.unlock(session, passphrase, write=False)
        # locked before the history is read: a backup committing meanwhile
        # would otherwise make its new bases look left over
        copies = stack.enter_context(Copies(state, keys.repo_id, keys.chunk_size))
        history = restore_mod.load_history(session, keys, state,
                                           allow_rollback=args.allow_rollback)
        for bad in history.damaged:
            warn(f"snapshot {bad.id.hex()} is damaged and left out: {bad.reason}")
        plan = copies.plan(history, qubes)
        kept = [(c, "base of the next incremental") for c in plan.bases.values()] + [
            (c, "kept to resume an interrupted backup") for c in plan.pending.values()] + [
            (c, "the snapshot that read it cannot be read now") for c in plan.held]
        doomed = list(plan.leftovers)
        if args.all:
            doomed += [Leftover(c.where, c.kind, why + " (--all)", c) for c, why in kept]
            kept = []
        problems: list[str] = []
        if not args.dry_run:
            doomed, problems = copies.remove(doomed)
            if args.all:
                copies.record.run = None
                copies.store.save(copies.record)
    _report_problems(problems)
    verb = "would remove" if args.dry_run else "removed"
    if args.json:
        print_json({"dry_run": args.dry_run, "removed" if not args.dry_run else "would_remove":
                    [_leftover_json(d) for d in doomed],
                    "kept": [{"where": c.where, "kind": c.kind, "volume": c.key, "reason": why}
                             for c, why in kept],
                    "other_repositories": plan.foreign})
        return EXIT_OK
    for d in doomed:
        print(f"{verb} {d.kind} copy {d.where}: {d.why}")
    for c, why in kept:
        print(f"kept {c.kind} copy {c.where} ({c.key}): {why}")
    for where in plan.foreign:
        print(f"not touched {where}: another repository's copy")
    if not doomed and not kept and not plan.foreign:
        print("no copies")
    return EXIT_ERROR if problems else EXIT_OK
