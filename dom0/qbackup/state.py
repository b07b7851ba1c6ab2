# SPDX-License-Identifier: GPL-2.0-or-later
"""dom0's local record of the repositories and histories it has seen.

Per repository (by repo_id) dom0 keeps every snapshot it has written or
accepted, the newest of them (the head), the ones it deleted itself or is
deleting, the ones accepted as gone with --allow-rollback, and the ones the
user protected. accept() compares a repository's authenticated history
with that record and refuses a hidden snapshot (head, middle or oldest), an
authenticated predecessor chain with a gap, a fork, or a replay of a
snapshot dom0 deleted. Per (backup qube, repository name) dom0 pins the
repository id it uses (pins.json), so another repository served under that
name is refused. Files are JSON, written atomically (tmp + fsync + rename +
fsync dir), mode 0600, each under its own lock. See docs/SNAPSHOTS.md §5.
"""

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from qbackup.errors import QbackupError, RepositoryChanged, RollbackError

DEFAULT_DIR = "/var/lib/qbackup"
FORMAT = "qbackup-state"
VERSION = 2
PINS_FORMAT, PINS_VERSION = "qbackup-pins", 1
PINS_FILE = "pins"
OVERRIDE_HINT = "use --allow-rollback to accept the repository as it is"


class SnapshotRef(Protocol):
    id: bytes
    time: float
    predecessor: bytes | None


@dataclass
class Record:
    head: bytes | None = None
    head_time: float = 0.0
    seen: set[bytes] = field(default_factory=set)       # written or accepted, still there
    deleted: set[bytes] = field(default_factory=set)    # deleted by this dom0 (confirmed)
    deleting: set[bytes] = field(default_factory=set)   # deletion sent, not yet confirmed
    lost: set[bytes] = field(default_factory=set)       # accepted as gone (--allow-rollback)
    protected: set[bytes] = field(default_factory=set)  # never deleted by prune


@dataclass
class Pin:
    repo_id: bytes
    since: float


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


def _more(ids: Collection[bytes]) -> str:
    return f" (and {len(ids) - 1} more)" if len(ids) > 1 else ""


def _missing(record: Record, listed: set[bytes]) -> list[bytes]:
    """Snapshots dom0 has seen that the repository no longer lists, head first."""
    gone = record.seen - listed - record.deleting
    return sorted(gone, key=lambda i: (i != record.head, i))


def _gaps(record: Record, snapshots: Sequence[SnapshotRef], listed: set[bytes]) -> list[SnapshotRef]:
    """Listed snapshots whose authenticated predecessor is neither listed nor
    known to be gone (deleted by this dom0, or accepted as lost)."""
    known_gone = record.deleted | record.deleting | record.lost
    return [s for s in snapshots if s.predecessor is not None
            and s.predecessor not in listed and s.predecessor not in known_gone]


def rollback_problem(record: Record, snapshots: Sequence[SnapshotRef],
                     damaged: Collection[bytes] = ()) -> str | None:
    """Why the repository's history contradicts `record`, or None if it does not.

    `snapshots` are the authenticated ones; `damaged` the ids listed whose
    manifest failed authentication (present, so not hidden, but unreadable).
    """
    by_id = {s.id: s for s in snapshots}
    listed = by_id.keys() | set(damaged)
    replayed = sorted(record.deleted & listed)
    if replayed:
        return (f"snapshot {replayed[0].hex()} was deleted by this dom0 but the repository"
                f" shows it again{_more(replayed)}")
    missing = _missing(record, listed)
    if missing:
        which = "the newest" if missing[0] == record.head else "one"
        return (f"snapshot {missing[0].hex()}, {which} this dom0 has seen, is missing from the"
                f" repository{_more(missing)} (hidden or rolled back?)")
    ordered = sorted(snapshots, key=lambda s: (s.time, s.id))
    gaps = _gaps(record, ordered, listed)
    if gaps:
        return (f"snapshot {gaps[0].id.hex()} follows {gaps[0].predecessor.hex()}, which is missing"
                f" from the repository and was not deleted by this dom0{_more(gaps)}"
                " (hidden, or deleted elsewhere?)")
    if record.head is None or record.head in damaged:
        return None
    for s in ordered:
        if s.id != record.head and s.time >= record.head_time and not _descends(s, record.head, by_id):
            return (f"snapshot {s.id.hex()} is newer than {record.head.hex()}, the newest this dom0"
                    " has seen, but does not descend from it (forked history)")
    return None


def _hexes(ids: set[bytes]) -> list[str]:
    return sorted(i.hex() for i in ids)


def _ids(doc: dict, key: str) -> set[bytes]:
    values = doc[key]
    if not isinstance(values, list):
        raise TypeError(f"{key} is not a list")
    ids = {bytes.fromhex(h) for h in values}
    if any(len(i) != 32 for i in ids):
        raise ValueError(f"{key} holds an id that is not 32 bytes")
    return ids


