# SPDX-License-Identifier: GPL-2.0-or-later
"""What every command shares: exit codes, the configuration file, the
`Context` (which backend, backup qube, repository and state directory),
passphrases, unlocking a repository and output helpers."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import re
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from qbackup import crypto
from qbackup.errors import (BadPassphrase, IntegrityError, QbackupError, RollbackError,
                            UsageError)
from qbackup.proto import Session
from qbackup.state import State
from qbackup.transport import QUBE_NAME_RE, REPO_NAME_RE

if TYPE_CHECKING:  # imported where used: a command that needs neither does not load them
    from qbackup.jobs import Job
    from qbackup.qubes import Backend
    from qbackup.restore import History, SnapshotInfo

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTEGRITY = 3
EXIT_ROLLBACK = 4
EXIT_PASSPHRASE = 5
EXIT_CHECK_WARNINGS = 6   # qbackup check: warnings (the job runs)
EXIT_CHECK_ERRORS = 7     # qbackup check: errors (the job is refused)
EXIT_INTERRUPTED = 130

# Most specific first: the first match decides the exit code.
_EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (UsageError, EXIT_USAGE),
    (BadPassphrase, EXIT_PASSPHRASE),
    (RollbackError, EXIT_ROLLBACK),
    (IntegrityError, EXIT_INTEGRITY),
    (QbackupError, EXIT_ERROR),
    (OSError, EXIT_ERROR),
]

CONFIG_FILE = "/etc/qbackup/qbackup.conf"
JOBS_FILE = "/etc/qbackup/jobs.toml"    # docs/JOBS.md
CONFIG_KEYS = ("backup_vm", "repo", "state_dir", "run_dir")
DEFAULT_STATE_DIR = "/var/lib/qbackup"
# Where running jobs hold their locks (readable by the dom0 user that runs
# qubes.BackupRequest, so it can refuse a request while the job runs).
DEFAULT_RUN_DIR = "/run/qbackup"
DEFAULT_REPO = "default"
# How long to wait for another writer (e.g. the connection of a run just
# interrupted, finishing what it had received) before giving up.
LOCK_WAIT = 15.0

_SIZE = re.compile(r"([0-9]+)([KMG]?)", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`256K`, `64M`, `1G` or a plain number of bytes (binary units)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"invalid size {text!r} (examples: 4096, 256K, 64M, 1G)")
    return int(match[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[match[2].upper()]


def power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def clean(text: str, limit: int = 500) -> str:
    """One printable line: control characters escaped, length bounded."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def failure(error: QbackupError | OSError) -> tuple[int, str]:
    """The exit code of a failed command and its one-line, printable message."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        message = f"{where}{error.strerror}"
    else:
        message = str(error) or type(error).__name__
    return next(code for kind, code in _EXIT_CODES if isinstance(error, kind)), clean(message)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, sort_keys=True))


def local_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


# -- configuration --------------------------------------------------------

def read_config(path: str) -> dict[str, str]:
    """The key=value settings of `path` (# comments), {} if it does not exist."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
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
    """What every command needs: where to connect and where dom0's state is;
    the job, for a command run for one (`--job`, `check JOB`)."""
    backend: Backend
    backup_vm: str
    repo: str
    state_dir: str
    verbose: bool
    run_dir: str = DEFAULT_RUN_DIR
    job: Job | None = None

    def state(self) -> State:
        return State(self.state_dir)

    def unlock(self, session: Session, passphrase: bytes, write: bool) -> crypto.Keys:
        """Open the repository, unwrap its keys, and check it is the one
        pinned under this name (pinning it on first use)."""
        keys = unlock(session, passphrase, write)
        if self.state().check_pin(self.backup_vm, self.repo, keys.repo_id):
            print(f"qbackup: note: repository '{self.repo}' in {self.backup_vm} is now pinned to"
                  f" {keys.repo_id.hex()}", file=sys.stderr)
        return keys

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


def make_context(args: argparse.Namespace, backend: Callable[[], Backend],
                 config: dict[str, str] | None = None) -> Context:
    """The context of one command: options first, then the job's settings
    (for `--job JOB` or `check JOB`), then `config` (by default the settings
    of CONFIG_FILE), then the built-in defaults. `backend` is called once the
    names are known to be valid."""
    if config is None:
        config = read_config(CONFIG_FILE)
    job = None
    if getattr(args, "job", None):
        from qbackup.jobs import check_passphrase_file, get_job
        job = get_job(args.job, getattr(args, "jobs_file", None) or JOBS_FILE)
        for option, value in (("backup_vm", job.backup_vm), ("repo", job.repo)):
            given = getattr(args, option, None)
            if given and given != value:
                raise UsageError(f"--{option.replace('_', '-')} {clean(given)} contradicts "
                                 f"job {job.name} ({value})")
            setattr(args, option, value)
        if job.passphrase_file and not getattr(args, "passphrase_file", None):
            check_passphrase_file(job.passphrase_file)
            args.passphrase_file = job.passphrase_file
    backup_vm = getattr(args, "backup_vm", None) or config.get("backup_vm") or ""
    if not backup_vm and getattr(args, "needs_backup_vm", True):
        raise UsageError(f"no backup qube: give --backup-vm or set backup_vm in {CONFIG_FILE}")
    if backup_vm and not QUBE_NAME_RE.fullmatch(backup_vm):
        raise UsageError(f"invalid backup qube name {clean(backup_vm)!r}")
    repo = getattr(args, "repo", None) or config.get("repo") or DEFAULT_REPO
    if not REPO_NAME_RE.fullmatch(repo) or ".." in repo:
        raise UsageError(f"invalid repository name {clean(repo)!r} "
                         "(letters, digits, '_.-', at most 64, not starting with '.-_')")
    state_dir = (getattr(args, "state_dir", None) or config.get("state_dir")
                 or DEFAULT_STATE_DIR)
    return Context(backend(), backup_vm, repo, state_dir, getattr(args, "verbose", False),
                   run_dir=config.get("run_dir") or DEFAULT_RUN_DIR, job=job)


# -- passphrases and unlocking ----------------------------------------------

def read_passphrase(path: str | None, prompt: str, *, confirm: bool = False) -> bytes:
    """The passphrase from `path` (one trailing newline dropped) or asked on
    the terminal without echo (twice if `confirm`). Empty is refused."""
    if path is not None:
        with open(path, "rb") as f:
            data = f.read()
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


def ask_passphrase(args: argparse.Namespace) -> bytes:
    """The repository passphrase (asked before connecting to the backup qube)."""
    return read_passphrase(getattr(args, "passphrase_file", None), "Passphrase: ")


def unlock(session: Session, passphrase: bytes, write: bool) -> crypto.Keys:
    """Open the repository and unwrap its keys (not checking the pin: see
    Context.unlock)."""
    untrusted_config, _ = session.open(write=write, lock_wait=LOCK_WAIT)
    return crypto.unwrap_keys(untrusted_config, passphrase)


def warn(message: str) -> None:
    print(f"qbackup: warning: {clean(message)}", file=sys.stderr)


def open_history(ctx: Context, args: argparse.Namespace, session: Session, passphrase: bytes,
                 write: bool = False, warn_damaged: bool = True
                 ) -> tuple[crypto.Keys, History]:
    """Unlock the repository and load its authenticated history, refusing a
    rollback unless --allow-rollback. Damaged snapshots are left out, each
    named in a warning unless the caller reports them itself."""
    from qbackup.restore import load_history
    keys = ctx.unlock(session, passphrase, write=write)
    history = load_history(session, keys, ctx.state(),
                                       allow_rollback=getattr(args, "allow_rollback", False))
    if warn_damaged:
        for bad in history.damaged:
            warn(f"snapshot {bad.id.hex()} is damaged and left out: {bad.reason}")
    return keys, history


def find_snapshot(history: History, spec: str) -> SnapshotInfo:
    from qbackup.restore import resolve_snapshot
    prefix = spec.lower()
    damaged = [d for d in history.damaged if spec != "latest" and d.id.hex().startswith(prefix)]
    if damaged and not any(s.id.hex().startswith(prefix) for s in history):
        raise IntegrityError(f"snapshot {damaged[0].id.hex()} is damaged: {damaged[0].reason}")
    if not history:
        raise QbackupError("the repository holds no snapshots")
    return resolve_snapshot(history, spec)
