# SPDX-License-Identifier: GPL-2.0-or-later
"""SQLite (WAL) index of a repository's sealed packs.

Maps blob id -> (pack, offset, length, type) and keeps each blob's clear ref
list, on disk so memory stays bounded for millions of blobs.  The index is
derived data: it only ever names sealed, fsynced packs, and it can be rebuilt
from the pack trailers at any time.  A committed transaction is durable
(``synchronous=FULL``, one WAL fsync per sealed pack): a snapshot file is
written only after the index rows of everything it references, and readers,
which never repair the index, must still find them after a power loss.  A missing, unreadable or incomplete
index is reported as ``IndexUnusable`` so the caller can rebuild it; the
``format`` row in ``meta`` is written last, so an interrupted rebuild is
incomplete, never half-trusted.  Schema: docs/FORMAT.md.
"""

import os
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .pack import Entry

INDEX_FORMAT = 2
# Format 1 kept the refs in a WITHOUT ROWID table: its rows (a node's refs, up to
# 128 KiB) live in the B-tree itself, and looking an id up there costs ~20 times
# a lookup in `blobs` — the garbage collector's mark does one per blob reached.
# Format 2 is the same table with a rowid (the id in its own small index). A
# writer's open migrates format 1 in place (one transaction, the size of the
# nodes); readers use either, the queries being the same.
READABLE_FORMATS = (1, INDEX_FORMAT)
_QUERY_CHUNK = 500  # ids per "IN (...)" query
_CACHE_KIB = 32768  # SQLite page cache per connection (an upper bound, filled lazily)

_SCHEMA = """
BEGIN;
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE packs (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, size INTEGER NOT NULL);
CREATE TABLE blobs (
    id BLOB PRIMARY KEY, pack INTEGER NOT NULL, pos INTEGER NOT NULL,
    length INTEGER NOT NULL, type INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX blobs_by_pack ON blobs (pack);
CREATE TABLE refs (id BLOB PRIMARY KEY, refs BLOB NOT NULL);
COMMIT;
"""


def _new_build() -> int:
    return secrets.randbits(62)