def _record_from(doc: Any, repo_id: bytes) -> Record:
    """A record from a version 1 or 2 state document (version 1 is migrated:
    it knew only the head and the deletions, so the head is all it has seen)."""
    if (not isinstance(doc, dict) or doc.get("format") != FORMAT
            or doc.get("version") not in (1, VERSION) or doc.get("repo_id") != repo_id.hex()):
        raise ValueError(f"not a version 1 or {VERSION} state file for this repository")
    record = Record(deleted=_ids(doc, "deleted"))
    if doc["head"] is not None:
        record.head, record.head_time = bytes.fromhex(doc["head"]["id"]), float(doc["head"]["time"])
        if len(record.head) != 32:
            raise ValueError("head is not a 32-byte id")
    if doc["version"] == 1:
        record.seen = {record.head} - {None} - record.deleted
        return record
    for key in ("seen", "deleting", "lost", "protected"):
        setattr(record, key, _ids(doc, key))
    return record


def _record_doc(repo_id: bytes, record: Record) -> dict:
    return {"format": FORMAT, "version": VERSION, "repo_id": repo_id.hex(),
            "head": None if record.head is None else {"id": record.head.hex(), "time": record.head_time},
            "seen": _hexes(record.seen), "deleted": _hexes(record.deleted),
            "deleting": _hexes(record.deleting), "lost": _hexes(record.lost),
            "protected": _hexes(record.protected)}


def _newest(snapshots: Sequence[SnapshotRef]) -> SnapshotRef | None:
    return max(snapshots, key=lambda s: (s.time, s.id), default=None)


