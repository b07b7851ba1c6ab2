# SPDX-License-Identifier: GPL-2.0-or-later
"""Garbage collection without keys: docs/GC.md is the design, this the code.

1. **mark** (no writer lock): label every blob reachable from the snapshots'
   clear refs (graph.Walk), in ``gc/state.sqlite`` on disk;
2. **plan**: per pack indexed when the mark began, its live bytes; a pack with
   none is deleted, one below ``repack_below`` percent live is repacked;
3. **repack** (no writer lock): copy the live blobs of those packs, as they
   are (ciphertext; each record's CRC checked), into new packs made durable
   and indexed before anything else happens;
4. **sweep**, in rounds of about ``ROUND_SECONDS`` under the writer lock:
   mark what snapshots were committed since, copy what they brought back to
   life, then in one durable index transaction unindex the round's packs and
   every indexed node no snapshot reaches, and only then delete the files.

Every backup session holds the writer lock from its first request to its
end, so none is open during a sweep round, and every snapshot committed
before the round is marked in it: a blob a session was told exists is
never deleted under it, and a commit never names a deleted blob.  Each step
is recorded in the state database, so a collection killed at any point
resumes where it was (``collect_garbage`` again); what it leaves is
consistent without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field

from . import graph, pack
from .fsdir import Dir
from .index import Index, IndexUnusable
from .lock import LockBusy, WriterLock
from .lock import describe as describe_holder
from .monitor import Monitor, Progress
from .storage import (
    LOCK,
    MAX_BLOB,
    Locked,
    Storage,
    StorageError,
    _bounds,
    _Config,
    _io,
    _read_config,
    _Tree,
    install_pack,
    open_index,
    read_snapshot,
    recover_orphans,
    snapshot_ids,
)

GC_DIR = "gc"
STATE = "state.sqlite"
STATE_FILES = (STATE, STATE + "-wal", STATE + "-shm", STATE + "-journal")
STATE_FORMAT = 1
DEFAULT_REPACK_BELOW = 70  # percent of a pack's bytes still live under which it is repacked
ROUND_SECONDS = 2.0  # a sweep round holds the writer lock about this long (at least one pack)
ROUND_ROWS = 8192  # and removes at most this many index rows (a pack may take several rounds)
LOCK_POLL = 0.5  # seconds between attempts at the writer lock
ROUND_PAUSE = 0.5  # between sweep rounds: a writer retrying for the lock (dom0: every 0.2 s) gets it
RECORD = pack.RECORD_HEADER_SIZE
_REFS_BATCH = 500  # blobs whose refs are looked up at once
_DEAD_ROWS = (  # (pack name, limit): rows placing a blob no snapshot reaches in that pack
    "SELECT b.id FROM idx.blobs AS b JOIN idx.packs AS p ON p.id = b.pack WHERE p.name = ?"
    " AND NOT EXISTS (SELECT 1 FROM label AS l WHERE l.id = b.id) ORDER BY b.id LIMIT ?"
)
_DEAD_NODES = (  # indexed blobs with refs that no snapshot reaches
    "SELECT r.id FROM idx.refs AS r JOIN idx.blobs AS b ON b.id = r.id"
    " WHERE NOT EXISTS (SELECT 1 FROM label AS l WHERE l.id = r.id)"
)
_PURGE = 256  # orphan refs rows deleted per transaction after the sweep

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS marked (id BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS packs0 (name TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS plan (
    name TEXT PRIMARY KEY, action TEXT NOT NULL, size INTEGER NOT NULL,
    live_blobs INTEGER NOT NULL, live_bytes INTEGER NOT NULL, rows INTEGER NOT NULL, status TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outputs (name TEXT PRIMARY KEY, status TEXT NOT NULL, size INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS copies (
    id BLOB PRIMARY KEY, pack TEXT NOT NULL, pos INTEGER NOT NULL, length INTEGER NOT NULL, type INTEGER NOT NULL
) WITHOUT ROWID;
"""
_PHASES = {"mark": 1, "plan": 2, "repack": 3, "sweep": 4}


