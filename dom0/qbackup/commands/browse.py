# SPDX-License-Identifier: GPL-2.0-or-later
"""`qbackup browse SNAPSHOT QUBE`: one file back without restoring a qube.

A temporary qube (`qbackup-browse-...`, red, no network, tagged
`qbackup-browse`) gets the backed-up private volume of QUBE, streamed in
and authenticated as restore does (VolumeStream into
admin.vm.volume.ImportWithSize), and its file manager is opened: the
untrusted file system is parsed in that qube, never in dom0; the user
copies files out with qvm-copy. `browse --cleanup` removes such qubes."""

from __future__ import annotations

import argparse
import re
import secrets
import sys

from qbackup.commands.common import (EXIT_INTEGRITY, EXIT_OK, Context, ask_passphrase, clean,
                                     find_snapshot, open_history)
from qbackup.errors import QbackupError, UsageError
from qbackup.progress import Progress, human_bytes
from qbackup.qubes import RESTORE_IN_PROGRESS
from qbackup.restore import VolumeStream

PREFIX = "qbackup-browse-"
TAG = "qbackup-browse"
LABEL = "red"
VOLUME = "private"


def browse_name(qube: str, taken) -> str:
    """qbackup-browse-QUBE-XXXX (a valid qube name of at most 31 characters)."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", qube)[:10]
    for _ in range(100):
        name = f"{PREFIX}{stem}-{secrets.token_hex(2)}"
        if name not in taken:
            return name
    raise QbackupError("no free name for the browse qube")


def _template(args: argparse.Namespace, entry: dict, system) -> str:
    if args.template:
        if system.qubes.get(args.template) != "TemplateVM":
            raise UsageError(f"--template {args.template}: no such template on this system")
        return args.template
    own = entry["properties"].get("template") or entry["dependencies"].get("template")
    if isinstance(own, str) and system.qubes.get(own) == "TemplateVM":
        return own
    default = system.defaults.get("default_template")
    if default is None:
        raise QbackupError("this system has no default template: give --template TEMPLATE")
    if isinstance(own, str):
        print(f"qbackup: warning: {own} is not a template on this system: the browse qube "
              f"uses {default}", file=sys.stderr)
    return default


def cmd_browse(ctx: Context, args: argparse.Namespace) -> int:
    if args.cleanup:
        if args.snapshot or args.qube or args.template or args.pool:
            raise UsageError("--cleanup takes no snapshot, qube, --template or --pool")
        return cleanup(ctx)
    if not (args.snapshot and args.qube):
        raise UsageError("give a snapshot and a qube (or --cleanup)")
    passphrase = ask_passphrase(args)
    with ctx.session() as session:
        keys, history = open_history(ctx, args, session, passphrase)
        snap = find_snapshot(history, args.snapshot)
        entry = snap.qubes.get(args.qube)
        if entry is None:
            raise UsageError(f"qube not in snapshot {snap.id.hex()[:16]}: {clean(args.qube)}")
        vol = entry["volumes"].get(VOLUME)
        if vol is None:
            raise QbackupError(f"snapshot {snap.id.hex()[:16]} holds no private volume of "
                               f"{args.qube}")
        system = ctx.backend.system()
        if args.pool and args.pool not in system.pools:
            raise UsageError(f"--pool {args.pool}: no such pool on this system")
        template = _template(args, entry, system)
        name = browse_name(args.qube, system.qubes)
        backend = ctx.backend
        backend.create_qube(name, "AppVM", LABEL, template,
                            {VOLUME: args.pool, "volatile": args.pool} if args.pool else {})
        try:
            backend.add_tag(name, RESTORE_IN_PROGRESS)
            backend.add_tag(name, TAG)
            backend.set_property(name, "netvm", None)
            backend.set_property(name, "include_in_backups", False)
            backend.set_property(name, "default_dispvm", None)
            with Progress(vol["size"], f"browse {args.qube}") as progress:
                stream = VolumeStream(session, keys, f"{args.qube}:{VOLUME}", vol,
                                      progress=progress)
                try:
                    backend.import_volume(name, VOLUME, stream, vol["size"])
                except QbackupError as e:
                    if stream.error is None:
                        raise
                    raise _Integrity(stream.error) from e
                finally:
                    stream.close()
            backend.remove_tag(name, RESTORE_IN_PROGRESS)
        except BaseException as e:
            _remove(ctx, name)  # ours, temporary, and not complete: gone
            if isinstance(e, _Integrity):
                print(f"qbackup: error: the private volume of {args.qube} failed "
                      f"authentication: {clean(str(e))}; {name} was removed", file=sys.stderr)
                return EXIT_INTEGRITY
            raise
    backend.run_file_manager(name)
    print(f"{name}: the private volume of {args.qube} from snapshot {snap.id.hex()[:16]} "
          f"({human_bytes(vol['size'])}), based on {template}, without network; its file "
          "manager is open")
    print(f"copy files out with qvm-copy in {name}; remove it with: qbackup browse --cleanup")
    return EXIT_OK


class _Integrity(QbackupError):
    pass


def _remove(ctx: Context, name: str) -> None:
    try:
        ctx.backend.remove_qube(name)
    except QbackupError as e:
        print(f"qbackup: warning: {clean(str(e))} (it keeps the tag {RESTORE_IN_PROGRESS}: "
              "qubesd will not start it)", file=sys.stderr)


def cleanup(ctx: Context) -> int:
    system = ctx.backend.system()
    removed = []
    for name in sorted(q for q in system.qubes if q.startswith(PREFIX)):
        if TAG not in ctx.backend.qube_tags(name):
            print(f"qbackup: warning: {name} has no tag {TAG}: not made by qbackup browse, "
                  "left alone", file=sys.stderr)
            continue
        if name in system.running:
            ctx.backend.kill_qube(name)
        ctx.backend.remove_qube(name)
        removed.append(name)
    print(f"removed {len(removed)} browse qubes" + (f": {', '.join(removed)}" if removed else ""))
    return EXIT_OK
