# SPDX-License-Identifier: GPL-2.0-or-later
"""`python -m qbackup_sim`: create a simulated dom0, start/stop its daemon,
show its status, and run `qbackup` against it (`run DIR ARGS...`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qbackup.commands.common import parse_size
from qbackup_sim.backend import run_qbackup
from qbackup_sim.daemon import daemon_pid, socket_path, start_daemon, stop_daemon
from qbackup_sim.inventory import CLASSES, SimError, create_sim, load_inventory

_DEFAULT_VOLUMES = {"TemplateVM": {"root": 16 << 20, "private": 8 << 20},
                    "StandaloneVM": {"root": 16 << 20, "private": 8 << 20}}


def _qube_spec(text: str) -> tuple[str, dict[str, Any]]:
    """NAME:CLASS[:VOL=SIZE[,VOL=SIZE...]]"""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[1] not in CLASSES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME:CLASS[:VOL=SIZE,...] with CLASS one of {', '.join(CLASSES)}")
    volumes = dict(_DEFAULT_VOLUMES.get(parts[1], {"private": 8 << 20}))
    if len(parts) == 3:
        volumes = {}
        for item in parts[2].split(","):
            vol, _, size = item.partition("=")
            try:
                volumes[vol] = parse_size(size)
            except ValueError as e:
                raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    label = "black" if parts[1] == "TemplateVM" else "red"
    return parts[0], {"class": parts[1], "label": label, "volumes": volumes}


def _create(args: argparse.Namespace) -> int:
    qubes = dict(args.qube)
    templates = [n for n, q in qubes.items() if q["class"] == "TemplateVM"]
    for qube in qubes.values():
        if qube["class"] in ("AppVM", "DispVM") and templates:
            qube["template"] = templates[0]
    root = create_sim(args.dir, qubes, backup_vm=args.backup_vm, pool_dir=args.pool_dir)
    print(f"created sim in {root} with qubes: {', '.join(sorted(load_inventory(root)['qubes']))}")
    return 0


def _start(args: argparse.Namespace) -> int:
    load_inventory(args.dir)
    print(f"daemon running (pid {start_daemon(args.dir)}) on {socket_path(args.dir)}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    print("daemon stopped" if stop_daemon(args.dir) else "daemon was not running")
    return 0


def _status(args: argparse.Namespace) -> int:
    inventory = load_inventory(args.dir)
    for name, qube in sorted(inventory["qubes"].items()):
        volumes = ", ".join(f"{v} {s['size']} B" for v, s in sorted(qube["volumes"].items()))
        print(f"qube {name} ({qube['class']}): {volumes or 'no volumes'}")
    print(f"backup qube: {inventory['backup_vm']}")
    pid = daemon_pid(args.dir)
    if pid is None:
        print("daemon not running")
        return 3
    print(f"daemon running (pid {pid}) on {socket_path(args.dir)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:  # everything after DIR belongs to qbackup, --help included
        if len(argv) < 2 or argv[1].startswith("-"):
            print("usage: python -m qbackup_sim run DIR [--] QBACKUP-ARGS...", file=sys.stderr)
            return 2
        rest = argv[2:]
        return run_qbackup(argv[1], rest[1:] if rest[:1] == ["--"] else rest)
    parser = argparse.ArgumentParser(prog="python -m qbackup_sim",
                                     description="Simulated Qubes dom0 for qbackup.")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a sim directory",
                            description="Create a sim: inventory, sparse volume images, "
                            "storage. Without sizes, TemplateVMs and StandaloneVMs get "
                            "root=16M,private=8M, other qubes private=8M; AppVMs and "
                            "DispVMs use the first TemplateVM given as their template; "
                            "templates are labelled black, other qubes red.")
    create.add_argument("dir")
    create.add_argument("--qube", type=_qube_spec, action="append", default=[],
                        metavar="NAME:CLASS[:VOL=SIZE,...]", help="add a qube (repeatable)")
    create.add_argument("--backup-vm", default="backup",
                        help="name of the backup qube (added as an AppVM; default backup)")
    create.add_argument("--pool-dir", metavar="PATH",
                        help="put the qubes' volumes in a Qubes file-reflink pool at PATH "
                        "(a directory on btrfs or xfs for reflinks), laid out as qubesd does: "
                        "PATH/appvms/NAME/VOL.img, PATH/vm-templates/NAME/VOL.img; qbackup "
                        "then takes reflink copies and tracks changes (default: plain image "
                        "files in DIR/volumes/, read in full)")
    create.set_defaults(func=_create)
    sub.add_parser("run", help="run qbackup against a sim: run DIR [--] QBACKUP-ARGS...",
                   description="Run the qbackup command line against the sim in DIR, "
                   "with the sim's backup qube and DIR/dom0-state as defaults.")
    for name, func, text in (("start", _start, "start the daemon unless it runs"),
                             ("stop", _stop, "stop the daemon and wait for it to exit"),
                             ("status", _status, "show qubes and daemon state (exit 3: not running)")):
        command = sub.add_parser(name, help=text, description=text)
        command.add_argument("dir")
        command.set_defaults(func=func)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (SimError, OSError) as e:
        print(f"qbackup_sim: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
