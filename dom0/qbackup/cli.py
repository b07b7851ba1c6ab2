# SPDX-License-Identifier: GPL-2.0-or-later
"""`qbackup`: the dom0 command line.

Parses options, resolves the backup qube, repository and state directory,
asks for the passphrase, opens one session with the backup qube per command
and hands the work to the engine (qbackup.backup / qbackup.restore). Output:
a human summary on stdout, or one JSON object with --json; progress on
stderr when it is a terminal; every error as one line on stderr with a
documented exit code (docs/CLI.md).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

from qbackup import crypto, restore as restore_mod
from qbackup.backup import VolumeSource, backup
from qbackup.errors import BadPassphrase, IntegrityError, QbackupError, RollbackError
from qbackup.progress import Progress, human_bytes
from qbackup.proto import Session
from qbackup.qubes import Backend, QubeInfo, get_backend, volumes_to_backup
from qbackup.state import State
from qbackup.transport import QUBE_NAME_RE, REPO_NAME_RE
from qbackup.volume import volume_size

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTEGRITY = 3
EXIT_ROLLBACK = 4
EXIT_PASSPHRASE = 5
EXIT_INTERRUPTED = 130

CONFIG_FILE = "/etc/qbackup/qbackup.conf"
CONFIG_KEYS = ("backup_vm", "repo", "state_dir")
DEFAULT_STATE_DIR = "/var/lib/qbackup"
DEFAULT_REPO = "default"
DEFAULT_CHUNK_SIZE = 256 << 10
DEFAULT_PACK_SIZE = 64 << 20
# How long to wait for another writer (e.g. the connection of a run just
# interrupted, finishing what it had received) before giving up.
LOCK_WAIT = 15.0
PACK_SIZE_RANGE = (8 << 20, 512 << 20)   # PROTOCOL.md, init
# The largest scrypt cost crypto accepts with its r and p (work and memory bounds).
MAX_SCRYPT_N = min(crypto.MAX_SCRYPT_N,
                   crypto.MAX_SCRYPT_WORK // (crypto.SCRYPT_R * crypto.SCRYPT_P),
                   crypto.MAX_SCRYPT_MEM // (128 * crypto.SCRYPT_R))

_SIZE = re.compile(r"([0-9]+)([KMG]?)", re.IGNORECASE)


class UsageError(QbackupError):
    """The command line asks for something impossible (exit 2)."""


# Most specific first: the first match decides the exit code.
_EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (UsageError, EXIT_USAGE),
    (BadPassphrase, EXIT_PASSPHRASE),
    (RollbackError, EXIT_ROLLBACK),
    (IntegrityError, EXIT_INTEGRITY),
    (QbackupError, EXIT_ERROR),
    (OSError, EXIT_ERROR),
]


def parse_size(text: str) -> int:
    """`256K`, `64M`, `1G` or a plain number of bytes (binary units)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"invalid size {text!r} (examples: 4096, 256K, 64M, 1G)")
    return int(match[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[match[2].upper()]


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _clean(text: str, limit: int = 500) -> str:
    """One printable line: control characters escaped, length bounded."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, sort_keys=True))


# -- configuration --------------------------------------------------------

def read_config(path: str) -> dict[str, str]:
    """The key=value settings of `path` (# comments), {} if it does not exist."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return {}
    config = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in CONFIG_KEYS:
            raise QbackupError(f"{path}:{number}: expected one of "
                               f"{', '.join(CONFIG_KEYS)} = VALUE")
        config[key] = value
    return config


@dataclass
class Context:
    """What every command needs: where to connect and where dom0's state is."""
    backend: Backend
    backup_vm: str
    repo: str
    state_dir: str
    verbose: bool

    def state(self) -> State:
        return State(self.state_dir)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """One qrexec call to the backup qube; `bye` at the end, or the
        connection closed on any error."""
        transport = self.backend.connect(self.backup_vm, self.repo)
        try:
            session = Session(transport)
            yield session
        except BaseException:
            transport.abort()
            transport.close()
            raise
        session.close()


def make_context(args: argparse.Namespace) -> Context:
    sim = getattr(args, "sim", None)
    backend = get_backend(sim)
    config = {} if sim else read_config(CONFIG_FILE)
    backup_vm = (getattr(args, "backup_vm", None) or config.get("backup_vm")
                 or (backend.backup_vm if sim else None))
    if not backup_vm:
        raise UsageError(f"no backup qube: give --backup-vm or set backup_vm in {CONFIG_FILE}")
    if not QUBE_NAME_RE.fullmatch(backup_vm):
        raise UsageError(f"invalid backup qube name {_clean(backup_vm)!r}")
    repo = getattr(args, "repo", None) or config.get("repo") or DEFAULT_REPO
    if not REPO_NAME_RE.fullmatch(repo) or ".." in repo:
        raise UsageError(f"invalid repository name {_clean(repo)!r} "
                         "(letters, digits, '_.-', at most 64, not starting with '.-_')")
    state_dir = (getattr(args, "state_dir", None) or config.get("state_dir")
                 or (os.path.join(sim, "dom0-state") if sim else DEFAULT_STATE_DIR))
    return Context(backend, backup_vm, repo, state_dir, getattr(args, "verbose", False))


# -- passphrases ----------------------------------------------------------

def read_passphrase(path: str | None, prompt: str, *, confirm: bool = False) -> bytes:
    """The passphrase from `path` (one trailing newline dropped) or asked on
    the terminal without echo (twice if `confirm`). Empty is refused."""
    if path is not None:
        data = Path(path).read_bytes()
        data = data[:-2] if data.endswith(b"\r\n") else data.removesuffix(b"\n")
        if not data:
            raise QbackupError(f"empty passphrase in {path}")
        return data
    if not sys.stdin.isatty():
        raise UsageError("no terminal to ask for the passphrase: use --passphrase-file")
    first = getpass.getpass(prompt).encode()
    if not first:
        raise QbackupError("empty passphrase refused")
    if confirm and getpass.getpass("Repeat: ").encode() != first:
        raise QbackupError("the passphrases do not match")
    return first


def _passphrase(args: argparse.Namespace) -> bytes:
    """The repository passphrase (asked before connecting to the backup qube)."""
    return read_passphrase(getattr(args, "passphrase_file", None), "Passphrase: ")


def _unlock(session: Session, passphrase: bytes, write: bool) -> crypto.Keys:
    """Open the repository and unwrap its keys."""
    untrusted_config, _ = session.open(write=write, lock_wait=LOCK_WAIT)
    return crypto.unwrap_keys(untrusted_config, passphrase)


# -- commands -------------------------------------------------------------

def _check_scrypt_n(n: int) -> None:
    if not _power_of_two(n) or not crypto.MIN_SCRYPT_N <= n <= MAX_SCRYPT_N:
        raise UsageError(f"--scrypt-n must be a power of two from {crypto.MIN_SCRYPT_N} "
                         f"to {MAX_SCRYPT_N}")


def cmd_init(ctx: Context, args: argparse.Namespace) -> int:
    if not _power_of_two(args.chunk_size) or not (
            crypto.MIN_CHUNK_SIZE <= args.chunk_size <= crypto.MAX_CHUNK_SIZE):
        raise UsageError(f"--chunk-size must be a power of two from "
                         f"{human_bytes(crypto.MIN_CHUNK_SIZE)} to "
                         f"{human_bytes(crypto.MAX_CHUNK_SIZE)}")
    if not PACK_SIZE_RANGE[0] <= args.pack_size <= PACK_SIZE_RANGE[1]:
        raise UsageError("--pack-size must be from 8M to 512M")
    _check_scrypt_n(args.scrypt_n)
    passphrase = read_passphrase(getattr(args, "passphrase_file", None),
                                 "New passphrase: ", confirm=True)
    keys = crypto.create_keys(args.chunk_size)
    config = crypto.wrap_keys(keys, passphrase, scrypt_n=args.scrypt_n)
    with ctx.session() as session:
        session.init(config, args.pack_size)
    print(f"initialised repository {ctx.repo} in {ctx.backup_vm} (chunk size "
          f"{human_bytes(args.chunk_size)}, pack size {human_bytes(args.pack_size)})")
    print("keep the passphrase safe: without it the backups cannot be read")
    return EXIT_OK


def _select_qubes(args: argparse.Namespace, qubes: list[QubeInfo],
                  backup_vm: str) -> list[QubeInfo]:
    """The qubes named, or with --all every qube but the backup qube (whose
    private volume holds the repository); minus --exclude."""
    by_name = {q.name: q for q in qubes}
    unknown = sorted(set(args.qubes + args.exclude) - set(by_name))
    if unknown:
        raise UsageError(f"no such qube: {', '.join(_clean(n) for n in unknown)}")
    if args.all == bool(args.qubes):
        raise UsageError("name the qubes to back up, or give --all (not both)")
    names = set(by_name) - {backup_vm} if args.all else set(args.qubes)
    return [by_name[n] for n in sorted(names - set(args.exclude))]


def _sources(qubes: list[QubeInfo]) -> list[VolumeSource]:
    sources = []
    for qube in qubes:
        for vol in volumes_to_backup(qube):
            if vol.path is None:
                raise QbackupError(f"{qube.name}: volume {vol.name} is in pool {vol.pool}, "
                                   "whose driver qbackup cannot read")
            sources.append(VolumeSource(qube=qube.name, volume=vol.name, path=vol.path,
                                        size=volume_size(vol.path), settings=vol.settings()))
    return sources


def cmd_backup(ctx: Context, args: argparse.Namespace) -> int:
    qubes = _select_qubes(args, ctx.backend.list_qubes(), ctx.backup_vm)
    if not qubes:
        raise UsageError("nothing to back up: every qube is excluded")
    sources = _sources(qubes)
    if ctx.verbose:
        for s in sources:
            print(f"qbackup: {s.qube}/{s.volume}: {s.path} ({human_bytes(s.size)})",
                  file=sys.stderr)
    passphrase, state = _passphrase(args), ctx.state()
    with ctx.session() as session:
        keys = _unlock(session, passphrase, write=True)
        history = restore_mod.load_history(session, keys, state,
                                           allow_rollback=args.allow_rollback)
        with Progress(sum(s.size for s in sources), "backup") as progress:
            stats = backup(session, keys, sources, {q.name: q.settings() for q in qubes},
                           state=state, progress=progress,
                           predecessor=history[-1].id if history else None)
    if args.json:
        _print_json({"snapshot": stats.snapshot_id.hex(), "qubes": [q.name for q in qubes],
                     "volumes": stats.volumes, "bytes_total": stats.bytes_total,
                     "bytes_read": stats.bytes_read, "bytes_sent": stats.bytes_sent,
                     "chunks_total": stats.chunks_total, "chunks_zero": stats.chunks_zero,
                     "chunks_new": stats.chunks_new, "chunks_dedup": stats.chunks_dedup,
                     "seconds": stats.seconds})
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


def _history(ctx: Context, args: argparse.Namespace, session: Session, passphrase: bytes,
             write: bool = False) -> tuple[crypto.Keys, list[restore_mod.SnapshotInfo]]:
    keys = _unlock(session, passphrase, write=write)
    return keys, restore_mod.load_history(session, keys, ctx.state(),
                                          allow_rollback=args.allow_rollback)


def _resolve(history: list[restore_mod.SnapshotInfo], spec: str) -> restore_mod.SnapshotInfo:
    if not history:
        raise QbackupError("the repository holds no snapshots")
    return restore_mod.resolve_snapshot(history, spec)


def _snapshot_json(snap: restore_mod.SnapshotInfo) -> dict[str, Any]:
    return {"id": snap.id.hex(), "time": snap.time, "host": snap.host,
            "predecessor": snap.predecessor.hex() if snap.predecessor else None,
            "qubes": sorted(snap.qubes), "bytes_total": snap.bytes_total}


def _local_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def cmd_list(ctx: Context, args: argparse.Namespace) -> int:
    passphrase = _passphrase(args)
    with ctx.session() as session:
        _, history = _history(ctx, args, session, passphrase)
    if args.json:
        _print_json({"snapshots": [_snapshot_json(s) for s in history]})
        return EXIT_OK
    if not history:
        print("no snapshots")
        return EXIT_OK
    print(f"{'ID':16}  {'TIME':19}  {'SIZE':>10}  QUBES")
    for snap in history:
        print(f"{snap.id.hex()[:16]}  {_local_time(snap.time)}  "
              f"{human_bytes(snap.bytes_total):>10}  {', '.join(sorted(snap.qubes))}")
    return EXIT_OK


def _check_json(snap: restore_mod.SnapshotInfo, result: restore_mod.CheckResult) -> dict:
    return {"snapshot": snap.id.hex(), "ok": result.ok, "errors": result.errors,
            "chunks": result.chunks, "bytes": result.bytes}


def _report_check(snap: restore_mod.SnapshotInfo, result: restore_mod.CheckResult,
                  verb: str) -> None:
    status = "OK" if result.ok else f"FAILED ({len(result.errors)} errors)"
    print(f"snapshot {snap.id.hex()[:16]}: {verb} {status}: {result.chunks} chunks, "
          f"{human_bytes(result.bytes)}")
    for error in result.errors:
        print(f"  {_clean(error)}")


def cmd_verify(ctx: Context, args: argparse.Namespace) -> int:
    if args.all and args.snapshot:
        raise UsageError("give a snapshot or --all, not both")
    passphrase = _passphrase(args)
    with ctx.session() as session:
        keys, history = _history(ctx, args, session, passphrase)
        snapshots = history if args.all else [_resolve(history, args.snapshot or "latest")]
        results = []
        for snap in snapshots:
            with Progress(snap.bytes_total, f"verify {snap.id.hex()[:16]}") as progress:
                results.append((snap, restore_mod.verify(session, keys, snap,
                                                         progress=progress)))
    if args.json:
        _print_json({"ok": all(r.ok for _, r in results),
                     "results": [_check_json(s, r) for s, r in results]})
    else:
        if not results:
            print("no snapshots")
        for snap, result in results:
            _report_check(snap, result, "verify")
    return EXIT_OK if all(r.ok for _, r in results) else EXIT_INTEGRITY


def _volume_target(text: str) -> tuple[tuple[str, str], str]:
    qube_vol, sep, path = text.partition("=")
    qube, colon, vol = qube_vol.partition(":")
    if not (sep and colon and qube and vol and path):
        raise argparse.ArgumentTypeError(f"{text!r}: expected QUBE:VOLUME=PATH")
    return (qube, vol), path


def _snapshot_volumes(snap: restore_mod.SnapshotInfo) -> list[tuple[str, str]]:
    return sorted((qube, vol) for qube, settings in snap.qubes.items()
                  for vol in settings["volumes"])


def _restore_targets(args: argparse.Namespace,
                     snap: restore_mod.SnapshotInfo) -> dict[tuple[str, str], str]:
    available = _snapshot_volumes(snap)
    if args.volume_target:
        if args.qube:
            raise UsageError("--qube goes with --to, not with --volume-target")
        targets = dict(args.volume_target)
        missing = sorted(set(targets) - set(available))
        if missing:
            raise UsageError("not in this snapshot: "
                             + ", ".join(f"{q}:{v}" for q, v in missing))
        return targets
    qubes = set(args.qube) if args.qube else {q for q, _ in available}
    unknown = sorted(qubes - {q for q, _ in available})
    if unknown:
        raise UsageError(f"qube not in this snapshot: {', '.join(_clean(q) for q in unknown)}")
    # Names from an authenticated manifest: manifest.decode allows no "/"
    # and no leading "." in them, so they are safe path components.
    return {(qube, vol): os.path.join(args.to, qube, vol + ".img")
            for qube, vol in available if qube in qubes}


def cmd_restore(ctx: Context, args: argparse.Namespace) -> int:
    passphrase = _passphrase(args)
    with ctx.session() as session:
        keys, history = _history(ctx, args, session, passphrase)
        snap = _resolve(history, args.snapshot)
        targets = _restore_targets(args, snap)
        existing = sorted(p for p in targets.values() if os.path.lexists(p))
        if existing and not args.force:  # checked before creating any directory
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise QbackupError(f"{existing[0]} exists{more}: refusing to overwrite "
                               "without --force")
        if args.to:
            for path in targets.values():
                os.makedirs(os.path.dirname(path), exist_ok=True)
        total = sum(snap.qubes[q]["volumes"][v]["size"] for q, v in targets)
        with Progress(total, f"restore {snap.id.hex()[:16]}") as progress:
            result = restore_mod.restore(session, keys, snap, targets, force=args.force,
                                         progress=progress)
    _report_check(snap, result, "restore")
    if result.ok:
        for (qube, vol), path in sorted(targets.items()):
            print(f"  {qube}/{vol} -> {path}")
    return EXIT_OK if result.ok else EXIT_INTEGRITY


def cmd_delete(ctx: Context, args: argparse.Namespace) -> int:
    passphrase = _passphrase(args)
    with ctx.session() as session:
        keys, history = _history(ctx, args, session, passphrase, write=True)
        snap = _resolve(history, args.snapshot)
        restore_mod.delete_snapshot(session, keys, ctx.state(), snap, history)
    print(f"deleted snapshot {snap.id.hex()}")
    return EXIT_OK


def cmd_stats(ctx: Context, args: argparse.Namespace) -> int:
    with ctx.session() as session:
        session.open(write=False)
        untrusted_stats = session.stats()
    if args.json:
        _print_json(untrusted_stats)
        return EXIT_OK
    print(f"repository {ctx.repo} in {ctx.backup_vm} (as reported by the backup qube):")
    for key, value in sorted(untrusted_stats.items()):
        shown = human_bytes(value) if "bytes" in key else value
        print(f"  {_clean(str(key))}: {_clean(str(shown))}")
    return EXIT_OK


def cmd_change_passphrase(ctx: Context, args: argparse.Namespace) -> int:
    _check_scrypt_n(args.scrypt_n)
    old = read_passphrase(getattr(args, "passphrase_file", None), "Current passphrase: ")
    new = read_passphrase(args.new_passphrase_file, "New passphrase: ", confirm=True)
    with ctx.session() as session:
        untrusted_config, _ = session.open(write=True, lock_wait=LOCK_WAIT)
        keys = crypto.unwrap_keys(untrusted_config, old)
        session.set_config(crypto.wrap_keys(keys, new, scrypt_n=args.scrypt_n),
                           expect=untrusted_config)
    print(f"passphrase of repository {ctx.repo} changed (data untouched)")
    return EXIT_OK


# -- argument parsing -----------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and the documented usage exit code."""

    def error(self, message: str) -> NoReturn:
        print(f"qbackup: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _add_global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options accepted before and after the command name."""
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value
    group = parser.add_argument_group("global options")
    group.add_argument("--sim", metavar="DIR", default=default(None),
                       help="run against the simulated dom0 in DIR (development, tests)")
    group.add_argument("--backup-vm", metavar="VM", default=default(None),
                       help=f"the backup qube (default: backup_vm in {CONFIG_FILE}; "
                       "with --sim, the sim's backup qube)")
    group.add_argument("--repo", metavar="NAME", default=default(None),
                       help=f"repository name in the backup qube (default: repo in "
                       f"{CONFIG_FILE}, else {DEFAULT_REPO})")
    group.add_argument("--state-dir", metavar="DIR", default=default(None),
                       help=f"dom0's record of seen history (default {DEFAULT_STATE_DIR}; "
                       "with --sim, DIR/dom0-state)")
    group.add_argument("--passphrase-file", metavar="FILE", default=default(None),
                       help="read the passphrase from FILE (one trailing newline "
                       "ignored) instead of asking on the terminal")
    group.add_argument("-v", "--verbose", action="store_true", default=default(False),
                       help="say more (volumes read; traceback of internal errors)")


def _add_command(sub: Any, name: str, func: Callable[[Context, argparse.Namespace], int],
                 help: str, description: str,
                 rollback: bool = False) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=description)
    _add_global_options(parser, suppress=True)
    if rollback:
        parser.add_argument("--allow-rollback", action="store_true",
                            help="proceed even if the repository serves an older or "
                            "different history than dom0 has seen (after a restore of "
                            "the backup qube, say); dom0 then accepts that history")
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qbackup", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Incremental, deduplicating, encrypted backups of Qubes OS qubes.\n"
        "dom0 reads the volumes and settings of qubes, encrypts them, and stores\n"
        "them through the backup qube, which never sees a key.",
        epilog="exit codes:\n  0 ok\n  1 error\n  2 usage error\n"
        "  3 integrity or verification failure\n  4 rollback refused\n"
        "  5 wrong passphrase\n  130 interrupted\n\n"
        "Global options may also follow the command. See docs/CLI.md.")
    _add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _add_command(sub, "init", cmd_init, "create a repository",
                     "Create a new repository in the backup qube: generate keys, wrap "
                     "them with a passphrase (asked twice) and store the wrapped key "
                     "in the repository.")
    p.add_argument("--chunk-size", type=_size_arg, default=DEFAULT_CHUNK_SIZE, metavar="SIZE",
                   help="fixed chunk size, a power of two from 64K to 4M (default 256K); "
                   "cannot change later")
    p.add_argument("--pack-size", type=_size_arg, default=DEFAULT_PACK_SIZE, metavar="SIZE",
                   help="target size of the backup qube's pack files, 8M to 512M (default 64M)")
    p.add_argument("--scrypt-n", type=int, default=crypto.SCRYPT_N, metavar="N",
                   help=f"scrypt cost of the passphrase, a power of two from {crypto.MIN_SCRYPT_N} "
                   f"to {MAX_SCRYPT_N} (default {crypto.SCRYPT_N})")

    p = _add_command(sub, "backup", cmd_backup, "back up qubes",
                     "Back up the listed qubes (or --all: every qube but the backup qube): "
                     "their settings, the private volume of each, and the root volume of "
                     "templates and standalone qubes. Only chunks the repository lacks "
                     "are sent; an interrupted backup resumes when run again.", rollback=True)
    p.add_argument("qubes", nargs="*", metavar="QUBE", help="qubes to back up")
    p.add_argument("--all", action="store_true",
                   help="back up every qube except the backup qube")
    p.add_argument("--exclude", action="append", default=[], metavar="QUBE",
                   help="leave this qube out (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = _add_command(sub, "list", cmd_list, "list snapshots",
                     "List the repository's snapshots, oldest first, after checking "
                     "each is authentic and the history is not rolled back.", rollback=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = _add_command(sub, "verify", cmd_verify, "verify snapshots",
                     "Read back every chunk of a snapshot (default: the latest) through "
                     "dom0, authenticate and decrypt it, without writing anything. "
                     "Exit 3 if anything is missing or forged.", rollback=True)
    p.add_argument("snapshot", nargs="?", metavar="SNAPSHOT",
                   help="snapshot id, unique prefix (8+ hex digits) or 'latest'")
    p.add_argument("--all", action="store_true", help="verify every snapshot")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = _add_command(sub, "restore", cmd_restore, "restore volumes to files or devices",
                     "Restore the volumes of a snapshot, streaming from the backup qube "
                     "and authenticating everything before writing. Existing targets "
                     "are never overwritten without --force.", rollback=True)
    p.add_argument("snapshot", metavar="SNAPSHOT",
                   help="snapshot id, unique prefix (8+ hex digits) or 'latest'")
    p.add_argument("--qube", action="append", default=[], metavar="QUBE",
                   help="with --to: restore only this qube (repeatable)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", metavar="DIR", help="write DIR/QUBE/VOLUME.img")
    where.add_argument("--volume-target", type=_volume_target, action="append",
                       metavar="QUBE:VOLUME=PATH",
                       help="write that volume to PATH, a file or device (repeatable)")
    p.add_argument("--force", action="store_true", help="overwrite existing targets")

    p = _add_command(sub, "delete", cmd_delete, "delete a snapshot",
                     "Delete one snapshot. Data shared with other snapshots stays.",
                     rollback=True)
    p.add_argument("snapshot", metavar="SNAPSHOT",
                   help="snapshot id, unique prefix (8+ hex digits) or 'latest'")

    p = _add_command(sub, "stats", cmd_stats, "show repository statistics",
                     "Show the repository's size as reported by the backup qube "
                     "(untrusted figures; no passphrase needed).")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    key = sub.add_parser("key", help="manage the repository key",
                         description="Manage the repository's passphrase-wrapped key.")
    key_sub = key.add_subparsers(dest="key_command", required=True, metavar="COMMAND")
    p = _add_command(key_sub, "change-passphrase", cmd_change_passphrase,
                     "change the passphrase",
                     "Re-wrap the repository key with a new passphrase (asked twice "
                     "unless --new-passphrase-file). The data is not touched; the old "
                     "passphrase stops working.")
    p.add_argument("--new-passphrase-file", metavar="FILE",
                   help="read the new passphrase from FILE")
    p.add_argument("--scrypt-n", type=int, default=crypto.SCRYPT_N, metavar="N",
                   help=f"scrypt cost for the new wrapping, a power of two from {crypto.MIN_SCRYPT_N} "
                   f"to {MAX_SCRYPT_N} (default {crypto.SCRYPT_N})")
    return parser


def _exit_code(error: BaseException) -> int:
    return next(code for kind, code in _EXIT_CODES if isinstance(error, kind))


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return str(error) or type(error).__name__


def run(argv: list[str] | None = None) -> int:
    """Run one command; the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(make_context(args), args)
    except KeyboardInterrupt:
        newline = "\n" if sys.stderr.isatty() else ""  # after the terminal's ^C
        print(f"{newline}qbackup: error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (QbackupError, OSError) as e:
        print(f"qbackup: error: {_clean(_describe(e))}", file=sys.stderr)
        return _exit_code(e)
    except Exception as e:  # a bug: say so in one line, details with -v
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"qbackup: error: internal error: {type(e).__name__}: {_clean(str(e))}"
              " (run with -v for details)", file=sys.stderr)
        return EXIT_ERROR


def main() -> NoReturn:
    sys.exit(run())