class Refused(StorageError):
    """The repository is damaged where garbage collection must be sure (code ``damaged``)."""

    code = "damaged"


@dataclass
class Summary:
    """What a collection did (or, with ``dry_run``, would do)."""

    dry_run: bool = False
    snapshots: int = 0  # snapshots marked
    live_blobs: int = 0  # blobs they reach
    packs_deleted: int = 0  # packs holding no live blob
    packs_repacked: int = 0  # packs whose live blobs were copied, then deleted
    packs_written: int = 0  # new packs holding those copies
    packs_kept: int = 0  # planned but kept: a live blob in them fails its checks
    bytes_freed: int = 0  # pack bytes deleted minus pack bytes written
    bytes_copied: int = 0  # record bytes copied
    notes: list[str] = field(default_factory=list)  # what was kept and why

    def as_dict(self) -> dict:
        fields = dict(self.__dict__)
        fields.pop("notes")
        return fields


def collect_garbage(
    storage: Storage,
    name: str,
    *,
    repack_below: int = DEFAULT_REPACK_BELOW,
    dry_run: bool = False,
    progress: Progress | None = None,
    stop=None,
    holder: str = "",
) -> Summary:
    """Collect the garbage of repository ``name`` (see the module docstring).

    ``repack_below`` (0..100): a pack with live blobs is repacked when they
    make less than this percentage of its bytes (0: only packs holding no
    live blob are deleted).  ``dry_run`` marks and plans, changing nothing
    (an interrupted collection's state included).  ``progress(phase, done,
    total)`` is called about once a second; ``stop()`` returning True makes
    it raise ``monitor.Cancelled`` at the next safe point.  Raises
    ``Locked`` if another collection of the repository is running,
    ``Refused`` if a snapshot is unreadable or reaches ids the index lacks.
    """
    if type(repack_below) is not int or not 0 <= repack_below <= 100:
        raise StorageError("repack_below must be an integer 0..100", "bad_request")
    monitor = Monitor(progress, stop)
    holder = holder or f"qbackupd gc (pid {os.getpid()})"
    tree = storage.open_tree(name)
    try:
        with _io(f"garbage collection of {name!a}"):
            config = _read_config(tree)
            gcdir = _gc_dir(tree)
            with gcdir:
                try:
                    lock = WriterLock.acquire(gcdir, LOCK, holder)
                except LockBusy as e:
                    raise Locked(
                        f"a garbage collection of {name!a} is already running: {describe_holder(e.holder)}", e.holder
                    ) from None
                try:
                    for entry, is_dir in gcdir.names():  # packs a dead collector was writing
                        if entry.endswith(".tmp") and not is_dir:
                            gcdir.unlink(entry)
                    return _Collection(name, tree, gcdir, config, monitor, holder).run(repack_below, dry_run)
                finally:
                    lock.release()
    finally:
        tree.close()


def _gc_dir(tree: _Tree) -> Dir:
    if not tree.dir.exists(GC_DIR):
        with contextlib.suppress(FileExistsError):
            tree.dir.mkdir(GC_DIR)
            tree.dir.fsync()
    return tree.dir.sub(GC_DIR)


