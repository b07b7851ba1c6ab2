# SPDX-License-Identifier: GPL-2.0-or-later
"""`qbackup repo list` and `qbackup repo trust`: which repository each
(backup qube, repository name) is pinned to, and re-pinning one explicitly.

dom0 pins the repository id behind a name at `init` or first use, and
refuses another repository served under that name (DESIGN §2.9). `repo
trust` is the one way to accept another: it needs the passphrase (the
repository must open with it), shows the pinned and the served repository,
and asks for confirmation, or takes `--id` naming the served one.
"""

from __future__ import annotations

import argparse
import sys

from qbackup import restore as restore_mod
from qbackup.commands.common import (EXIT_OK, Context, ask_passphrase, local_time, print_json,
                                     unlock)
from qbackup.errors import QbackupError, UsageError
from qbackup.restore import SNAPSHOT_PREFIX


def cmd_repo_list(ctx: Context, args: argparse.Namespace) -> int:
    pins = ctx.state().pins()
    if args.json:
        print_json({"pins": [{"backup_vm": vm, "repo": repo, "repo_id": pin.repo_id.hex(),
                              "since": pin.since} for (vm, repo), pin in sorted(pins.items())]})
        return EXIT_OK
    if not pins:
        print("no repository pinned yet")
        return EXIT_OK
    print(f"{'BACKUP QUBE':31}  {'REPOSITORY':20}  {'PINNED SINCE':19}  REPOSITORY ID")
    for (vm, repo), pin in sorted(pins.items()):
        print(f"{vm:31}  {repo:20}  {local_time(pin.since)}  {pin.repo_id.hex()}")
    return EXIT_OK


def _confirmed(args: argparse.Namespace, served: bytes) -> bool:
    """Whether the user accepts the served repository: --id names it, or
    they type `yes` on the terminal."""
    if args.id is not None:
        if not served.hex().startswith(args.id):
            raise QbackupError(f"the backup qube serves repository {served.hex()}, not {args.id}:"
                               " nothing changed")
        return True
    if not sys.stdin.isatty():
        raise UsageError(f"no terminal to confirm: give --id {served.hex()[:16]} to trust it")
    return input("Type 'yes' to pin this name to the served repository: ").strip() == "yes"


def cmd_repo_trust(ctx: Context, args: argparse.Namespace) -> int:
    if args.id is not None:
        args.id = args.id.lower()
        if not SNAPSHOT_PREFIX.fullmatch(args.id):
            raise UsageError("--id takes 8 to 64 hex digits of the repository id")
    state = ctx.state()
    pin = state.pins().get((ctx.backup_vm, ctx.repo))
    passphrase = ask_passphrase(args)
    with ctx.session() as session:
        keys = unlock(session, passphrase, write=False)  # the pin is what is being decided
        history = restore_mod.load_history(session, keys, state,
                                           allow_rollback=args.allow_rollback)
    print(f"repository '{ctx.repo}' in {ctx.backup_vm}:")
    if pin is None:
        print("  pinned: nothing yet")
    else:
        print(f"  pinned: {pin.repo_id.hex()} (since {local_time(pin.since)})")
    newest = f", newest {local_time(history[-1].time)}" if history else ""
    print(f"  served: {keys.repo_id.hex()} (created {local_time(keys.created)}, "
          f"{len(history)} snapshots{newest})")
    if pin is not None and pin.repo_id == keys.repo_id:
        print("the served repository is the pinned one: nothing to do")
        return EXIT_OK
    if not _confirmed(args, keys.repo_id):
        raise QbackupError("not confirmed: nothing changed")
    state.pin(ctx.backup_vm, ctx.repo, keys.repo_id)
    print(f"'{ctx.repo}' in {ctx.backup_vm} is now pinned to {keys.repo_id.hex()}")
    return EXIT_OK
