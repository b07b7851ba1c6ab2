# SPDX-License-Identifier: GPL-2.0-or-later
"""`qbackup`: the dom0 command line.

This module only parses: it builds the argument parser, resolves the
context (backend, backup qube, repository, state directory) and hands the
parsed arguments to a command body in `qbackup.commands`. Output: a human
summary on stdout, or one JSON object with --json; progress on stderr when
it is a terminal; every error as one line on stderr with a documented exit
code (docs/CLI.md).

The backend is the real Qubes one (`QubesAdminBackend`) unless the caller
of `run` hands in another: the simulated dom0 does that from outside this
package (`python -m qbackup_sim run DIR ...`), so the shipped client does
not know that a simulation exists.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Callable, NoReturn

from qbackup import crypto
from qbackup.commands.common import (CONFIG_FILE, DEFAULT_REPO, DEFAULT_STATE_DIR,
                                     EXIT_CHECK_ERRORS, EXIT_CHECK_WARNINGS, EXIT_ERROR,
                                     EXIT_INTERRUPTED, EXIT_USAGE, JOBS_FILE, Context, clean,
                                     failure, make_context, parse_size)
from qbackup.errors import QbackupError
from qbackup.qubes import RESTORE_IN_PROGRESS, Backend, QubesAdminBackend


def _later(module: str, name: str) -> Callable:
    """qbackup.commands.MODULE.NAME, imported when first called: a command
    loads only the modules it needs, and parsing loads none of them (startup
    cost, bench/README.md; tests/dom0/test_package.py)."""
    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(f"qbackup.commands.{module}"), name)(*args)
    call.__name__ = name
    return call


cmd_backup, cmd_cleanup = _later("backup", "cmd_backup"), _later("backup", "cmd_cleanup")
cmd_browse = _later("browse", "cmd_browse")
cmd_check, cmd_status = _later("jobs", "cmd_check"), _later("jobs", "cmd_status")
cmd_check_storage, cmd_gc = _later("maintenance", "cmd_check_storage"), _later("maintenance", "cmd_gc")
cmd_stats, repack_percent = _later("maintenance", "cmd_stats"), _later("maintenance", "repack_percent")
cmd_repo_list, cmd_repo_trust = _later("pins", "cmd_repo_list"), _later("pins", "cmd_repo_trust")
cmd_protect, cmd_prune = _later("prune", "cmd_protect"), _later("prune", "cmd_prune")
keep_within = _later("prune", "keep_within")
rename_arg = _later("qubes_restore", "rename_arg")
cmd_init, cmd_list = _later("repository", "cmd_init"), _later("repository", "cmd_list")
cmd_delete = _later("repository", "cmd_delete")
cmd_change_passphrase = _later("repository", "cmd_change_passphrase")
cmd_restore, cmd_verify = _later("restore", "cmd_restore"), _later("restore", "cmd_verify")
sample_percent, volume_target = _later("restore", "sample_percent"), _later("restore", "volume_target")
cmd_show = _later("show", "cmd_show")

DEFAULT_CHUNK_SIZE = 256 << 10
DEFAULT_PACK_SIZE = 64 << 20

def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    group.add_argument("--backup-vm", metavar="VM", default=default(None),
                       help=f"the backup qube (default: backup_vm in {CONFIG_FILE})")
    group.add_argument("--repo", metavar="NAME", default=default(None),
                       help=f"repository name in the backup qube (default: repo in "
                       f"{CONFIG_FILE}, else {DEFAULT_REPO})")
    group.add_argument("--state-dir", metavar="DIR", default=default(None),
                       help="dom0's record of seen history (default: state_dir in "
                       f"{CONFIG_FILE}, else {DEFAULT_STATE_DIR})")
    group.add_argument("--passphrase-file", metavar="FILE", default=default(None),
                       help="read the passphrase from FILE (one trailing newline "
                       "ignored) instead of asking on the terminal")
    group.add_argument("--jobs-file", metavar="FILE", default=default(None),
                       help=f"the jobs file (default {JOBS_FILE})")
    group.add_argument("-v", "--verbose", action="store_true", default=default(False),
                       help="say more (volumes read; traceback of internal errors)")


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of snapshots or periods")
    return int(text)


def _add_command(sub: Any, name: str, func: Callable[[Context, argparse.Namespace], int],
                 help: str, description: str,
                 rollback: bool = False) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=description,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_global_options(parser, suppress=True)
    if rollback:
        parser.add_argument("--allow-rollback", action="store_true",
                            help="proceed even if the repository serves an older or "
                            "different history than dom0 has seen (after a restore of "
                            "the backup qube, say); dom0 then accepts that history")
    parser.set_defaults(func=func)
    return parser


def build_parser(prog: str = "qbackup") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Incremental, deduplicating, encrypted backups of Qubes OS qubes.\n"
        "dom0 reads the volumes and settings of qubes, encrypts them, and stores\n"
        "them through the backup qube, which never sees a key.",
        epilog="exit codes:\n  0 ok\n  1 error\n  2 usage error\n"
        "  3 integrity or verification failure\n"
        "  4 history refused (rollback, fork, or another repository under a pinned name)\n"
        f"  5 wrong passphrase\n  {EXIT_CHECK_WARNINGS} check: warnings\n"
        f"  {EXIT_CHECK_ERRORS} check: errors, the job is refused\n  130 interrupted\n\n"
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
                   f"to {crypto.MAX_CHOSEN_SCRYPT_N} (default {crypto.SCRYPT_N})")
    p.add_argument("--replace", action="store_true",
                   help="the name is pinned to a repository that is gone for good: create a "
                   "new one and pin that instead")

    p = _add_command(sub, "backup", cmd_backup, "back up qubes",
                     "Back up the listed qubes (or --all: every qube but the backup qube): "
                     "their settings, the private volume of each, and the root volume of "
                     "templates and standalone qubes. First a read-only copy of every "
                     "volume is taken (reflink copy or LVM thin snapshot; of a running "
                     "qube, its state at its last shutdown), so the backup is one point in "
                     "time; then only what changed since the last backup to this "
                     "repository is read, and only chunks the repository lacks are sent. "
                     "An interrupted backup resumes from the same copies when run again "
                     "with the same qubes. See docs/CHANGES.md.", rollback=True)
    p.add_argument("qubes", nargs="*", metavar="QUBE", help="qubes to back up")
    p.add_argument("--all", action="store_true",
                   help="back up every qube except the backup qube")
    p.add_argument("--exclude", action="append", default=[], metavar="QUBE",
                   help="leave this qube out (repeatable)")
    p.add_argument("--live", action="store_true",
                   help="for running qubes, copy what they have written so far (a "
                   "crash-consistent state, as after a power cut) instead of their state "
                   "at their last shutdown; the snapshot records which one each volume is")
    p.add_argument("--full", action="store_true",
                   help="read every volume in full instead of only what changed (chunks "
                   "the repository holds are still not sent)")
    p.add_argument("--job", metavar="JOB",
                   help="run the job JOB of the jobs file: its backup qube, repository, "
                   "qubes and passphrase file; refused if `qbackup check JOB` finds errors; "
                   "its outcome is kept for `qbackup status`")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = _add_command(sub, "cleanup", cmd_cleanup, "remove copies no backup needs",
                     "List and remove the copies of volumes (reflink copies, LVM thin "
                     "snapshots) that dom0 made for this repository and no longer needs: "
                     "left by interrupted or killed backups, of qubes that are gone, or "
                     "replaced by newer ones. Every successful backup does this too. Kept: "
                     "the base copy of each volume (what the next incremental compares "
                     "with) and the copies an interrupted backup resumes from.",
                     rollback=True)
    p.add_argument("--dry-run", action="store_true",
                   help="only list what would be removed and what is kept")
    p.add_argument("--all", action="store_true",
                   help="also remove the base copies and the copies kept for resuming "
                   "(the next backup of each volume then reads it in full)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = _add_command(sub, "check", cmd_check, "say what a job will and will not back up",
                     "Say, before anything is read, what job JOB will back up and why, "
                     "every qube it leaves out, the templates and netvms it depends on "
                     "but leaves out, running qubes, volumes it cannot read consistently, "
                     "its size and the free space the backup qube reports. Exit 0: no "
                     "problem; 6: warnings (the job runs); 7: errors (the job is "
                     "refused).")
    p.add_argument("job", metavar="JOB", help="a job of the jobs file")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = _add_command(sub, "status", cmd_status, "show the outcome of each job's last run",
                     "Show, for each job of the jobs file, whether it runs now and the "
                     "outcome of its last run (figures, or the error). Exit 1 if a job's "
                     "last run failed.")
    p.set_defaults(needs_backup_vm=False)
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
    p.add_argument("--sample", type=sample_percent, metavar="PERCENT",
                   help="read back only a random PERCENT (0.01 to 100) of the distinct data "
                   "chunks; every chunk map node is still checked")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = _add_command(sub, "restore", cmd_restore, "restore qubes, or volumes to files or devices",
                     "Restore a snapshot, streaming from the backup qube and authenticating\n"
                     "everything before it is written.\n\n"
                     "--qubes recreates qubes through the Admin API: class, label, template,\n"
                     "properties, features, tags, firewall, device assignments and volume\n"
                     "settings, each volume imported straight into the new qube\n"
                     "(admin.vm.volume.ImportWithSize), in dependency order. An existing qube\n"
                     "is never touched without --replace. Each new qube carries the tag\n"
                     f"{RESTORE_IN_PROGRESS} (qubesd will not start it) until its\n"
                     "restore is complete; a qube whose restore failed keeps it and gets\n"
                     "qbackup-restore-failed. Exit 3 if a volume failed authentication.\n\n"
                     "--to and --volume-target write volumes to files or block devices\n"
                     "instead; existing targets are never overwritten without --force.",
                     rollback=True)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("snapshot", metavar="SNAPSHOT",
                   help="snapshot id, unique prefix (8+ hex digits) or 'latest' (give it "
                   "before --qubes)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--qubes", nargs="*", metavar="QUBE",
                       help="recreate these qubes of the snapshot (every qube of it if none "
                       "is named)")
    where.add_argument("--to", metavar="DIR", help="write DIR/QUBE/VOLUME.img")
    where.add_argument("--volume-target", type=volume_target, action="append",
                       metavar="QUBE:VOLUME=PATH",
                       help="write that volume to PATH, a file or device (repeatable)")
    g = p.add_argument_group("with --qubes")
    g.add_argument("--rename", type=rename_arg, action="append", default=[],
                   metavar="OLD:NEW", help="restore qube OLD as NEW; the other restored "
                   "qubes' references to OLD follow (repeatable)")
    g.add_argument("--pool", metavar="POOL",
                   help="put every volume in this storage pool (default: each volume's "
                   "pool in the snapshot)")
    g.add_argument("--replace", action="append", default=[], metavar="QUBE",
                   help="remove the existing qube QUBE (halted) and restore the snapshot's "
                   "in its place: the only way restore touches an existing qube (repeatable)")
    g.add_argument("--skip-missing", action="store_true",
                   help="a template, netvm or other qube (or pool) the qubes use that is "
                   "neither restored nor on this system: warn and use the system's default "
                   "instead (device assignments from it are left out) rather than refuse")
    g.add_argument("--dry-run", action="store_true",
                   help="print every step the restore would make, change nothing")
    g = p.add_argument_group("with --to or --volume-target")
    g.add_argument("--qube", action="append", default=[], metavar="QUBE",
                   help="with --to: restore only this qube (repeatable)")
    g.add_argument("--force", action="store_true", help="overwrite existing targets")

    p = _add_command(sub, "show", cmd_show, "show what a snapshot holds and what changed",
                     "Show the qubes of a snapshot: their settings, volumes and sizes, and "
                     "what changed since the snapshot before it (qubes added or removed, "
                     "settings changed, bytes changed per volume, found by comparing chunk "
                     "maps).", rollback=True)
    p.add_argument("snapshot", metavar="SNAPSHOT",
                   help="snapshot id, unique prefix (8+ hex digits) or 'latest'")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = _add_command(sub, "browse", cmd_browse, "browse a qube's files from a snapshot",
                     "Make a temporary qube (qbackup-browse-..., red, no network) whose "
                     "private volume is QUBE's from SNAPSHOT, streamed in and authenticated "
                     "as restore does, and open its file manager. Its files are read in "
                     "that qube, never in dom0: copy what you need out with qvm-copy. "
                     "--cleanup removes every such qube.", rollback=True)
    p.add_argument("snapshot", nargs="?", metavar="SNAPSHOT",
                   help="snapshot id, unique prefix (8+ hex digits) or 'latest'")
    p.add_argument("qube", nargs="?", metavar="QUBE", help="the qube whose files to browse")
    p.add_argument("--template", metavar="TEMPLATE",
                   help="template of the browse qube (default: QUBE's own if it is on this "
                   "system, else the system's default template)")
    p.add_argument("--pool", metavar="POOL", help="pool for its volumes (default: the "
                   "system's default)")
    p.add_argument("--cleanup", action="store_true",
                   help="remove every qbackup-browse-... qube made by this command (killed "
                   "first if running)")

    p = _add_command(sub, "delete", cmd_delete, "delete a snapshot",
                     "Delete one snapshot. Data shared with other snapshots stays.",
                     rollback=True)
    p.add_argument("snapshot", metavar="SNAPSHOT",
                   help="snapshot id, unique prefix (8+ hex digits) or 'latest'")

    p = _add_command(sub, "prune", cmd_prune, "delete snapshots by retention rules",
                     "Delete the snapshots no --keep-* rule keeps. dom0 decides from the "
                     "authenticated times and qubes; the backup qube deletes.\n\n"
                     "Rules (at least one): --keep-last N keeps the N newest snapshots; "
                     "--keep-hourly/daily/weekly/monthly/yearly N keep, for the N newest such "
                     "periods that have a snapshot, the newest snapshot of each (periods in "
                     "dom0's local time, ISO weeks); --keep-within DURATION keeps every "
                     "snapshot at most DURATION older than the newest one (e.g. 7d, 2w, 6m, "
                     "1y6m, 36h). Protected snapshots (qbackup protect) and the newest snapshot "
                     "are always kept; damaged snapshots are left alone.\n\n"
                     "With --per-qube the rules apply to each qube's own snapshots, and a "
                     "snapshot goes only when no qube in it keeps it.\n\n"
                     "Deleting frees no space by itself: the backup qube's garbage collection "
                     "(qbackup gc) does.", rollback=True)
    p.add_argument("--keep-last", type=_count, default=0, metavar="N",
                   help="keep the N newest snapshots")
    for period, unit in (("hourly", "hours"), ("daily", "days"), ("weekly", "weeks"),
                         ("monthly", "months"), ("yearly", "years")):
        p.add_argument(f"--keep-{period}", type=_count, default=0, metavar="N",
                       help=f"keep the newest snapshot of each of the N newest {unit} "
                       "that have one")
    p.add_argument("--keep-within", type=keep_within, metavar="DURATION",
                   help="keep every snapshot this much older than the newest or less")
    p.add_argument("--per-qube", action="store_true",
                   help="apply the rules to each qube's snapshots separately")
    p.add_argument("--dry-run", action="store_true",
                   help="only show what would be deleted and kept, and why")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    for name, verb, what in (("protect", "protect", "Protect a snapshot: prune keeps it and "
                              "delete refuses it. Recorded in dom0's state directory, out of "
                              "the backup qube's reach."),
                             ("unprotect", "unprotect", "Remove a snapshot's protection.")):
        p = _add_command(sub, name, cmd_protect, f"{verb} a snapshot", what, rollback=True)
        p.add_argument("snapshot", metavar="SNAPSHOT",
                       help="snapshot id, unique prefix (8+ hex digits) or 'latest'")

    repo = sub.add_parser("repo", help="repository identities pinned by dom0",
                          description="dom0 pins the repository id behind each (backup qube, "
                          "repository name) at init or first use, and refuses another "
                          "repository served under that name.")
    repo_sub = repo.add_subparsers(dest="repo_command", required=True, metavar="COMMAND")
    p = _add_command(repo_sub, "list", cmd_repo_list, "list the pinned repositories",
                     "List every (backup qube, repository name) and the repository id it is "
                     "pinned to. Needs neither the backup qube nor the passphrase.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = _add_command(repo_sub, "trust", cmd_repo_trust,
                     "pin the name to the repository the backup qube serves now",
                     "Accept the repository the backup qube now serves under --repo as the "
                     "one this name means: after checking that it opens with the passphrase, "
                     "show the pinned and the served repository ids (with the served one's "
                     "creation time and snapshots), then ask for 'yes' on the terminal, or "
                     "take --id. Use it only if you know why the repository changed (a new "
                     "repository made elsewhere, a restored backup qube).", rollback=True)
    p.add_argument("--id", metavar="HEX",
                   help="trust the served repository only if its id starts with HEX "
                   "(8+ hex digits); no question asked")

    p = _add_command(sub, "stats", cmd_stats, "show sizes: stored, logical, dedup, per snapshot",
                     "Show the repository's stored size (the backup qube's pack files), its "
                     "logical size (the volumes of every snapshot, from the authenticated "
                     "manifests), the dedup ratio between them, the space the backup qube's "
                     "file system has left, and for each snapshot its logical size and the "
                     "stored bytes only it uses (what deleting it alone would free), and the "
                     "garbage a `qbackup gc` would free. Stored figures come from the backup "
                     "qube and are untrusted.", rollback=True)
    p.add_argument("--quick", action="store_true",
                   help="leave out the per-snapshot unique sizes (the backup qube walks "
                   "every reference for them)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = _add_command(sub, "gc", cmd_gc, "free the space of deleted snapshots",
                     "Run the backup qube's garbage collection: it marks what the snapshots "
                     "reach from the clear references it stores, copies the live blobs of "
                     "packs mostly dead into new packs (encrypted as they are), then deletes "
                     "the packs nothing live is left in. No passphrase: the backup qube needs "
                     "no key. Backups may run meanwhile (they wait at most a couple of "
                     "seconds at a time). Interrupted (Ctrl-C, a lost connection, a killed "
                     "qube), it resumes where it was when run again. Exit 3 if the backup "
                     "qube refuses because snapshots are damaged (see check-storage).")
    p.add_argument("--repack-below", type=repack_percent, default=70, metavar="PERCENT",
                   help="rewrite a pack when less than PERCENT of its bytes are live (default "
                   "70; 0: only delete packs with nothing live, 100: rewrite every pack "
                   "holding garbage)")
    p.add_argument("--dry-run", action="store_true",
                   help="say what would be freed, change nothing")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = _add_command(sub, "check-storage", cmd_check_storage,
                     "check the backup qube's packs; name damaged snapshots, qubes, volumes",
                     "Ask the backup qube to check its storage without keys: every pack's "
                     "trailer, the index and the references, and with --read-data every "
                     "byte of every pack (each record's CRC-32, each pack's SHA-256). Each "
                     "snapshot that reaches damaged data is named with the qubes and volumes "
                     "it affects (dom0 maps the ids through the authenticated manifests). "
                     "Exit 3 if anything is damaged. `verify` authenticates what it reads; "
                     "this reads everything, faster, but only against the backup qube's own "
                     "checksums.", rollback=True)
    p.add_argument("--read-data", action="store_true",
                   help="read every byte of every pack (slow: reads the whole repository)")
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
                   f"to {crypto.MAX_CHOSEN_SCRYPT_N} (default {crypto.SCRYPT_N})")
    return parser


def run(argv: list[str] | None = None, *, backend: Callable[[], Backend] | None = None,
        config: dict[str, str] | None = None, prog: str = "qbackup") -> int:
    """Run one command; the exit code.

    `backend` makes the Backend once the command line is valid (default: the
    real Qubes one); `config` stands in for the settings of CONFIG_FILE
    (default: read that file)."""
    args = build_parser(prog).parse_args(argv)
    try:
        ctx = make_context(args, backend or QubesAdminBackend, config)
        return args.func(ctx, args)
    except KeyboardInterrupt:
        newline = "\n" if sys.stderr.isatty() else ""  # after the terminal's ^C
        print(f"{newline}qbackup: error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (QbackupError, OSError) as e:
        code, line = failure(e)
        print(f"qbackup: error: {line}", file=sys.stderr)
        return code
    except Exception as e:  # a bug: say so in one line, details with -v
        if getattr(args, "verbose", False):
            import traceback
            traceback.print_exc()
        print(f"qbackup: error: internal error: {type(e).__name__}: {clean(str(e))}"
              " (run with -v for details)", file=sys.stderr)
        return EXIT_ERROR


def main() -> NoReturn:
    sys.exit(run())
