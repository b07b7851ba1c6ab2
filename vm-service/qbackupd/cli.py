# SPDX-License-Identifier: GPL-2.0-or-later
"""Command line of the backup-qube daemon: `qbackupd serve|reindex|check`.

Errors are printed as one line on stderr with exit status 2; `check` exits
with status 1 when it finds problems.
"""

from __future__ import annotations

import argparse
import logging
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
        description="Listen on a Unix socket (mode 0660; a stale socket is replaced) and serve "
        "qbackup clients until SIGTERM/SIGINT, which seal open packs and release locks. "
        "Point /etc/qubes-rpc/qubes.BackupChunk at the socket.",
    )
    serve.add_argument("--socket", required=True, type=Path, metavar="PATH", help="Unix socket to listen on")
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if not args.storage.is_dir():
            raise StorageError(f"storage directory {args.storage} does not exist")
        if args.command == "serve":
            logging.basicConfig(
                level=args.log_level.upper(), format="qbackupd[%(process)d] %(levelname)s %(message)s"
            )
            run(Storage(args.storage), args.socket)
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
