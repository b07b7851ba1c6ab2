# SPDX-License-Identifier: GPL-2.0-or-later
"""`qbackup restore SNAPSHOT --qubes [QUBE ...]`: recreate qubes through
the Admin API (qbackup.recreate), their volumes streamed straight into the
new qubes' volumes."""

from __future__ import annotations

import argparse
import sys

from qbackup import recreate
from qbackup.commands.common import (EXIT_ERROR, EXIT_INTEGRITY, EXIT_OK, Context,
                                     ask_passphrase, clean, find_snapshot, local_time,
                                     open_history)
from qbackup.errors import QbackupError, UsageError
from qbackup.progress import Progress, human_bytes
from qbackup.qubes import RESTORE_IN_PROGRESS


def rename_arg(text: str) -> tuple[str, str]:
    old, sep, new = text.partition(":")
    if not (sep and old and new):
        raise argparse.ArgumentTypeError(f"{text!r}: expected OLD:NEW")
    return old, new


def options_of(args: argparse.Namespace, backup_vm: str | None) -> recreate.Options:
    renames: dict[str, str] = {}
    for old, new in args.rename:
        if old in renames:
            raise UsageError(f"--rename {old}: given twice")
        renames[old] = recreate.check_new_name(new)
    return recreate.Options(qubes=list(args.qubes), renames=renames, pool=args.pool,
                            replace=set(args.replace), skip_missing=args.skip_missing,
                            backup_vm=backup_vm)


def warn(lines: list[str]) -> None:
    for line in lines:
        print(f"qbackup: warning: {clean(line)}", file=sys.stderr)


def print_plan(plan: recreate.Plan) -> None:
    snap = plan.snapshot
    print(f"restore plan: snapshot {snap.id.hex()[:16]} ({local_time(snap.time)}), "
          f"{len(plan.names)} qubes: "
          + ", ".join(new if new == old else f"{old} as {new}" for old, new in plan.names.items()))
    for line in plan.lines():
        print(f"  {clean(line, 2000)}")
    if plan.warnings:
        print("warnings:")
        for line in plan.warnings:
            print(f"  {clean(line)}")
    if plan.problems:
        print("problems (the restore would not start):")
        for line in plan.problems:
            print(f"  {clean(line)}")


def cmd_restore_qubes(ctx: Context, args: argparse.Namespace) -> int:
    options = options_of(args, ctx.backup_vm)
    passphrase = ask_passphrase(args)
    with ctx.session() as session:
        keys, history = open_history(ctx, args, session, passphrase)
        snap = find_snapshot(history, args.snapshot)
        plan = recreate.plan(snap, ctx.backend.system(), options)
        if args.dry_run:
            print_plan(plan)
            return EXIT_ERROR if plan.problems else EXIT_OK
        if plan.problems:
            more = len(plan.problems) - 1
            raise QbackupError(f"{plan.problems[0]}" + (
                f" (and {more} more problems: --dry-run lists them)" if more else "")
                + "; nothing was changed")
        warn(plan.warnings)
        total = sum(s.action[4]["size"] for s in plan.steps if s.kind == "import")
        with Progress(total, f"restore {snap.id.hex()[:16]}") as progress:
            outcome = recreate.execute(plan, ctx.backend, session, keys, progress=progress)
    warn(outcome.warnings)
    if outcome.restored:
        print(f"restored {len(outcome.restored)} qubes from snapshot {snap.id.hex()[:16]}: "
              f"{', '.join(outcome.restored)}")
    print(f"  {outcome.volumes} volumes imported, {human_bytes(outcome.bytes)}")
    if not outcome.failed:
        return EXIT_OK
    for qube, reasons in outcome.failed.items():
        for reason in reasons:
            print(f"FAILED {qube}: {clean(reason)}")
    names = ", ".join(outcome.failed)
    print(f"qbackup: error: {len(outcome.failed)} qubes not restored completely: {names}; "
          f"they keep the tags {RESTORE_IN_PROGRESS} and {recreate.RESTORE_FAILED} (qubesd "
          "will not start them): remove them (qvm-remove) or restore them again with --replace",
          file=sys.stderr)
    return EXIT_INTEGRITY if outcome.integrity else EXIT_ERROR
