# SPDX-License-Identifier: GPL-2.0-or-later
"""dom0's local record of the history it has seen, per repository.

For each repository (by repo_id) dom0 keeps the newest snapshot it has
written or accepted (the head: id and time) and the ids it deleted itself.
accept() compares a repository's authenticated history with that record and
refuses a rollback (head gone), a fork (a newer snapshot that does not
descend from the head) or a replay of a snapshot we deleted. Files are JSON,
written atomically (tmp + fsync + rename + fsync dir), mode 0600, under a
per-repository lock. See docs/SNAPSHOTS.md.
"""

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from qbackup.errors import QbackupError, RollbackError

DEFAULT_DIR = "/var/lib/qbackup"
FORMAT = "qbackup-state"
VERSION = 1
OVERRIDE_HINT = "use --allow-rollback to accept the repository as it is"


class SnapshotRef(Protocol):
    id: bytes
    time: float
    predecessor: bytes | None


@dataclass
class Record:
    head: bytes | None = None
    head_time: float = 0.0
    deleted: set[bytes] = field(default_factory=set)


def _descends(snapshot: SnapshotRef, ancestor: bytes, by_id: dict[bytes, SnapshotRef]) -> bool:
    """Whether `ancestor` is on the predecessor chain of `snapshot`."""
    seen = set()
    current = snapshot
    while current.predecessor is not None and current.predecessor not in seen:
        if current.predecessor == ancestor:
            return True
        seen.add(current.predecessor)
        if current.predecessor not in by_id:
            return False
        current = by_id[current.predecessor]
    return False


def rollback_problem(record: Record, snapshots: Sequence[SnapshotRef]) -> str | None:
    """Why the repository's history contradicts `record`, or None if it does not."""
    by_id = {s.id: s for s in snapshots}
    replayed = sorted(record.deleted & by_id.keys())
    if replayed:
        return f"snapshot {replayed[0].hex()} was deleted by this dom0 but the repository shows it again"
    if record.head is None:
        return None
    if record.head not in by_id and record.head not in record.deleted:
        return (f"snapshot {record.head.hex()}, the newest this dom0 has seen, is missing"
                " from the repository (rolled back?)")
    for s in sorted(snapshots, key=lambda s: (s.time, s.id)):
        if s.id != record.head and s.time >= record.head_time and not _descends(s, record.head, by_id):
            return (f"snapshot {s.id.hex()} is newer than {record.head.hex()}, the newest this dom0"
                    " has seen, but does not descend from it (forked history)")
    return None


def read_json(path: str) -> object | None:
    """The JSON document in `path`, None if there is no such file."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise QbackupError(f"cannot read state file {path}: {e}") from None


def write_json_atomic(directory: str, path: str, doc: object) -> None:
    """Write `doc` as JSON to `path` in `directory`: temporary file (0600,
    no symlink followed), fsync, rename, fsync of the directory."""
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise QbackupError(f"cannot write state file {path}: {e.strerror}") from None


class State:
    """Per-repository records in one directory (default /var/lib/qbackup)."""

    def __init__(self, directory: str = DEFAULT_DIR):
        self.directory = directory

    def _path(self, repo_id: bytes, suffix: str) -> str:
        return os.path.join(self.directory, repo_id.hex() + suffix)

    def lock(self, repo_id: bytes) -> contextlib.AbstractContextManager[None]:
        """The per-repository lock of the state files (qbackup.copies keeps
        its record under it too)."""
        return self._locked(repo_id)

    @contextlib.contextmanager
    def _locked(self, repo_id: bytes) -> Iterator[None]:
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(self._path(repo_id, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise QbackupError(f"cannot open state in {self.directory}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def load(self, repo_id: bytes) -> Record:
        """The record for a repository (empty if none yet)."""
        path = self._path(repo_id, ".json")
        doc = read_json(path)
        if doc is None:
            return Record()
        try:
            if doc["format"] != FORMAT or doc["version"] != VERSION or doc["repo_id"] != repo_id.hex():
                raise ValueError("not a version 1 state file for this repository")
            deleted = {bytes.fromhex(h) for h in doc["deleted"]}
            if doc["head"] is None:
                return Record(None, 0.0, deleted)
            return Record(bytes.fromhex(doc["head"]["id"]), float(doc["head"]["time"]), deleted)
        except (KeyError, TypeError, ValueError) as e:
            raise QbackupError(f"state file {path} is corrupt ({e}); removing it drops rollback protection") from None

    def _save(self, repo_id: bytes, record: Record) -> None:
        doc = {"format": FORMAT, "version": VERSION, "repo_id": repo_id.hex(),
               "head": None if record.head is None else {"id": record.head.hex(), "time": record.head_time},
               "deleted": sorted(d.hex() for d in record.deleted)}
        write_json_atomic(self.directory, self._path(repo_id, ".json"), doc)

    def record_head(self, repo_id: bytes, snapshot_id: bytes, time: float) -> None:
        """Record a snapshot this dom0 has just committed as the newest."""
        with self._locked(repo_id):
            record = self.load(repo_id)
            record.head, record.head_time = snapshot_id, time
            self._save(repo_id, record)

    def record_deleted(self, repo_id: bytes, snapshot_id: bytes,
                       history: Sequence[SnapshotRef]) -> None:
        """Record that this dom0 deleted a snapshot (its absence is then no rollback).

        `history` is the authenticated history the deletion was chosen from.
        If the head was deleted, the newest snapshot left in it becomes the
        head at once: otherwise the repository could hide that one, too,
        before the next accept() and no rule would notice.
        """
        with self._locked(repo_id):
            record = self.load(repo_id)
            record.deleted.add(snapshot_id)
            left = [s for s in history if s.id not in record.deleted]
            if record.head == snapshot_id and left:
                newest = max(left, key=lambda s: (s.time, s.id))
                record.head, record.head_time = newest.id, newest.time
            self._save(repo_id, record)

    def accept(self, repo_id: bytes, snapshots: Sequence[SnapshotRef], *, allow_rollback: bool = False) -> None:
        """Check an authenticated history against the record, then make its newest snapshot the head.

        RollbackError (one line) if the history contradicts the record, unless
        allow_rollback, which resets the record to this history.
        """
        with self._locked(repo_id):
            record = self.load(repo_id)
            if allow_rollback:
                record = Record()
            else:
                problem = rollback_problem(record, snapshots)
                if problem is not None:
                    raise RollbackError(f"{problem}; {OVERRIDE_HINT}")
            if snapshots:
                newest = max(snapshots, key=lambda s: (s.time, s.id))
                record.head, record.head_time = newest.id, newest.time
            self._save(repo_id, record)
