# SPDX-License-Identifier: GPL-2.0-or-later
"""Command line of the backup-qube daemon: `qbackupd serve|reindex|check`.

Errors are printed as one line on stderr with exit status 2; `check` exits
with status 1 when it finds problems.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
from pathlib import Path

from .frames import valid_repo_name
from .server import ServerError, run
from .storage import Storage, StorageError

EXIT_PROBLEMS = 1
EXIT_ERROR = 2


def _repo_name(text: str) -> str:
    if not valid_repo_name(text):
        raise argparse.ArgumentTypeError(f"invalid repository name {text!r}")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qbackupd",
        description="qbackup storage daemon for the backup qube: serves the qrexec socket "
        "service qubes.BackupChunk and maintains the repositories it stores.",
        epilog="Exit status: 0 success, 1 `check` found problems, 2 error (one line on stderr).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve the qubes.BackupChunk socket in the foreground",
        description="Serve qbackup clients on a Unix socket until SIGTERM/SIGINT, which seal open "
        "packs and release locks. Only root (qrexec-agent) and the daemon's own user may connect. "
        "Point /etc/qubes-rpc/qubes.BackupChunk at the socket.",
    )
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="bind and listen on PATH (mode 0660; a stale socket is replaced, removed at exit)",
    )
    where.add_argument(
        "--systemd-socket",
        action="store_true",
        help="use the listening socket passed by systemd socket activation (qbackupd.socket)",
    )
    serve.add_argument("--storage", required=True, type=Path, metavar="DIR", help="directory of repositories")
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="stderr logging threshold (default: info, one line per connection)",
    )

    for name, text in (
        ("reindex", "rebuild a repository's index from its pack trailers (needs no keys)"),
        ("check", "check a repository's packs, index and snapshot references; exit 1 on problems"),
    ):
        sub = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        sub.add_argument("--storage", required=True, type=Path, metavar="DIR", help="directory of repositories")
        sub.add_argument("repo", type=_repo_name, metavar="REPO", help="repository name")
    return parser


def _check_storage_dir(path: Path, serving: bool) -> None:
    """The storage directory exists, belongs to us and (to serve) is writable.

    Run as another user (root, typically), maintenance commands would leave
    files the daemon cannot write."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise StorageError(f"storage directory {path} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"storage directory {path} is not a directory")
    euid = os.geteuid()
    if st.st_uid != euid:
        raise StorageError(
            f"storage directory {path} belongs to uid {st.st_uid}, not to this process (uid {euid}): "
            "run qbackupd as the directory's owner (in the backup qube: sudo -u qbackupd qbackupd ...)"
        )
    if serving and not os.access(path, os.W_OK):
        raise StorageError(
            f"storage directory {path} is not writable (read-only file system? under systemd it must be "
            "in the unit's ReadWritePaths=)"
        )


def _stderr_is_journal() -> bool:
    """Whether stderr is systemd's journal stream, which adds name and pid itself."""
    try:
        dev, ino = (int(part) for part in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_storage_dir(args.storage, args.command == "serve")
        if args.command == "serve":
            prefix = "" if _stderr_is_journal() else "qbackupd[%(process)d] "
            logging.basicConfig(level=args.log_level.upper(), format=prefix + "%(levelname)s %(message)s")
            run(Storage(args.storage), None if args.systemd_socket else args.socket)
            return 0
        storage = Storage(args.storage)
        if args.command == "reindex":
            summary = storage.reindex(args.repo)
            print(" ".join(f"{key}={value}" for key, value in summary.items()))
            return 0
        problems = storage.check(args.repo)
        for problem in problems:
            print(problem)
        if problems:
            print(f"qbackupd: {len(problems)} problem(s) found in {args.repo}", file=sys.stderr)
            return EXIT_PROBLEMS
        print(f"{args.repo}: ok")
        return 0
    except (ServerError, StorageError, OSError) as exc:
        print(f"qbackupd: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