class _Collection:
    def __init__(self, name: str, tree: _Tree, gcdir: Dir, config: _Config, monitor: Monitor, holder: str):
        self.name = name
        self.tree = tree
        self.gcdir = gcdir
        self.pack_size = config.pack_size
        self.bounds = _bounds(config.pack_size)
        self.monitor = monitor
        self.holder = holder
        self.summary = Summary()
        self.index: Index | None = None
        self.db: sqlite3.Connection | None = None
        self.walk: graph.Walk | None = None
        self.outputs: list[_Output] = []  # to abort an unfinished one if the collection stops

    # --- state ---------------------------------------------------------------------

    def _open(self, path: str) -> None:
        """Open the index and the state (or scratch) database with the index attached."""
        try:
            self.index = open_index(self.tree)
        except IndexUnusable as e:
            raise StorageError(f"index is {e}: open the repository for writing (or reindex) first") from None
        self.db = graph.scratch(path, str(self.tree.index))
        self.db.executescript(_SCHEMA)
        self.walk = graph.Walk(self.db, self.monitor)

    def _reopen_index(self) -> None:
        """Fresh connections to the index file there is now (a rebuild may have replaced it)."""
        self.index.close()
        self.index = open_index(self.tree)
        self.db.execute("DETACH DATABASE idx")
        self.db.execute("ATTACH DATABASE ? AS idx", (str(self.tree.index),))

    def _close(self) -> None:
        for output in self.outputs:
            output.abort()
        for conn in (self.db, self.index):
            if conn is not None:
                conn.close()

    def _meta(self, key: str) -> int | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _drop_state(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
        for name in STATE_FILES:
            with contextlib.suppress(FileNotFoundError):
                self.gcdir.unlink(name)

    def _state(self, repack_below: int) -> int:
        """Open the state database: an interrupted collection's, or a new one. Returns its phase."""
        for name in STATE_FILES:
            self.gcdir.check_file(name)
        try:
            self._open(self.gcdir.join(STATE))
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            if self._meta("format") == STATE_FORMAT:
                phase = self._meta("phase")
                if phase in _PHASES.values():
                    log.info("repository %s: resuming an interrupted garbage collection", self.name)
                    return phase
        except sqlite3.DatabaseError as e:
            log.warning("repository %s: discarding unusable garbage collection state: %s", self.name, e)
        self._close()
        self._drop_state()
        self._open(self.gcdir.join(STATE))
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        with self.walk.transaction():
            self.db.executemany("INSERT INTO packs0 (name) VALUES (?)", ((n,) for n in self.index.packs()))
            self._set_meta("repack_below", repack_below)
            self._set_meta("phase", _PHASES["mark"])
            self._set_meta("format", STATE_FORMAT)
        return _PHASES["mark"]

    def _phase(self, phase: str) -> None:
        self._set_meta("phase", _PHASES[phase])

    # --- the collection ------------------------------------------------------------

    def run(self, repack_below: int, dry_run: bool) -> Summary:
        try:
            if dry_run:
                self.summary.dry_run = True
                self._open("")  # a private temporary database: an interrupted collection's state is kept
                with self.walk.transaction():
                    self.db.executemany("INSERT INTO packs0 (name) VALUES (?)", ((n,) for n in self.index.packs()))
                self._mark()
                self._plan(repack_below)
                return self._planned_summary()
            phase = self._state(repack_below)
            repack_below = self._meta("repack_below")
            if phase < _PHASES["repack"]:
                self._mark()
                self._plan(repack_below)
            if phase <= _PHASES["repack"]:
                self._repack()
            self._sweep()
            self._purge()
            self._final_summary()
            self._drop_state()
            return self.summary
        except Refused:
            self._close()
            self._drop_state()  # a later run starts afresh, once the damage is dealt with
            raise
        finally:
            self._close()

    def _mark(self) -> None:
        """Label everything the snapshots reach (those not marked yet)."""
        ids, _ = snapshot_ids(self.tree)
        self.monitor("mark", 0, len(ids), force=True)
        marked = {row[0] for row in self.db.execute("SELECT id FROM marked")}
        for done, id in enumerate(ids):
            self.monitor("mark", done, len(ids))
            if id in marked:
                continue
            try:
                _, refs = read_snapshot(self.tree, id)
            except FileNotFoundError:
                continue  # deleted meanwhile
            except (StorageError, OSError) as e:
                raise Refused(
                    f"snapshot {id.hex()} is unreadable ({e}): garbage collection deletes nothing while a "
                    "snapshot's references are unknown (delete the snapshot, or put its file back)"
                ) from None
            with self.walk.transaction():
                self.walk.seed(refs, 0)
                self.db.execute("INSERT INTO marked (id) VALUES (?)", (id,))
        self.walk.run()
        count, first = self.walk.unknown()
        if count:
            raise Refused(
                f"{count} ids the snapshots reach are not in the index (first {first.hex()}): garbage "
                "collection deletes nothing in a damaged repository (see `qbackupd check`)"
            )
        self.summary.snapshots = self.db.execute("SELECT count(*) FROM marked").fetchone()[0]

    def _plan(self, repack_below: int) -> None:
        """Decide, per pack indexed when the mark began, to delete, repack or keep it."""
        self.monitor("plan", 0, force=True)
        # live record bytes per pack, and the trailer bytes of its indexed records, which do
        # not count as its content (with small blobs the trailer is a large part of the file)
        rows = self.db.execute(
            "SELECT p.name, p.size, count(l.id), total(CASE WHEN l.id IS NULL THEN 0 ELSE b.length + ? END),"
            " count(b.id) FROM packs0 AS p0 JOIN idx.packs AS p ON p.name = p0.name"
            " LEFT JOIN idx.blobs AS b ON b.pack = p.id LEFT JOIN label AS l ON l.id = b.id"
            " GROUP BY p.id",
            (RECORD,),
        ).fetchall()
        refs_bytes = dict(
            self.db.execute(
                "SELECT p.name, total(length(r.refs)) FROM idx.refs AS r JOIN idx.blobs AS b ON b.id = r.id"
                " JOIN idx.packs AS p ON p.id = b.pack GROUP BY p.id"
            )
        )
        overhead = pack.HEADER_SIZE + pack.FOOTER_SIZE + 4  # header, footer, trailer count
        with self.walk.transaction():
            for name, size, live_blobs, live_bytes, entries in rows:
                if type(size) is not int or size <= 0:
                    continue  # a damaged index row: leave the pack alone
                content = size - overhead - entries * pack.ENTRY_SIZE - int(refs_bytes.get(name, 0))
                if live_blobs == 0:
                    action = "delete"
                elif live_bytes * 100 < repack_below * (content if content > 0 else size):
                    action = "repack"
                else:
                    continue
                self.db.execute(
                    "INSERT OR REPLACE INTO plan (name, action, size, live_blobs, live_bytes, rows, status)"
                    " VALUES (?, ?, ?, ?, ?, ?, 'pending')",
                    (name, action, size, live_blobs, int(live_bytes), entries),
                )
            # the index build the plan's rows belong to (see _round)
            self._set_meta("build", self.index.build() or -1)
            self._phase("repack")

    def _live_summary(self) -> Summary:
        """The summary, with the number of live blobs the mark found."""
        self.summary.live_blobs = self.walk.count()
        return self.summary

    def _planned_summary(self) -> Summary:
        s = self._live_summary()
        for action, count, size, live in self.db.execute(
            "SELECT action, count(*), total(size), total(live_bytes) FROM plan GROUP BY action"
        ):
            if action == "delete":
                s.packs_deleted = count
            else:
                s.packs_repacked = count
                s.bytes_copied = int(live)
                s.packs_written = -(-int(live) // self.pack_size)
            s.bytes_freed += int(size)
        s.bytes_freed -= s.bytes_copied
        return s

    # --- repack --------------------------------------------------------------------

    def _repack(self) -> None:
        """Copy the live blobs of the packs to repack into new packs (no writer lock)."""
        self._finish_outputs()
        total = self.db.execute("SELECT total(live_bytes) FROM plan WHERE action = 'repack'").fetchone()[0]
        todo = self.db.execute(
            "SELECT name FROM plan WHERE action = 'repack' AND status = 'pending' ORDER BY name"
        ).fetchall()
        output = _Output(self)
        self.monitor("repack", self.summary.bytes_copied, int(total), force=True)
        for (name,) in todo:
            if self._copy_live(name, output, "repack", int(total)):
                output.waiting.append(name)
        output.flush()
        with self.walk.transaction():
            self._phase("sweep")

    def _live_rows(self, name: str, skip_copied: bool, fresh: bool = False) -> list[tuple]:
        """(id, pos, length, type) of the live blobs the index places in pack ``name``
        (with ``fresh``: only those labelled since the plan, in the sweep)."""
        query = (
            "SELECT b.id, b.pos, b.length, b.type FROM idx.blobs AS b JOIN idx.packs AS p ON p.id = b.pack"
            f" JOIN {'fresh' if fresh else 'label'} AS l ON l.id = b.id WHERE p.name = ?"
        )
        if skip_copied:
            query += " AND NOT EXISTS (SELECT 1 FROM copies AS c WHERE c.id = b.id)"
        return self.db.execute(query + " ORDER BY b.pos", (name,)).fetchall()

    def _copy_live(self, name: str, output: "_Output", phase: str, total: int, fresh: bool = False) -> bool:
        """Copy the live blobs of pack ``name`` not copied yet into ``output``; False if it must be kept."""
        rows = self._live_rows(name, skip_copied=True, fresh=fresh)
        if not rows:
            return True
        try:
            fd = self.tree.open_pack(name)
        except OSError as e:
            self._keep(name, f"cannot be read ({e})")
            return False
        try:
            for start in range(0, len(rows), _REFS_BATCH):
                batch = rows[start : start + _REFS_BATCH]
                refs = self._refs([row[0] for row in batch])
                for id, pos, length, type_ in batch:
                    self.monitor(phase, self.summary.bytes_copied, total)
                    if not all(isinstance(v, int) for v in (pos, length, type_)) or not 0 <= length <= MAX_BLOB:
                        self._keep(name, f"index entry of blob {id.hex()} is out of bounds")
                        return False
                    try:
                        data = pack.read_blob(fd, id, type_, pos, length)
                    except pack.PackError as e:
                        self._keep(name, str(e))
                        return False
                    output.add(id, type_, data, refs.get(id, b""))
                    self.summary.bytes_copied += RECORD + length
        finally:
            os.close(fd)
        return True

    def _refs(self, ids: list[bytes]) -> dict[bytes, bytes]:
        """The (checked) ref lists of those of ``ids`` that have refs."""
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(f"SELECT id, refs FROM idx.refs WHERE id IN ({marks})", ids)
        return {id: b"".join(graph.split_refs(id, refs)) for id, refs in rows}

    def _keep(self, name: str, why: str) -> None:
        note = f"pack {name} kept: {why}"
        log.warning("repository %s: %s", self.name, note)
        self.summary.notes.append(note)
        with self.walk.transaction():
            self.db.execute("UPDATE plan SET status = 'kept' WHERE name = ?", (name,))

    def _finish_outputs(self) -> None:
        """Index the copies a killed collection had put in place but not recorded."""
        for name, in self.db.execute("SELECT name FROM outputs WHERE status = 'writing'").fetchall():
            try:
                fd = self.tree.open_pack(name)
                try:
                    trailer = pack.read_trailer(fd, self.bounds)
                finally:
                    os.close(fd)
            except (pack.PackError, OSError) as e:  # never put in place, or unreadable: copy again
                if not isinstance(e, FileNotFoundError):
                    log.warning("repository %s: copy pack %s is unreadable (%s)", self.name, name, e)
                with self.walk.transaction():
                    self.db.execute("DELETE FROM outputs WHERE name = ?", (name,))
                continue
            _Output(self).record(name, trailer)

    # --- sweep ---------------------------------------------------------------------

    def _sweep(self) -> None:
        """Delete the planned packs, in rounds under the writer lock."""
        total = self.db.execute("SELECT count(*) FROM plan").fetchone()[0]
        while True:
            pending = self.db.execute(
                "SELECT name, rows FROM plan WHERE status IN ('pending', 'copied') ORDER BY name"
            ).fetchall()
            if not pending:
                return
            self.monitor("sweep", total - len(pending), total, force=True)
            lock = self._writer_lock()
            try:
                self._round(pending, total)
            finally:
                lock.release()
            if self.db.execute("SELECT 1 FROM plan WHERE status IN ('pending', 'copied') LIMIT 1").fetchone():
                time.sleep(ROUND_PAUSE)  # let a writer that waits for the lock have it

    def _purge(self) -> None:
        """Delete the refs rows of the nodes the sweep unindexed (no writer lock)."""
        purged = 0
        self.monitor("purge", 0, force=True)
        while count := self.index.purge_orphan_refs(_PURGE):
            purged += count
            self.monitor("purge", purged)

    def _writer_lock(self) -> WriterLock:
        waited = 0.0
        while True:
            try:
                return WriterLock.acquire(self.tree.dir, LOCK, f"{self.holder} (sweep)")
            except LockBusy as e:
                self.monitor("wait", int(waited), force=waited == 0)
                if waited == 0:
                    log.info(
                        "repository %s: garbage collection waits for the writer lock (%s)",
                        self.name, describe_holder(e.holder),
                    )
                time.sleep(LOCK_POLL)
                waited += LOCK_POLL

    def _round(self, pending: list[tuple[str, int]], total: int) -> None:
        """One sweep round; the caller holds the writer lock."""
        start = time.monotonic()
        self._reopen_index()
        recover_orphans(self.name, self.tree, self.index, self.bounds)
        self._finish_outputs()
        self.walk.track_fresh = True
        self._mark()  # what was committed since
        # Fast path: if the index is the very build the plan read (no rebuild since), the
        # rows a planned pack still holds are dead or were labelled since: only those are
        # looked at. After a rebuild, rows may point at any copy: look at every live row.
        build = self.index.build()
        fast = build is not None and build == self._meta("build")
        batch = []
        rows = 0
        output = _Output(self)
        for name, pack_rows in pending:
            done = total - len(pending) + len(batch)
            self.monitor("sweep", done, total)
            if self._copy_live(name, output, "sweep", 0, fresh=fast):
                batch.append(name)
                rows += pack_rows
            if time.monotonic() - start > ROUND_SECONDS or rows >= ROUND_ROWS:
                break
        output.flush()
        # Every live blob of the batch must now be indexed elsewhere: point its rows at
        # its copy. Then the rows left in those packs are dead: remove up to ROUND_ROWS of
        # them (each removal dirties an index page; a pack of many small blobs takes
        # several rounds), each checked dead once more, and every indexed node no
        # snapshot reaches.
        budget = ROUND_ROWS
        dead: list[bytes] = []
        candidates = []
        for name in batch:
            if budget <= 0:
                break
            if not fast and not self._relocate(name):
                continue
            found = [row[0] for row in self.db.execute(_DEAD_ROWS, (name, budget))]
            if not found and self.index.count_rows(name):
                self._keep(name, "still holds live blobs after they were copied")  # never expected
                continue
            dead += found
            budget -= len(found)
            candidates.append(name)
        dead_nodes = [row[0] for row in self.db.execute(_DEAD_NODES)]
        sizes = dict(self.db.execute("SELECT name, size FROM plan"))
        ready = self.index.drop_rows(dead, dead_nodes, candidates)  # durable before any file goes
        shards = set()
        for name in ready:
            with self.tree.shard(name) as shard:
                with contextlib.suppress(FileNotFoundError):
                    shard.unlink(f"{name}.pack")
                shards.add(name[:2])
        for shard_name in shards:
            with contextlib.suppress(FileNotFoundError), self.tree.packs.sub(shard_name) as shard:
                shard.fsync()
        with self.walk.transaction():
            self.db.executemany("UPDATE plan SET status = 'done' WHERE name = ?", ((n,) for n in ready))
        for name in ready:
            log.info("repository %s: deleted pack %s (%d bytes)", self.name, name, sizes.get(name, 0))
        log.info(
            "repository %s: sweep round: %d index rows removed, %d packs deleted in %.2f s under the writer lock",
            self.name, len(dead), len(ready), time.monotonic() - start,
        )

    def _relocate(self, name: str) -> bool:
        """Point the index rows of the live blobs in pack ``name`` at their copies; False to keep it."""
        rows = self._live_rows(name, skip_copied=False)
        if not rows:
            return True
        by_pack: dict[str, list[pack.Entry]] = {}
        indexed = self.index.packs()
        for id, _, _, _ in rows:
            copy = self.db.execute("SELECT pack, pos, length, type FROM copies WHERE id = ?", (id,)).fetchone()
            if copy is None or copy[0] not in indexed:
                self._keep(name, f"holds live blob {id.hex()} without a copy")
                return False
            refs = self._refs([id]).get(id, b"")
            by_pack.setdefault(copy[0], []).append(pack.Entry(id, copy[3], copy[1], copy[2], refs))
        for copy_pack, entries in by_pack.items():
            self.index.move_blobs(copy_pack, indexed[copy_pack], entries)
        return not self._live_rows(name, skip_copied=False)

    def _final_summary(self) -> None:
        s = self._live_summary()
        for action, status, count, size in self.db.execute(
            "SELECT action, status, count(*), total(size) FROM plan GROUP BY action, status"
        ):
            if status == "kept":
                s.packs_kept += count
            elif status == "done":
                s.bytes_freed += int(size)
                if action == "delete":
                    s.packs_deleted += count
                else:
                    s.packs_repacked += count
        written, written_size = self.db.execute(
            "SELECT count(*), total(size) FROM outputs WHERE status = 'indexed'"
        ).fetchone()
        s.packs_written = written
        s.bytes_freed -= int(written_size)


class _Output:
    """The pack the live copies go into (in gc/), sealed, put in place and indexed when full."""

    def __init__(self, collection: _Collection):
        self.c = collection
        self.writer: pack.PackWriter | None = None
        self.waiting: list[str] = []  # source packs fully copied once this output is indexed
        collection.outputs.append(self)

    def abort(self) -> None:
        """Drop an unfinished output (the collection stopped): its blobs are copied again."""
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.abort()

    def add(self, id: bytes, type: int, data: bytes, refs: bytes) -> None:
        if self.writer is None:
            self.writer = pack.PackWriter(self.c.gcdir, f"{secrets.token_hex(16)}.tmp")
        self.writer.add(id, type, data, refs)
        if self.writer.size >= self.c.pack_size or len(self.writer) >= pack.MAX_ENTRIES:
            self.flush()

    def flush(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            name = writer.name.removesuffix(".tmp")
            with self.c.walk.transaction():  # recorded first: a killed collection finds it again
                self.c.db.execute("INSERT OR REPLACE INTO outputs (name, status) VALUES (?, 'writing')", (name,))
            self.record(name, install_pack(self.c.tree, writer))
        if self.waiting:
            with self.c.walk.transaction():
                self.c.db.executemany(
                    "UPDATE plan SET status = 'copied' WHERE name = ?", ((n,) for n in self.waiting)
                )
            self.waiting = []

    def record(self, name: str, trailer: pack.Trailer) -> None:
        """Index a durable copy pack, then remember where each copy is."""
        self.c.index.move_blobs(name, trailer.file_size, trailer.entries)
        with self.c.walk.transaction():
            self.c.db.executemany(
                "INSERT OR REPLACE INTO copies (id, pack, pos, length, type) VALUES (?, ?, ?, ?, ?)",
                ((e.id, name, e.offset, e.length, e.type) for e in trailer.entries),
            )
            self.c.db.execute(
                "UPDATE outputs SET status = 'indexed', size = ? WHERE name = ?", (trailer.file_size, name)
            )
