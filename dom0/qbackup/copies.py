# SPDX-License-Identifier: GPL-2.0-or-later
"""dom0's point-in-time copies of volumes, which one is the base of the next
incremental of a repository, and what to remove (docs/CHANGES.md).

A backup first takes a read-only copy of every volume it will send (a
reflink copy beside a file-reflink image, a read-only thin snapshot of an
lvm_thin volume), then reads only those copies. After the repository has
committed the snapshot that read them, they become the bases of the next
incremental, and the bases they replace are removed. Other volumes (the
legacy `file` driver, plain files and devices, a file-reflink pool without
reflinks) are opened once, when the copies are taken, and read through that
descriptor; a regular file that changes meanwhile fails the backup.

dom0 records the copies of each repository in `<repo_id>.copies.json` in its
state directory. A base is trusted only when all of these hold:

- it is in this repository's record (the file is named by, and names, the
  repository id);
- the record names the snapshot that read it, that snapshot is in the
  repository's authenticated history, and its manifest names this copy's
  random id for this volume (`source.copy`): a copy from another
  repository, or from another snapshot, is never taken for it;
- the copy on disk is the one recorded: same inode, size, mtime and ctime
  (reflink), or same LV uuid, thin id and size, still read-only (lvm).

Otherwise the volume is read in full (`fallback`, with the reason), and the
chunks whose ids the repository already holds are still not sent.

Names can never be Qubes' own (checked against qubes/storage/{reflink,lvm}.py
R4.2): `{vid}.qbackup-{tag}-{id}.img` beside `{vid}.img` (no `~`, not
`{vid}.img.N@...Z`), and LV `qbackup-{tag}-{id}-{qube}.{volume}-back`
(qubesd's revision patterns all start with `vm-`; the `-back` suffix keeps
qubesd's list_volumes from counting the LV as a pool volume); `tag` is the
first 16 hex digits of the repository id.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from qbackup import fiemap, thin
from qbackup.backup import Previous, VolumeSource
from qbackup.errors import QbackupError
from qbackup.fiemap import NoReflink, Untrackable
from qbackup.qubes import QubeInfo, VolumeInfo
from qbackup.state import State
from qbackup.tools import ToolError
from qbackup.volume import VolumeFile

FORMAT = "qbackup-copies"
VERSION = 1
TAG_BYTES = 8
ID_BYTES = 16
DEV_DIR = "/dev"  # where lvm_thin copies are read: DEV_DIR/VG/LV (tests move it)
REFLINK_NAME = re.compile(r"(?P<stem>.+)\.qbackup-(?P<tag>[0-9a-f]{16})-(?P<id>[0-9a-f]{12})\.img")
LVM_NAME = re.compile(r"qbackup-(?P<tag>[0-9a-f]{16})-(?P<id>[0-9a-f]{12})-.*-back")
REFLINK, LVM = "reflink", "lvm"
SHUTDOWN, LIVE = "shutdown", "live"


def tag_of(repo_id: bytes) -> str:
    """The repository's tag in copy names."""
    return repo_id[:TAG_BYTES].hex()


def tag_in(kind: str, where: str) -> str | None:
    """The repository tag in a copy's name, None if it is not a qbackup name."""
    name = os.path.basename(where) if kind == REFLINK else where.partition("/")[2]
    match = (REFLINK_NAME if kind == REFLINK else LVM_NAME).fullmatch(name)
    return match["tag"] if match else None


