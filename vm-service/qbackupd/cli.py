# SPDX-License-Identifier: GPL-2.0-or-later
"""Command line of the backup-qube daemon: `qbackupd serve|reindex|check|gc`
(`gc --all`: every repository, what the scheduled qbackupd-gc.service runs).

Errors are printed as one line on stderr with exit status 2; `check` exits
with status 1 when it finds problems.  `gc` stopped by SIGINT or SIGTERM
exits with status 130 and resumes where it was when run again.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import stat
import sys
import threading
from pathlib import Path

from .check import check_repository
from .frames import valid_repo_name
from .gc import DEFAULT_REPACK_BELOW, collect_garbage
from .monitor import Cancelled
from .server import ServerError, run
from .storage import Locked, Storage, StorageError

EXIT_PROBLEMS = 1
EXIT_ERROR = 2
EXIT_STOPPED = 130
MAX_LISTED = 64  # ids printed per list


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

    subs = {}
    for name, text in (
        ("reindex", "rebuild a repository's index from its pack trailers (needs no keys)"),
        ("check", "check a repository's packs, index and snapshot references; exit 1 on problems"),
        ("gc", "free the space of blobs no snapshot reaches (needs no keys; resumable; safe beside backups)"),
    ):
        sub = subs[name] = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        sub.add_argument("--storage", required=True, type=Path, metavar="DIR", help="directory of repositories")
        if name != "gc":
            sub.add_argument("repo", type=_repo_name, metavar="REPO", help="repository name")
    which = subs["gc"].add_mutually_exclusive_group(required=True)
    which.add_argument("repo", nargs="?", type=_repo_name, metavar="REPO", help="repository name")
    which.add_argument(
        "--all",
        action="store_true",
        help="every repository of the storage directory, one after the other (what qbackupd-gc.timer "
        "runs); one being collected by another process is skipped",
    )
    subs["check"].add_argument(
        "--read-data",
        action="store_true",
        help="also read every byte of every pack (each record's CRC-32, each pack's SHA-256); "
        "without it only footers, trailers, index and references are checked",
    )
    subs["gc"].add_argument(
        "--repack-below",
        type=int,
        default=DEFAULT_REPACK_BELOW,
        choices=range(101),
        metavar="PERCENT",
        help="repack a pack whose live blobs make less than PERCENT of its bytes "
        f"(default {DEFAULT_REPACK_BELOW}; 0: only delete packs holding no live blob)",
    )
    subs["gc"].add_argument("--dry-run", action="store_true", help="say what would be freed, change nothing")
    for name in ("reindex", "check", "gc"):
        subs[name].add_argument(
            "--log-level", default="warning", choices=["debug", "info", "warning", "error"],
            help="stderr logging threshold (default: warning)",
        )  # fmt: skip
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


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _gc_all(storage: Storage, repack_below: int, dry_run: bool) -> int:
    """Collect every repository; one error line per failed one (exit 2 if any
    failed), a repository another collection holds is skipped."""
    status = 0
    for repo in storage.names():
        try:
            status = _gc(storage, repo, repack_below, dry_run) or status
        except Locked as exc:
            print(f"{repo}: skipped: {exc}")
        except StorageError as exc:
            print(f"qbackupd: error: gc of {repo}: {exc}", file=sys.stderr)
            status = EXIT_ERROR
        if status == EXIT_STOPPED:
            break
    return status


def _gc(storage: Storage, repo: str, repack_below: int, dry_run: bool) -> int:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        summary = collect_garbage(
            storage,
            repo,
            repack_below=repack_below,
            dry_run=dry_run,
            progress=_progress_printer("gc"),
            stop=stop.is_set,
        )
    except Cancelled as exc:
        print(f"qbackupd: gc of {repo} {exc}", file=sys.stderr)
        return EXIT_STOPPED
    would = "would be " if summary.dry_run else ""
    print(
        f"{repo}: {summary.snapshots} snapshots reach {summary.live_blobs} blobs; "
        f"{summary.packs_deleted} packs {would}deleted, {summary.packs_repacked} {would}repacked "
        f"into {summary.packs_written} ({human_bytes(summary.bytes_copied)} copied); "
        f"{human_bytes(summary.bytes_freed)} {would}freed"
    )
    for note in summary.notes:
        print(note)
    return 0


def _check(storage: Storage, repo: str, read_data: bool) -> int:
    report = check_repository(storage, repo, read_data=read_data, progress=_progress_printer("check"))
    for problem in report.problems:
        print(problem)
    if report.damaged_total:
        print(f"damaged or missing blobs: {report.damaged_total}")
        for id in sorted(report.damaged)[:MAX_LISTED]:
            print(f"  blob {id.hex()}")
    for id in report.bad_snapshots:
        print(f"snapshot {id.hex()}: its file is damaged")
    if not report.complete:
        print("the damage is too wide (or the index unusable) to tell exactly which snapshots it reaches")
    for id, roots in report.affected:
        via = f" via refs {', '.join(r.hex() for r in roots[:MAX_LISTED])}" if roots else ""
        print(f"snapshot {id.hex()} reaches damaged blobs{via}")
    if report.problems:
        print(f"qbackupd: {len(report.problems)} problem(s) found in {repo}", file=sys.stderr)
        return EXIT_PROBLEMS
    print(f"{repo}: ok" + (" (every byte read)" if read_data else ""))
    return 0


def _progress_printer(command: str):
    """Progress lines on stderr when it is a terminal, else nothing."""
    if not sys.stderr.isatty():
        return None

    def show(phase: str, done: int, total: int) -> None:
        of = f"/{total}" if total else ""
        print(f"qbackupd {command}: {phase} {done}{of}", file=sys.stderr)

    return show


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_storage_dir(args.storage, args.command in ("serve", "gc"))
        if args.command == "serve":
            prefix = "" if _stderr_is_journal() else "qbackupd[%(process)d] "
            logging.basicConfig(level=args.log_level.upper(), format=prefix + "%(levelname)s %(message)s")
            run(Storage(args.storage), None if args.systemd_socket else args.socket)
            return 0
        logging.basicConfig(level=args.log_level.upper(), format="qbackupd[%(process)d] %(levelname)s %(message)s")
        storage = Storage(args.storage)
        if args.command == "gc" and args.all:
            return _gc_all(storage, args.repack_below, args.dry_run)
        if args.command == "gc":
            return _gc(storage, args.repo, args.repack_below, args.dry_run)
        if args.command == "reindex":
            summary = storage.reindex(args.repo)
            print(" ".join(f"{key}={value}" for key, value in summary.items()))
            return 0
        return _check(storage, args.repo, args.read_data)
    except (ServerError, StorageError, OSError) as exc:
        print(f"qbackupd: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"qbackupd: {args.command} interrupted", file=sys.stderr)
        return EXIT_STOPPED
