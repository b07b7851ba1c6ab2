# SPDX-License-Identifier: GPL-2.0-or-later
"""`qbackup backup`: choose the qubes and volumes, then run the backup engine."""

from __future__ import annotations

import argparse
import sys

from qbackup import jobs
from qbackup.backup import VolumeSource, backup
from qbackup.commands.common import (EXIT_OK, Context, ask_passphrase, clean, open_history,
                                     print_json)
from qbackup.commands.jobs import job_run
from qbackup.errors import QbackupError, UsageError
from qbackup.progress import Progress, human_bytes
from qbackup.qubes import QubeInfo, volumes_to_backup
from qbackup.volume import volume_size


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


def _sources(qubes: list[QubeInfo]) -> list[VolumeSource]:
    sources = []
    for qube in qubes:
        for vol in volumes_to_backup(qube):
            if vol.path is None:
                raise QbackupError(f"{qube.name}: cannot back up volume {vol.name}: "
                                   f"{vol.unreadable}")
            sources.append(VolumeSource(qube=qube.name, volume=vol.name, path=vol.path,
                                        size=volume_size(vol.path), settings=vol.settings()))
    return sources


def _job_qubes(ctx: Context, args: argparse.Namespace) -> list[QubeInfo]:
    """The qubes of the context's job, after the checks of `qbackup check`:
    refused on any error, warnings on stderr."""
    assert ctx.job is not None
    if args.qubes or args.all or args.exclude:
        raise UsageError(f"job {ctx.job.name} chooses the qubes: give no QUBE, --all or "
                         "--exclude with --job")
    qubes = ctx.backend.list_qubes()
    result = jobs.review(ctx.job, qubes)
    for warning in result.warnings:
        print(f"qbackup: warning: {clean(warning)}", file=sys.stderr)
    if result.errors:
        more = f" (and {len(result.errors) - 1} more: qbackup check {ctx.job.name})" \
            if len(result.errors) > 1 else ""
        raise QbackupError(f"job {ctx.job.name} refused: {result.errors[0]}{more}")
    by_name = {q.name: q for q in qubes}
    return [by_name[name] for name in result.selection.included]


def cmd_backup(ctx: Context, args: argparse.Namespace) -> int:
    if ctx.job is None:
        return _backup(ctx, args, _select_qubes(args, ctx.backend.list_qubes(),
                                                ctx.backup_vm), {})
    with job_run(ctx) as figures:
        return _backup(ctx, args, _job_qubes(ctx, args), figures)


def _backup(ctx: Context, args: argparse.Namespace, qubes: list[QubeInfo],
            figures: dict) -> int:
    """Back up `qubes`; their figures also go into `figures`."""
    if not qubes:
        raise UsageError("nothing to back up: every qube is excluded")
    sources = _sources(qubes)
    if ctx.verbose:
        for s in sources:
            print(f"qbackup: {s.qube}/{s.volume}: {s.path} ({human_bytes(s.size)})",
                  file=sys.stderr)
    # Firewall rules and device assignments: only for the qubes backed up.
    settings = {q.name: {**q.settings(), **ctx.backend.qube_details(q.name).settings()}
                for q in qubes}
    passphrase, state = ask_passphrase(args), ctx.state()
    with ctx.session() as session:
        # the new snapshot follows dom0's head for this repository
        keys, _ = open_history(ctx, args, session, passphrase, write=True)
        with Progress(sum(s.size for s in sources), "backup") as progress:
            stats = backup(session, keys, sources, settings,
                           state=state, progress=progress)
    figures.update({"snapshot": stats.snapshot_id.hex(), "qubes": [q.name for q in qubes],
                    "volumes": stats.volumes, "bytes_total": stats.bytes_total,
                    "bytes_read": stats.bytes_read, "bytes_sent": stats.bytes_sent,
                    "chunks_total": stats.chunks_total, "chunks_zero": stats.chunks_zero,
                    "chunks_new": stats.chunks_new, "chunks_dedup": stats.chunks_dedup,
                    "seconds": stats.seconds})
    if args.json:
        print_json({**({"job": ctx.job.name} if ctx.job else {}), **figures})
        return EXIT_OK
    rate = stats.bytes_read / stats.seconds if stats.seconds > 0 else 0
    print(f"snapshot {stats.snapshot_id.hex()}")
    print(f"backed up {stats.volumes} volumes of {len(qubes)} qubes "
          f"({', '.join(q.name for q in qubes)}): {human_bytes(stats.bytes_total)}")
    print(f"  read {human_bytes(stats.bytes_read)}, sent {human_bytes(stats.bytes_sent)}")
    print(f"  chunks: {stats.chunks_total} in all, {stats.chunks_zero} zero, "
          f"{stats.chunks_new} new, {stats.chunks_dedup} already stored")
    print(f"  took {stats.seconds:.2f} s ({human_bytes(rate)}/s read)")
    return EXIT_OK
