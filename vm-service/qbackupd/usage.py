# SPDX-License-Identifier: GPL-2.0-or-later
"""Space accounting without keys (protocol ``usage``, ``qbackup stats``).

For each snapshot: the blobs only it reaches, and their stored bytes — what
deleting it alone would let a garbage collection free; the blobs several
snapshots share; the blobs no snapshot reaches (garbage).  One walk of the
clear refs (graph.Walk, labels: the snapshot number, or MANY) in a private
temporary SQLite database: memory stays bounded whatever the repository's
size.  Sizes are the stored (encrypted, compressed) ones: the daemon cannot
know logical sizes, which only the manifests dom0 decrypts hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import graph
from .monitor import Monitor, Progress
from .storage import Storage, StorageError, _io, open_index, read_snapshot, snapshot_ids


@dataclass
class Usage:
    snapshots: list[tuple[bytes, int, int]] = field(default_factory=list)  # (id, unique blobs, unique bytes)
    shared_blobs: int = 0  # reached by two snapshots or more
    shared_bytes: int = 0
    unreferenced_blobs: int = 0  # reached by none: garbage
    unreferenced_bytes: int = 0
    missing: int = 0  # ids reached but not held (damage; see check)
    unreadable: int = 0  # snapshot files that could not be read (not counted)


def usage(storage: Storage, name: str, *, progress: Progress | None = None, stop=None) -> Usage:
    monitor = Monitor(progress, stop)
    tree = storage.open_tree(name)
    try:
        with _io(f"usage of repository {name!a}"):
            index = open_index(tree)
            try:
                db = graph.scratch("", str(tree.index))
                try:
                    return _usage(tree, index, graph.Walk(db, monitor, "usage"), monitor)
                finally:
                    db.close()
            finally:
                index.close()
    finally:
        tree.close()


def _usage(tree, index, walk: graph.Walk, monitor: Monitor) -> Usage:
    result = Usage()
    ids, _ = snapshot_ids(tree)
    counted = []
    for number, id in enumerate(ids):
        monitor("usage", number, len(ids))
        try:
            _, refs = read_snapshot(tree, id)
        except FileNotFoundError:
            continue
        except (StorageError, OSError):
            result.unreadable += 1
            continue
        with walk.transaction():
            walk.seed(refs, number)
        counted.append((number, id))
    walk.run()
    per_owner = {
        owner: (blobs, int(size))
        for owner, blobs, size in walk.db.execute(
            "SELECT l.owner, count(*), total(b.length) FROM label AS l JOIN idx.blobs AS b ON b.id = l.id"
            " GROUP BY l.owner"
        )
    }
    result.snapshots = [(id, *per_owner.get(number, (0, 0))) for number, id in counted]
    result.shared_blobs, result.shared_bytes = per_owner.get(graph.MANY, (0, 0))
    stats = index.stats()
    referenced_blobs = sum(blobs for blobs, _ in per_owner.values())
    referenced_bytes = sum(size for _, size in per_owner.values())
    result.unreferenced_blobs = stats["blobs"] - referenced_blobs
    result.unreferenced_bytes = stats["bytes"] - referenced_bytes
    result.missing = walk.unknown()[0]
    return result