@contextmanager
def transaction(conn: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[None]:
    """One transaction on a connection in autocommit mode: committed, or rolled back on any error."""
    conn.execute(begin)
    try:
        yield
    except BaseException:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the original error says more; SQLite rolls back on close anyway
        raise
    conn.execute("COMMIT")


class IndexUnusable(Exception):
    """The index is missing, not a database, damaged, incomplete or of another format."""


def is_corruption(e: sqlite3.Error) -> bool:
    """True if SQLite says the file is damaged or not a database."""
    code = getattr(e, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _connect(path: Path, create: bool) -> sqlite3.Connection:
    # abspath, not resolve(): the caller checked that no component below the
    # storage root is a symlink, and the index file itself must not be followed
    uri = Path(os.path.abspath(path)).as_uri() + ("?mode=rwc" if create else "?mode=rw")
    conn = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
    except BaseException:
        conn.close()
        raise
    return conn


class Index:
    """One connection to a repository's index (used by one thread at a time)."""

    def __init__(self, conn: sqlite3.Connection, format: int = INDEX_FORMAT):
        self._conn = conn
        self.format = format

    @classmethod
    def open(cls, path: Path) -> "Index":
        """Open an existing, complete index, or raise ``IndexUnusable``."""
        if not path.exists():
            raise IndexUnusable("missing")
        try:
            conn = _connect(path, create=False)
        except sqlite3.Error as e:
            if is_corruption(e):
                raise IndexUnusable(f"unreadable ({e})") from e
            raise
        try:
            row = None
            if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
                row = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        except sqlite3.Error as e:
            conn.close()
            if is_corruption(e):
                raise IndexUnusable(f"unreadable ({e})") from e
            raise
        if row is None or row[0] not in READABLE_FORMATS:
            conn.close()
            raise IndexUnusable("incomplete" if row is None else f"unknown index format {row[0]!a}")
        return cls(conn, row[0])

    def upgrade(self) -> None:
        """Migrate a format-1 index to the current format, in one transaction (writers only)."""
        if self.format == INDEX_FORMAT:
            return
        with self._transaction():
            self._conn.execute("CREATE TABLE refs_new (id BLOB PRIMARY KEY, refs BLOB NOT NULL)")
            self._conn.execute("INSERT INTO refs_new (id, refs) SELECT id, refs FROM refs ORDER BY id")
            self._conn.execute("DROP TABLE refs")
            self._conn.execute("ALTER TABLE refs_new RENAME TO refs")
            self._conn.execute("UPDATE meta SET value = ? WHERE key = 'format'", (INDEX_FORMAT,))
            self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('build', ?)", (_new_build(),))
        self.format = INDEX_FORMAT

    @classmethod
    def create(cls, path: Path) -> "Index":
        """Replace whatever is at ``path`` by an empty, not yet complete index."""
        for suffix in ("", "-wal", "-shm", "-journal"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        conn = _connect(path, create=True)
        try:
            conn.executescript(_SCHEMA)
            # A build need not be durable pack by pack: until mark_complete it is
            # "incomplete" and rebuilt anyway.
            conn.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            conn.close()
            raise
        return cls(conn)

    def mark_complete(self) -> None:
        """Record that every pack has been added (last step of a build).

        This commit is synchronous=FULL again: its WAL fsync makes the whole
        build durable before anything relies on it."""
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("BEGIN")
        self._conn.execute("INSERT INTO meta (key, value) VALUES ('build', ?)", (_new_build(),))
        self._conn.execute("INSERT INTO meta (key, value) VALUES ('format', ?)", (INDEX_FORMAT,))
        self._conn.execute("COMMIT")

    def build(self) -> int | None:
        """This index file's build id: a new one each time an index is built (or migrated)."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'build'").fetchone()
        return row[0] if row else None

    def quick_check(self) -> str | None:
        """SQLite's own consistency check: None if fine, else what is wrong."""
        try:
            rows = self._conn.execute("PRAGMA quick_check(3)").fetchall()
        except sqlite3.DatabaseError as e:
            if is_corruption(e):
                return str(e)
            raise
        result = "; ".join(str(r[0]) for r in rows)
        return None if result == "ok" else result

    def _transaction(self) -> Iterator[None]:
        return transaction(self._conn, "BEGIN IMMEDIATE")

    def add_pack(self, name: str, size: int, entries: Sequence[Entry]) -> int:
        """Insert a sealed pack and its blobs in one transaction.

        An id already indexed (in another pack) keeps its first location.
        Returns the number of blobs newly indexed.  Rows go in id order: the
        B-tree is then walked once instead of at random.
        """
        entries = sorted(entries, key=lambda e: e.id)
        with self._transaction():
            pack = self._conn.execute("INSERT INTO packs (name, size) VALUES (?, ?)", (name, size)).lastrowid
            before = self._conn.total_changes
            self._conn.executemany(
                "INSERT OR IGNORE INTO blobs (id, pack, pos, length, type) VALUES (?, ?, ?, ?, ?)",
                ((e.id, pack, e.offset, e.length, e.type) for e in entries),
            )
            added = self._conn.total_changes - before
            self._conn.executemany(
                "INSERT OR IGNORE INTO refs (id, refs) VALUES (?, ?)",
                ((e.id, e.refs) for e in entries if e.refs),
            )
        return added

    def pack_nodes(self, name: str) -> list[tuple[bytes, bytes]]:
        """(id, refs) of the blobs with refs that the index places in pack ``name``."""
        return self._conn.execute(
            "SELECT r.id, r.refs FROM refs AS r JOIN blobs AS b ON b.id = r.id"
            " JOIN packs AS p ON p.id = b.pack WHERE p.name = ?",
            (name,),
        ).fetchall()

    def remove_blobs(self, ids: Sequence[bytes]) -> None:
        """Unindex blobs (their rows and refs; the pack files are not touched), in one transaction."""
        with self._transaction():
            self._remove(ids)

    def _remove(self, ids: Sequence[bytes], refs: bool = True) -> None:
        for start in range(0, len(ids), _QUERY_CHUNK):
            chunk = ids[start : start + _QUERY_CHUNK]
            marks = ",".join("?" * len(chunk))
            self._conn.execute(f"DELETE FROM blobs WHERE id IN ({marks})", chunk)
            if refs:
                self._conn.execute(f"DELETE FROM refs WHERE id IN ({marks})", chunk)

    def purge_orphan_refs(self, limit: int) -> int:
        """Delete up to ``limit`` refs rows whose blob is not indexed; how many went.

        The garbage collector unindexes a node by its `blobs` row alone (a refs
        row may be 128 KiB: deleting thousands under the writer lock is slow),
        then purges the orphans without the lock: a row is deleted only if, in
        the same statement, no `blobs` row names its id — a writer indexing
        that node again meanwhile keeps it (FORMAT.md §6).
        """
        with self._transaction():
            before = self._conn.total_changes
            self._conn.execute(
                "DELETE FROM refs WHERE id IN (SELECT r.id FROM refs AS r"
                " WHERE NOT EXISTS (SELECT 1 FROM blobs AS b WHERE b.id = r.id) LIMIT ?)",
                (limit,),
            )
            return self._conn.total_changes - before

    def move_blobs(self, name: str, size: int, entries: Sequence[Entry]) -> None:
        """Index pack ``name`` (a copy made by the garbage collector) and point its blobs' rows at it.

        The pack row is added if missing (a writer may have indexed the pack
        as an orphan, which adds no blob row: its ids were indexed already);
        each id is then found in this pack, whatever pack held it before.
        One transaction.
        """
        with self._transaction():
            row = self._conn.execute("SELECT id FROM packs WHERE name = ?", (name,)).fetchone()
            if row is None:
                pack = self._conn.execute("INSERT INTO packs (name, size) VALUES (?, ?)", (name, size)).lastrowid
            else:
                pack = row[0]
            self._conn.executemany(
                "INSERT INTO blobs (id, pack, pos, length, type) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET pack = excluded.pack, pos = excluded.pos,"
                " length = excluded.length, type = excluded.type",
                ((e.id, pack, e.offset, e.length, e.type) for e in sorted(entries, key=lambda e: e.id)),
            )
            self._conn.executemany(
                "INSERT OR REPLACE INTO refs (id, refs) VALUES (?, ?)", ((e.id, e.refs) for e in entries if e.refs)
            )

    def count_rows(self, name: str) -> int:
        """How many blob rows place a blob in pack ``name``."""
        return self._conn.execute(
            "SELECT count(*) FROM blobs WHERE pack = (SELECT id FROM packs WHERE name = ?)", (name,)
        ).fetchone()[0]

    def drop_rows(self, ids: Sequence[bytes], nodes: Sequence[bytes], packs: Sequence[str]) -> list[str]:
        """The garbage collector's deletion, in one transaction: unindex blobs ``nodes``
        (every indexed node no snapshot reaches) and ``ids`` (dead rows of the packs
        being deleted); each of ``packs`` left without rows is unindexed too. Returns
        those packs, whose files may go once this has committed."""
        gone = []
        with self._transaction():
            self._remove(nodes, refs=False)  # their refs rows are purged later, without the lock
            self._remove(ids)
            for name in packs:
                row = self._conn.execute("SELECT id FROM packs WHERE name = ?", (name,)).fetchone()
                if row is not None:
                    if self._conn.execute("SELECT 1 FROM blobs WHERE pack = ? LIMIT 1", row).fetchone():
                        continue
                    self._conn.execute("DELETE FROM packs WHERE id = ?", row)
                gone.append(name)
        return gone

    def lookup(self, id: bytes) -> tuple[str, int, int, int] | None:
        """(pack name, record offset, data length, type) of a blob, or None."""
        return self._conn.execute(
            "SELECT p.name, b.pos, b.length, b.type FROM blobs AS b JOIN packs AS p ON p.id = b.pack"
            " WHERE b.id = ?",
            (id,),
        ).fetchone()

    def missing(self, ids: Sequence[bytes]) -> list[int]:
        """Indexes (ascending) into ``ids`` of the ids not indexed."""
        found: set[bytes] = set()
        for start in range(0, len(ids), _QUERY_CHUNK):
            chunk = ids[start : start + _QUERY_CHUNK]
            query = f"SELECT id FROM blobs WHERE id IN ({','.join('?' * len(chunk))})"
            found.update(row[0] for row in self._conn.execute(query, chunk))
        return [i for i, id in enumerate(ids) if id not in found]

    def positions(self, ids: Sequence[bytes]) -> dict[bytes, tuple[int, int]]:
        """(pack row number, record offset) of each of ``ids`` that is indexed."""
        found: dict[bytes, tuple[int, int]] = {}
        for start in range(0, len(ids), _QUERY_CHUNK):
            chunk = ids[start : start + _QUERY_CHUNK]
            query = f"SELECT id, pack, pos FROM blobs WHERE id IN ({','.join('?' * len(chunk))})"
            found.update((row[0], row[1:]) for row in self._conn.execute(query, chunk))
        return found

    def packs(self) -> dict[str, int]:
        """Every indexed pack: name -> file size."""
        return dict(self._conn.execute("SELECT name, size FROM packs"))

    def has_pack(self, name: str) -> bool:
        return self._conn.execute("SELECT 1 FROM packs WHERE name = ?", (name,)).fetchone() is not None

    def pack_entries(self, name: str) -> dict[bytes, tuple[int, int, int]]:
        """The blobs indexed in one pack: id -> (record offset, data length, type)."""
        rows = self._conn.execute(
            "SELECT b.id, b.pos, b.length, b.type FROM blobs AS b JOIN packs AS p ON p.id = b.pack"
            " WHERE p.name = ?",
            (name,),
        )
        return {row[0]: tuple(row[1:]) for row in rows}

    def iter_refs(self) -> Iterator[tuple[bytes, bytes]]:
        """(id, concatenated refs) of every indexed blob that has refs (orphan refs rows left out)."""
        return iter(self._conn.execute("SELECT r.id, r.refs FROM refs AS r JOIN blobs AS b ON b.id = r.id"))

    def stats(self) -> dict:
        packs, pack_bytes = self._conn.execute("SELECT count(*), total(size) FROM packs").fetchone()
        blobs, data_bytes = self._conn.execute("SELECT count(*), total(length) FROM blobs").fetchone()
        return {"packs": packs, "pack_bytes": int(pack_bytes), "blobs": blobs, "bytes": int(data_bytes)}

    def close(self) -> None:
        self._conn.close()