class State:
    """Per-repository records and the pins, in one directory (default /var/lib/qbackup)."""

    def __init__(self, directory: str = DEFAULT_DIR):
        self.directory = directory

    def _path(self, name: str, suffix: str) -> str:
        return os.path.join(self.directory, name + suffix)

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(self._path(name, ".lock"),
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise QbackupError(f"cannot open state in {self.directory}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self, name: str) -> Any:
        """The JSON document `name`.json, None if there is none."""
        path = self._path(name, ".json")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise QbackupError(f"cannot read state file {path}: {e.strerror}") from None
        try:
            with os.fdopen(fd, "rb") as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise QbackupError(f"cannot read state file {path}: {e}") from None

    def _write(self, name: str, doc: dict) -> None:
        path, tmp = self._path(name, ".json"), self._path(name, ".json.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise QbackupError(f"cannot write state file {path}: {e.strerror}") from None

    # -- other records kept here (qbackup.copies)

    def read_record(self, name: str) -> Any:
        """The JSON document `name`.json of this directory, None if there is none."""
        return self._read(name)

    def write_record(self, name: str, doc: dict) -> None:
        """Write `name`.json atomically, under its own lock."""
        with self._locked(name):
            self._write(name, doc)

    # -- per-repository records

    def load(self, repo_id: bytes) -> Record:
        """The record for a repository (empty if none yet)."""
        doc = self._read(repo_id.hex())
        if doc is None:
            return Record()
        try:
            return _record_from(doc, repo_id)
        except (KeyError, TypeError, ValueError) as e:
            raise QbackupError(f"state file {self._path(repo_id.hex(), '.json')} is corrupt ({e});"
                               " removing it drops rollback protection") from None

    @contextlib.contextmanager
    def _update(self, repo_id: bytes) -> Iterator[Record]:
        """The record, locked; saved when the block ends without an exception."""
        with self._locked(repo_id.hex()):
            record = self.load(repo_id)
            yield record
            self._write(repo_id.hex(), _record_doc(repo_id, record))

    def record_head(self, repo_id: bytes, snapshot_id: bytes, time: float) -> None:
        """Record a snapshot this dom0 has just committed as the newest."""
        with self._update(repo_id) as record:
            record.head, record.head_time = snapshot_id, time
            record.seen.add(snapshot_id)

    def record_deleting(self, repo_id: bytes, snapshot_ids: Collection[bytes]) -> None:
        """Record that these snapshots are about to be deleted: if dom0 stops
        before the deletion is confirmed, the next accept() finds out which
        ones went (deleted) and which stayed (seen)."""
        with self._update(repo_id) as record:
            record.deleting |= set(snapshot_ids)

    def record_deleted(self, repo_id: bytes, snapshot_id: bytes,
                       history: Sequence[SnapshotRef]) -> None:
        """Record that this dom0 deleted a snapshot (its absence is then no rollback).

        `history` is the authenticated history the deletion was chosen from.
        If the head was deleted, the newest snapshot left in it becomes the
        head at once: otherwise the repository could hide that one, too,
        before the next accept() and no rule would notice.
        """
        with self._update(repo_id) as record:
            record.deleted.add(snapshot_id)
            record.deleting.discard(snapshot_id)
            record.seen.discard(snapshot_id)
            record.protected.discard(snapshot_id)
            gone = record.deleted | record.deleting
            newest = _newest([s for s in history if s.id not in gone])
            if record.head == snapshot_id and newest is not None:
                record.head, record.head_time = newest.id, newest.time

    def set_protected(self, repo_id: bytes, snapshot_id: bytes, protected: bool) -> None:
        with self._update(repo_id) as record:
            if protected:
                record.protected.add(snapshot_id)
            else:
                record.protected.discard(snapshot_id)

    def accept(self, repo_id: bytes, snapshots: Sequence[SnapshotRef], *,
               damaged: Collection[bytes] = (), allow_rollback: bool = False) -> set[bytes]:
        """Check an authenticated history against the record, then record it.

        RollbackError (one line) if the history contradicts the record. With
        allow_rollback the listing becomes the new truth: what is missing is
        recorded as lost, but the record of deletions is kept, and snapshots
        this dom0 deleted stay deleted. Returns those (replayed) ids, which
        the caller must leave out of the history.
        """
        with self._update(repo_id) as record:
            by_id = {s.id: s for s in snapshots}
            listed = by_id.keys() | set(damaged)
            # deletions that were sent but never confirmed: listed means not done
            went = record.deleting - listed
            record.deleted |= went
            record.seen -= went
            record.protected -= went
            record.deleting = set()
            problem = rollback_problem(record, snapshots, damaged)
            replayed = record.deleted & listed
            if problem is not None:
                if not allow_rollback:
                    raise RollbackError(f"{problem}; {OVERRIDE_HINT}")
                record.lost.update(_missing(record, listed))
                record.lost.update(s.predecessor for s in _gaps(record, snapshots, listed))
                record.seen &= listed
                head_listed = record.head in by_id or record.head in damaged
                if not head_listed and record.head not in record.deleted:
                    record.head, record.head_time = None, 0.0
            good = [s for s in snapshots if s.id not in replayed]
            record.seen |= {s.id for s in good}
            record.lost -= record.seen
            newest = _newest(good)
            if newest is not None and record.head not in damaged:
                record.head, record.head_time = newest.id, newest.time
        return replayed

    # -- pins: which repository a (backup qube, repository name) is

    def _pins(self) -> dict[tuple[str, str], Pin]:
        doc = self._read(PINS_FILE)
        if doc is None:
            return {}
        try:
            if doc["format"] != PINS_FORMAT or doc["version"] != PINS_VERSION:
                raise ValueError(f"not a version {PINS_VERSION} pins file")
            pins = {}
            for entry in doc["pins"]:
                repo_id = bytes.fromhex(entry["repo_id"])
                if len(repo_id) != 32 or not all(isinstance(entry[k], str) for k in ("backup_vm", "repo")):
                    raise ValueError("bad pin entry")
                pins[entry["backup_vm"], entry["repo"]] = Pin(repo_id, float(entry["since"]))
            return pins
        except (KeyError, TypeError, ValueError) as e:
            raise QbackupError(f"state file {self._path(PINS_FILE, '.json')} is corrupt ({e});"
                               " removing it drops the repository pins") from None

    def _save_pins(self, pins: dict[tuple[str, str], Pin]) -> None:
        self._write(PINS_FILE, {"format": PINS_FORMAT, "version": PINS_VERSION, "pins": [
            {"backup_vm": vm, "repo": repo, "repo_id": pin.repo_id.hex(), "since": pin.since}
            for (vm, repo), pin in sorted(pins.items())]})

    def pins(self) -> dict[tuple[str, str], Pin]:
        """Every pin: (backup qube, repository name) -> Pin."""
        with self._locked(PINS_FILE):
            return self._pins()

    def pin(self, backup_vm: str, repo: str, repo_id: bytes) -> None:
        """Pin (or re-pin) the name to this repository id."""
        with self._locked(PINS_FILE):
            pins = self._pins()
            pins[backup_vm, repo] = Pin(repo_id, time.time())
            self._save_pins(pins)

    def check_pin(self, backup_vm: str, repo: str, repo_id: bytes) -> bool:
        """Refuse (RepositoryChanged) a repository other than the one pinned
        under this name; pin it on first use. True if it was pinned now."""
        with self._locked(PINS_FILE):
            pins = self._pins()
            pin = pins.get((backup_vm, repo))
            if pin is None:
                pins[backup_vm, repo] = Pin(repo_id, time.time())
                self._save_pins(pins)
                return True
        if pin.repo_id != repo_id:
            raise RepositoryChanged(
                f"{backup_vm} serves repository {repo_id.hex()} as '{repo}', but dom0 pinned"
                f" '{repo}' to repository {pin.repo_id.hex()}: refused; if the change is"
                " intended, run `qbackup repo trust`", old=pin.repo_id, new=repo_id)
        return False