@dataclass
class Copy:
    """One copy of one volume, as dom0 records it."""
    id: bytes
    qube: str
    volume: str
    kind: str  # REFLINK | LVM
    where: str  # reflink: the copy's path; lvm: VG/LV
    pool: str  # lvm: the thin pool LV; reflink: ""
    state: str  # SHUTDOWN | LIVE
    taken: float
    fingerprint: dict | None = None  # None: being made
    snapshot: bytes | None = None  # the snapshot that read it, once committed

    @property
    def key(self) -> str:
        return f"{self.qube}:{self.volume}"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id.hex(), "qube": self.qube, "volume": self.volume,
                "kind": self.kind, "where": self.where, "pool": self.pool,
                "state": self.state, "taken": self.taken, "fingerprint": self.fingerprint,
                "snapshot": self.snapshot.hex() if self.snapshot else None}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Copy":
        copy = cls(bytes.fromhex(doc["id"]), str(doc["qube"]), str(doc["volume"]),
                   str(doc["kind"]), str(doc["where"]), str(doc["pool"]), str(doc["state"]),
                   float(doc["taken"]), doc["fingerprint"],
                   bytes.fromhex(doc["snapshot"]) if doc["snapshot"] else None)
        if (len(copy.id) != ID_BYTES or copy.kind not in (REFLINK, LVM)
                or copy.state not in (SHUTDOWN, LIVE)
                or not (copy.fingerprint is None or isinstance(copy.fingerprint, dict))
                or not (copy.snapshot is None or len(copy.snapshot) == 32)):
            raise ValueError(f"bad copy entry {doc.get('where')!r}")
        return copy

    def describe(self) -> str:
        return f"{self.key} {self.where}"


@dataclass
class Record:
    copies: list[Copy] = field(default_factory=list)
    run: dict | None = None  # the backup in progress: {"volumes": [keys], "live": bool}


@dataclass
class Leftover:
    """A copy to remove (`copy`, or a name found on disk that dom0 did not record)."""
    where: str
    kind: str
    why: str
    copy: Copy | None = None


@dataclass
class Plan:
    """What the record and the history say (reconcile)."""
    bases: dict[str, Copy]
    pending: dict[str, Copy]
    leftovers: list[Leftover]
    foreign: list[str]  # copies of other repositories found on disk: never touched
    held: list[Copy] = field(default_factory=list)  # read by a snapshot that is unreadable now


class Store:
    """The record file of one repository in dom0's state directory."""

    def __init__(self, state: State, repo_id: bytes):
        self.state = state
        self.repo_id = repo_id
        self.name = repo_id.hex() + ".copies"
        self.path = os.path.join(state.directory, self.name + ".json")

    def load(self) -> Record:
        doc = self.state.read_record(self.name)
        if doc is None:
            return Record()
        try:
            if (doc["format"] != FORMAT or doc["version"] != VERSION
                    or doc["repo_id"] != self.repo_id.hex()):
                raise ValueError("not a version 1 copies record of this repository")
            run = doc["run"]
            if run is not None and not (isinstance(run, dict) and isinstance(run["volumes"], list)):
                raise ValueError("bad run")
            return Record([Copy.from_json(c) for c in doc["copies"]], run)
        except (KeyError, TypeError, ValueError) as e:
            raise QbackupError(f"{self.path} is corrupt ({e}); removing it makes the next "
                               "backup read every volume in full") from None

    def save(self, record: Record) -> None:
        doc = {"format": FORMAT, "version": VERSION, "repo_id": self.repo_id.hex(),
               "copies": [c.to_json() for c in record.copies], "run": record.run}
        self.state.write_record(self.name, doc)


