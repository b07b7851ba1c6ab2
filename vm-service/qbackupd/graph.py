# SPDX-License-Identifier: GPL-2.0-or-later
"""Walking the clear refs from the snapshots, in bounded memory, without keys.

Every blob reached from a snapshot gets a label in a scratch SQLite
database (on disk, its page cache bounded): the number of the one snapshot
that reaches it, or ``MANY`` when two or more do.  Labels only ever grow
(none → a snapshot → MANY), and a node whose label grows hands the new label
to its children, so each node is expanded at most twice whatever the number
of snapshots: the garbage collector's mark (one label for every snapshot) and
per-snapshot unique sizes (``usage``) are the same walk.  The work happens
set-wise in SQL, a batch of children at a time; Python holds at most
``BATCH`` ids.

The scratch database has the repository's index attached as ``idx``; the walk
only reads it.  Ids reached but not in the index are recorded in
``unknown`` (a damaged repository: the garbage collector refuses to delete
anything then).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence

from .index import transaction
from .monitor import Monitor
from .storage import ID_SIZE, MAX_BATCH, Corrupt, _show

MANY = -1  # label of a blob that several snapshots reach
BATCH = 16384  # children merged at a time
NODES = 256  # nodes expanded at a time
CACHE_KIB = 16384  # scratch page cache per connection

SCHEMA = """
CREATE TABLE IF NOT EXISTS label (id BLOB PRIMARY KEY, owner INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS todo (id BLOB PRIMARY KEY, owner INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS unknown (id BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fresh (id BLOB PRIMARY KEY) WITHOUT ROWID;
"""


def scratch(path: str, index_path: str) -> sqlite3.Connection:
    """A connection to a scratch database (``""``: SQLite's temporary file) with the index attached."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    try:
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        conn.execute("PRAGMA temp_store=FILE")
        conn.execute("ATTACH DATABASE ? AS idx", (index_path,))
        conn.execute(f"PRAGMA idx.cache_size=-{CACHE_KIB}")
        conn.executescript(SCHEMA)
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS kids (id BLOB PRIMARY KEY) WITHOUT ROWID")
    except BaseException:
        conn.close()
        raise
    return conn


def split_refs(id: object, untrusted_refs: object) -> list[bytes]:
    """A ref list read back from the index, bounds-checked."""
    size = len(untrusted_refs) if type(untrusted_refs) is bytes else -1
    if size < 0 or size % ID_SIZE or size > MAX_BATCH * ID_SIZE:
        raise Corrupt(f"index: bad ref list of blob {_show(id)} (run `qbackupd reindex`)")
    return [untrusted_refs[i : i + ID_SIZE] for i in range(0, size, ID_SIZE)]


class Walk:
    """Label propagation over the refs, in the scratch database ``db``."""

    def __init__(self, db: sqlite3.Connection, monitor: Monitor, phase: str = "mark"):
        self.db = db
        self.monitor = monitor
        self.phase = phase
        self.expanded = 0
        self.track_fresh = False  # also record the ids labelled for the first time in `fresh`

    def transaction(self) -> Iterator[None]:
        return transaction(self.db)

    def seed(self, ids: Sequence[bytes], owner: int) -> None:
        """Give ``owner`` to ``ids`` (a snapshot's refs), inside a ``transaction``; ``run`` propagates."""
        for start in range(0, len(ids), BATCH):
            self._merge(ids[start : start + BATCH], owner)

    def _merge(self, ids: Sequence[bytes], owner: int) -> None:
        """Join ``owner`` into the labels of ``ids``; queue the nodes whose label grew."""
        db = self.db
        db.execute("DELETE FROM temp.kids")
        db.executemany("INSERT OR IGNORE INTO temp.kids (id) VALUES (?)", ((id,) for id in ids))
        db.execute(
            "INSERT OR IGNORE INTO unknown (id) SELECT k.id FROM temp.kids AS k"
            " WHERE NOT EXISTS (SELECT 1 FROM label AS l WHERE l.id = k.id)"
            " AND NOT EXISTS (SELECT 1 FROM idx.blobs AS b WHERE b.id = k.id)"
        )
        db.execute(
            "INSERT INTO todo (id, owner)"
            " SELECT k.id, CASE WHEN l.owner IS NULL THEN :o ELSE :many END"
            " FROM temp.kids AS k LEFT JOIN label AS l ON l.id = k.id"
            " WHERE (l.owner IS NULL OR (l.owner != :o AND l.owner != :many))"
            " AND EXISTS (SELECT 1 FROM idx.refs AS r WHERE r.id = k.id)"
            " ON CONFLICT (id) DO UPDATE SET owner = excluded.owner",
            {"o": owner, "many": MANY},
        )
        if self.track_fresh:
            db.execute(
                "INSERT OR IGNORE INTO fresh (id) SELECT k.id FROM temp.kids AS k"
                " WHERE NOT EXISTS (SELECT 1 FROM label AS l WHERE l.id = k.id)"
            )
        db.execute(
            "INSERT INTO label (id, owner) SELECT id, :o FROM temp.kids WHERE true"
            " ON CONFLICT (id) DO UPDATE SET owner = CASE WHEN owner = :o THEN owner ELSE :many END",
            {"o": owner, "many": MANY},
        )

    def run(self) -> None:
        """Propagate until no label changes; commits a batch of nodes at a time (resumable)."""
        db = self.db
        while True:
            self.monitor(self.phase, self.expanded)
            rows = db.execute("SELECT id, owner FROM todo LIMIT ?", (NODES,)).fetchall()
            if not rows:
                return
            with self.transaction():
                db.executemany("DELETE FROM todo WHERE id = ?", ((id,) for id, _ in rows))
                by_owner: dict[int, list[bytes]] = {}
                for id, owner in rows:
                    by_owner.setdefault(owner, []).append(id)
                for owner, nodes in by_owner.items():
                    children: list[bytes] = []
                    for id in nodes:
                        row = db.execute("SELECT refs FROM idx.refs WHERE id = ?", (id,)).fetchone()
                        if row is None:  # unindexed meanwhile (a rebuild found it incomplete)
                            db.execute("INSERT OR IGNORE INTO unknown (id) VALUES (?)", (id,))
                            continue
                        children += split_refs(id, row[0])
                        if len(children) >= BATCH:
                            self._merge(children, owner)
                            children = []
                    if children:
                        self._merge(children, owner)
            self.expanded += len(rows)

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM label").fetchone()[0]

    def unknown(self) -> tuple[int, bytes | None]:
        """How many reached ids the index lacks, and one of them."""
        count, first = self.db.execute("SELECT count(*), min(id) FROM unknown").fetchone()
        return count, first