@contextlib.contextmanager
def run_lock(state: State, repo_id: bytes) -> Iterator[None]:
    """One backup or cleanup of a repository at a time in this dom0."""
    try:
        os.makedirs(state.directory, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(state.directory, repo_id.hex() + ".run.lock"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise QbackupError(f"cannot open state in {state.directory}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QbackupError("another qbackup backup or cleanup of this repository is "
                               "running in dom0") from None
        yield
    finally:
        os.close(fd)


# -- names ---------------------------------------------------------------------

def reflink_name(image: str, tag: str, copy_id: bytes) -> str:
    """The copy's path, beside the committed image `{vid}.img`."""
    return f"{image.removesuffix('.img')}.qbackup-{tag}-{copy_id.hex()[:12]}.img"


def lvm_name(tag: str, copy_id: bytes, qube: str, volume: str) -> str:
    head, tail = f"qbackup-{tag}-{copy_id.hex()[:12]}-", "-back"
    return head + f"{qube}.{volume}"[:127 - len(head) - len(tail)] + tail


# -- fingerprints, opening, removing -----------------------------------------

def _reflink_fingerprint(st: os.stat_result) -> dict:
    return {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def _lvm_fingerprint(info: thin.LvInfo) -> dict:
    return {"uuid": info.uuid, "thin_id": info.thin_id, "size": info.size}


class Untrusted(QbackupError):
    """A recorded copy is not what dom0 made (why is the message)."""


def _split(where: str) -> tuple[str, str]:
    vg, _, lv = where.partition("/")
    return vg, lv


def _lvm_current(copy: Copy) -> thin.LvInfo:
    vg, lv = _split(copy.where)
    info = thin.lv_info(vg, [lv]).get(lv)
    if info is None:
        raise Untrusted(f"{copy.where} is gone")
    if _lvm_fingerprint(info) != copy.fingerprint or not info.read_only or info.pool != copy.pool:
        raise Untrusted(f"{copy.where} is not the snapshot dom0 made (replaced or made writable)")
    return info


def open_copy(copy: Copy) -> VolumeFile:
    """Open a recorded copy for reading, checking it is the one dom0 made."""
    if copy.fingerprint is None:
        raise Untrusted("it was never finished")
    if copy.kind == REFLINK:
        vf = VolumeFile(copy.where, nofollow=True)
        if _reflink_fingerprint(os.fstat(vf.fd)) != copy.fingerprint:
            vf.close()
            raise Untrusted(f"{copy.where} was changed or replaced since it was made")
        return vf
    info = _lvm_current(copy)
    vg, lv = _split(copy.where)
    if len(info.attr) > 4 and info.attr[4] != "a":
        thin.activate(vg, lv)
    return VolumeFile(f"{DEV_DIR}/{vg}/{lv}")


def exists(kind: str, where: str) -> bool:
    if kind == REFLINK:
        return os.path.lexists(where)
    vg, lv = _split(where)
    return lv in thin.lv_info(vg, [lv])


def remove(kind: str, where: str) -> None:
    """Remove a copy (nothing if it is gone already)."""
    if kind == REFLINK:
        try:
            os.unlink(where)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise QbackupError(f"cannot remove {where}: {e.strerror}") from None
        return
    if exists(kind, where):
        thin.remove(*_split(where))


# -- taking copies -------------------------------------------------------------

def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_reflink(source: str, target: str) -> tuple[VolumeFile, dict]:
    """A read-only reflink copy of `source` at `target`, opened; NoReflink
    if the file system cannot make one (nothing is left behind then)."""
    try:
        src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise QbackupError(f"cannot open {source}: {e.strerror}") from None
    try:
        try:
            dst = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o400)
        except OSError as e:
            raise QbackupError(f"cannot create {target}: {e.strerror}") from None
        try:
            fiemap.clone(src, dst)
            os.fsync(dst)
            _fsync_dir(target)
        except BaseException as e:
            os.close(dst)
            os.unlink(target)
            if isinstance(e, OSError):
                raise QbackupError(f"cannot copy {source} to {target}: {e.strerror}") from None
            raise
    finally:
        os.close(src)
    vf = VolumeFile(target, dst)
    return vf, _reflink_fingerprint(os.fstat(dst))


def make_lvm(vg: str, origin: str, name: str, pool: str) -> tuple[VolumeFile, dict]:
    """A read-only thin snapshot VG/NAME of VG/ORIGIN, opened."""
    for attempt in range(3):
        try:
            thin.snapshot(vg, origin, name)
            break
        except ToolError as e:  # the LV may be between its two renames (qube shutting down)
            if attempt == 2 or "find" not in str(e).lower():
                raise
            time.sleep(1)
    info = thin.lv_info(vg, [name]).get(name)
    if info is None or info.pool != pool or not info.read_only:
        raise QbackupError(f"lvm made {vg}/{name} but does not show it as a read-only "
                           f"snapshot in thin pool {vg}/{pool}")
    return VolumeFile(f"{DEV_DIR}/{vg}/{name}"), _lvm_fingerprint(info)


# -- reconciling the record with the history and the disk ---------------------

def _named(history: Sequence[Any]) -> dict[tuple[bytes, str], Any]:
    """{(copy id, "qube:volume"): newest snapshot whose manifest names that copy}."""
    named = {}
    for snap in history:  # oldest first: newer ones overwrite
        for qube, entry in snap.qubes.items():
            for volume, vol in entry["volumes"].items():
                source = vol.get("source")
                if source and source["copy"] is not None:
                    named[(source["copy"], f"{qube}:{volume}")] = snap
    return named


def reconcile(record: Record, history: Sequence[Any], alive: set[str] | None,
              found: dict[str, str], tag: str, committed: dict[bytes, Any] | None = None) -> Plan:
    """Which recorded copies are bases, which wait for a resume, and what is
    left over; promotes (in `record`) copies a committed snapshot names.

    `history`: authenticated snapshots (id, time, qubes), oldest first;
    `alive`: names of the qubes that exist (None: unknown); `found`: {where:
    kind} of copies with this repository's tag on disk; `committed`: {copy
    id: snapshot} just committed (not yet in `history`).

    A copy no snapshot names waits for a resume only while the record
    holds an unfinished run that includes its volume, and only the newest
    of a volume, taken after its base."""
    named = _named(history)
    damaged = {d.id for d in getattr(history, "damaged", ())}
    held: list[Copy] = []
    for copy_id, snap in (committed or {}).items():
        for copy in record.copies:
            if copy.id == copy_id:
                named[(copy_id, copy.key)] = snap
    leftovers: list[Leftover] = []
    bases: dict[str, tuple[Copy, Any]] = {}
    pending: dict[str, Copy] = {}
    unfinished = set(record.run["volumes"]) if record.run else set()

    def drop(copy: Copy, why: str) -> None:
        leftovers.append(Leftover(copy.where, copy.kind, why, copy))

    for copy in record.copies:
        snap = named.get((copy.id, copy.key))
        if copy.fingerprint is None:
            drop(copy, "its making was interrupted")
        elif alive is not None and copy.qube not in alive:
            drop(copy, f"qube {copy.qube} no longer exists")
        elif snap is not None:
            copy.snapshot = snap.id
            older = bases.get(copy.key)
            if older is None or (older[1].time, older[1].id) < (snap.time, snap.id):
                if older is not None:
                    drop(older[0], "a newer copy is the base")
                bases[copy.key] = (copy, snap)
            else:
                drop(copy, "a newer copy is the base")
        elif copy.snapshot is not None and copy.snapshot in damaged:
            held.append(copy)  # neither trusted nor removed while its snapshot is unreadable
        elif copy.snapshot is not None:
            drop(copy, f"snapshot {copy.snapshot.hex()[:16]}, which read it, is no longer "
                       "in the repository")
        elif copy.key not in unfinished:
            drop(copy, "no snapshot read it, and no unfinished backup will")
        else:
            older_pending = pending.get(copy.key)
            if older_pending is not None and older_pending.taken > copy.taken:
                drop(copy, "an interrupted backup left a newer copy")
                continue
            if older_pending is not None:
                drop(older_pending, "an interrupted backup left a newer copy")
            pending[copy.key] = copy
    for key, copy in list(pending.items()):
        if key in bases and bases[key][0].taken >= copy.taken:
            drop(copy, "a newer copy is the base")
            del pending[key]
    recorded = {c.where for c in record.copies}
    for where, kind in sorted(found.items()):
        if where not in recorded:
            leftovers.append(Leftover(where, kind, "dom0 has no record of it (left by an "
                                      "interrupted backup)"))
    return Plan({k: c for k, (c, _) in bases.items()}, pending, leftovers, [], held)


def scan(qubes: Sequence[QubeInfo], record: Record, tag: str) -> tuple[dict[str, str], list[str]]:
    """Copies qbackup made, found on disk in the pools the qubes use:
    ({where: kind} of this repository's, [where] of other repositories')."""
    roots, vgs = set(), set()
    for qube in qubes:
        for vol in qube.volumes.values():
            if vol.driver == "file-reflink" and vol.path and vol.vid \
                    and vol.path.endswith("/" + vol.vid + ".img"):
                roots.add(vol.path[:-len(vol.vid) - len(".img") - 1])
            elif vol.driver == "lvm_thin" and "/" in vol.vid:
                vgs.add(vol.vid.split("/")[0])
    for copy in record.copies:
        if copy.kind == LVM:
            vgs.add(_split(copy.where)[0])
    ours: dict[str, str] = {}
    foreign: set[str] = set()

    def sort(where: str, kind: str) -> None:
        found = tag_in(kind, where)
        if found is not None:
            (ours.__setitem__(where, kind) if found == tag else foreign.add(where))

    for root in sorted(roots):
        for sub in ("appvms", "vm-templates"):
            for path in glob.glob(os.path.join(glob.escape(root), sub, "*", "*.qbackup-*.img")):
                sort(path, REFLINK)
    for copy in record.copies:  # a copy beside an image of a pool no qube uses now
        if copy.kind == REFLINK and os.path.lexists(copy.where):
            sort(copy.where, REFLINK)
    for vg in sorted(vgs):
        for info in thin.list_lvs(vg):
            sort(f"{vg}/{info.name}", LVM)
    return ours, sorted(foreign)


# -- change tracking -------------------------------------------------------------

def chunk_runs(byte_ranges: list[tuple[int, int]], chunk_size: int) -> list[tuple[int, int]]:
    """Chunk index runs [first, end) that overlap the byte ranges, merged."""
    runs: list[tuple[int, int]] = []
    for start, end in byte_ranges:
        if end <= start:
            continue
        first, last = start // chunk_size, -(-end // chunk_size)
        if runs and runs[-1][1] >= first:
            runs[-1] = (runs[-1][0], max(runs[-1][1], last))
        else:
            runs.append((first, last))
    return runs


@dataclass
class _Volume:
    """One volume of this run, while its copy is taken and compared."""
    qube: QubeInfo
    info: VolumeInfo
    state: str
    taken: float = 0.0
    copy: Copy | None = None
    file: VolumeFile | None = None
    base: Copy | None = None
    previous: Previous | None = None
    changed: list[tuple[int, int]] | None = None
    how: str = "full"
    why: str | None = None

    @property
    def key(self) -> str:
        return f"{self.qube.name}:{self.info.name}"

    def fallback(self, why: str) -> None:
        self.how, self.why, self.changed, self.previous = "fallback", why, None, None


class Copies:
    """The copies of one repository, for one backup (prepare, committed) or
    cleanup. Use as a context manager: it holds the run lock and closes
    every volume it opened."""

    def __init__(self, state: State, repo_id: bytes, chunk_size: int):
        self.state = state
        self.store = Store(state, repo_id)
        self.tag = tag_of(repo_id)
        self.chunk_size = chunk_size
        self.record = Record()
        self._volumes: list[_Volume] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "Copies":
        self._stack.enter_context(run_lock(self.state, self.store.repo_id))
        self.record = self.store.load()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for vol in self._volumes:
            if vol.file is not None:
                vol.file.close()
        self._stack.close()

    def plan(self, history: Sequence[Any], qubes: Sequence[QubeInfo],
             committed: dict[bytes, Any] | None = None) -> Plan:
        found, foreign = scan(qubes, self.record, self.tag)
        plan = reconcile(self.record, history, {q.name for q in qubes}, found, self.tag,
                         committed)
        plan.foreign = foreign
        return plan

    # -- a backup

    def prepare(self, targets: list[tuple[QubeInfo, VolumeInfo]], history: Sequence[Any],
                qubes: Sequence[QubeInfo], *, live: bool = False, full: bool = False
                ) -> list[VolumeSource]:
        """Take (or, resuming, reopen) a copy of every target volume, then
        find what changed since each one's base; the engine's sources."""
        plan = self.plan(history, qubes)  # promotions are saved with the new copies
        self._volumes = [_Volume(q, v, LIVE if live and v.live_path else SHUTDOWN)
                         for q, v in targets]
        keys = sorted(v.key for v in self._volumes)
        run = self.record.run
        resume = run is not None and run.get("volumes") == keys and run.get("live") == live
        self.record.run = {"volumes": keys, "live": live}
        self._take(plan.pending if resume else {})
        by_id = {s.id: s for s in history}
        for vol in self._volumes:
            self._choose_base(vol, plan.bases.get(vol.key), by_id, full)
        self._track_reflink()
        self._track_lvm()
        return [self._source(vol) for vol in self._volumes]

    def _take(self, pending: dict[str, Copy]) -> None:
        """The snapshot phase: every copy first, within seconds."""
        new: list[_Volume] = []
        for vol in self._volumes:
            copy = pending.get(vol.key)
            if copy is not None and copy.state == vol.state:
                try:
                    vol.file, vol.copy, vol.taken = open_copy(copy), copy, copy.taken
                    continue
                except (Untrusted, QbackupError):
                    pass  # a new copy is taken; the old one is left over
            new.append(vol)
        for vol in new:  # recorded before they exist: an interruption leaves no unknown name
            vol.copy = self._new_copy(vol)
            if vol.copy is not None:
                self.record.copies.append(vol.copy)
        self.store.save(self.record)
        try:
            for vol in new:
                self._make(vol)
        except BaseException:  # this run's new copies go; resumed ones stay pending
            for vol in new:
                if vol.file is not None:
                    vol.file.close()
                    vol.file = None
                if vol.copy is not None and vol.copy in self.record.copies:
                    with contextlib.suppress(QbackupError):
                        remove(vol.copy.kind, vol.copy.where)
                    self.record.copies.remove(vol.copy)
            self.store.save(self.record)
            raise
        self.store.save(self.record)

    def _new_copy(self, vol: _Volume) -> Copy | None:
        """The record of the copy this volume will get (None: read in place)."""
        info, copy_id = vol.info, os.urandom(ID_BYTES)
        if info.driver == "file-reflink" and info.path:
            where, pool, kind = reflink_name(info.path, self.tag, copy_id), "", REFLINK
        elif info.driver == "lvm_thin" and "/" in info.vid and info.thin_pool:
            vg, _ = _split(info.vid)
            where = f"{vg}/{lvm_name(self.tag, copy_id, vol.qube.name, info.name)}"
            pool, kind = info.thin_pool, LVM
        else:
            return None
        return Copy(copy_id, vol.qube.name, info.name, kind, where, pool, vol.state, time.time())

    def _make(self, vol: _Volume) -> None:
        info, copy = vol.info, vol.copy
        source = info.live_path if vol.state == LIVE else info.path
        vol.taken = time.time()
        where = f"{vol.key}: cannot take a copy"
        try:
            if copy is None:  # live_path is None for these: vol.state is SHUTDOWN
                vol.file = VolumeFile(source)
                vol.why = ("a legacy 'file' pool: no change tracking" if info.driver == "file"
                           else "a plain file or device: no change tracking")
                return
            copy.taken = vol.taken
            if copy.kind == REFLINK:
                vol.file, copy.fingerprint = make_reflink(source, copy.where)
            else:
                vg, lv = _split(copy.where)
                origin = _split(info.vid)[1] + ("-snap" if vol.state == LIVE else "")
                vol.file, copy.fingerprint = make_lvm(vg, origin, lv, copy.pool)
        except NoReflink as e:
            self.record.copies.remove(copy)
            vol.copy = None
            if vol.state == LIVE:
                raise QbackupError(f"{where} of the running qube's volume: {e}") from None
            vol.file = VolumeFile(source)
            vol.fallback(f"{e}: read in full from the image, held open since the copies "
                         "were taken")
        except (QbackupError, OSError) as e:
            raise QbackupError(f"{where}: {e}") from None

    def _choose_base(self, vol: _Volume, base: Copy | None, by_id: dict[bytes, Any],
                     full: bool) -> None:
        if vol.copy is None:
            return  # read in place: how and why are set
        if full:
            vol.how, vol.why = "full", "--full"
            return
        if base is None:
            vol.how, vol.why = "full", "no base copy yet for this repository"
            return
        if base.kind != vol.copy.kind or base.pool != vol.copy.pool:
            vol.fallback(f"the base copy {base.where} is in another pool")
            return
        entry = by_id[base.snapshot].qubes[vol.qube.name]["volumes"][vol.info.name]
        vol.base = base
        vol.previous = Previous(entry["root"], entry["depth"], entry["chunks"], entry["size"])
        vol.how, vol.why = "changed", None

    def _track_reflink(self) -> None:
        for vol in self._volumes:
            if vol.how != "changed" or vol.base.kind != REFLINK:
                continue
            try:
                with contextlib.closing(open_copy(vol.base)) as base:
                    ranges = fiemap.changed_ranges(base.fd, base.size, vol.file.fd, vol.file.size)
                vol.changed = chunk_runs(ranges, self.chunk_size)
            except (Untrusted, Untrackable) as e:
                vol.fallback(f"base copy not usable: {e}")
            except (QbackupError, OSError) as e:
                vol.fallback(f"base copy not usable: {getattr(e, 'strerror', None) or e}")

    def _track_lvm(self) -> None:
        """thin_delta for every lvm_thin volume with a base: one reserved
        metadata snapshot per thin pool, for all its volumes."""
        by_pool: dict[tuple[str, str], list[tuple[_Volume, int, int]]] = {}
        for vol in self._volumes:
            if vol.how == "changed" and vol.base.kind == LVM:
                try:
                    old_id, new_id = _lvm_current(vol.base).thin_id, _lvm_current(vol.copy).thin_id
                except (Untrusted, ToolError) as e:
                    vol.fallback(f"base copy not usable: {e}")
                    continue
                pool = (_split(vol.copy.where)[0], vol.copy.pool)
                by_pool.setdefault(pool, []).append((vol, old_id, new_id))
        for (vg, pool), pairs in sorted(by_pool.items(), key=lambda item: item[0]):
            try:
                with thin.metadata_snapshot(vg, pool, self.state.directory) as metadata:
                    deltas = [thin.delta(metadata, old_id, new_id) for _, old_id, new_id in pairs]
            except ToolError as e:
                for vol, _, _ in pairs:
                    vol.fallback(f"thin_delta could not be used: {e}")
                continue
            for (vol, _, _), (block, blocks) in zip(pairs, deltas):
                vol.changed = chunk_runs([(b * block, e * block) for b, e in blocks],
                                         self.chunk_size)

    def _source(self, vol: _Volume) -> VolumeSource:
        origin = {"state": vol.state, "taken": float(vol.taken),
                  "copy": vol.copy.id if vol.copy is not None else None}
        return VolumeSource(vol.qube.name, vol.info.name, vol.file.path, vol.file.size,
                            vol.info.settings(), file=vol.file, previous=vol.previous,
                            changed=vol.changed, origin=origin, how=vol.how, why=vol.why)

    def committed(self, snapshot: Any, history: Sequence[Any], qubes: Sequence[QubeInfo]
                  ) -> tuple[list[Leftover], list[str]]:
        """After the repository committed `snapshot` (id, time, qubes): its
        copies are the new bases; remove what is left over. Returns what was
        removed and the problems met (the snapshot stands either way)."""
        # Saved once, after the removals: killed before, the next run finds
        # the same from the manifests (reconcile).
        used = {vol.copy.id: snapshot for vol in self._volumes if vol.copy is not None}
        self.record.run = None
        for copy in self.record.copies:
            if copy.id in used:
                copy.snapshot = snapshot.id
        for vol in self._volumes:
            if vol.file is not None:
                vol.file.close()
        plan = self.plan(history, qubes, committed=used)
        return self.remove(plan.leftovers)

    def remove(self, leftovers: list[Leftover]) -> tuple[list[Leftover], list[str]]:
        """Remove copies; drop them from the record. (removed, problems).
        Nothing whose name lacks this repository's tag is ever removed (a
        record entry naming one is only dropped)."""
        removed, problems = [], []
        for leftover in leftovers:
            if tag_in(leftover.kind, leftover.where) != self.tag:
                problems.append(f"{leftover.where} is not a copy of this repository: "
                                "forgotten, not removed")
                if leftover.copy is not None:
                    self.record.copies.remove(leftover.copy)
                continue
            try:
                remove(leftover.kind, leftover.where)
            except QbackupError as e:
                problems.append(f"cannot remove {leftover.where}: {e}")
                continue
            removed.append(leftover)
            if leftover.copy is not None:
                self.record.copies.remove(leftover.copy)
        self.store.save(self.record)
        return removed, problems

