# SPDX-License-Identifier: GPL-2.0-or-later
"""Health check of a repository, without keys (``qbackupd check``, protocol ``check``).

Reads every pack's footer and trailer (with ``read_data``: every byte, each
record's CRC-32 and the pack's SHA-256), checks the index against the packs,
the snapshot files, and that every reference resolves.  Besides one line per
problem it names what the damage costs: the ids of the blobs that cannot be
read back intact (damaged record, unreadable or missing pack, referenced but
not held), and for each snapshot the refs (volume roots, to dom0) through
which it reaches one of them — found by walking the clear refs backwards
from the damaged blobs.  dom0 maps snapshot and root ids to qubes and
volumes.  Takes no lock: it may run beside a writer and a garbage collector.
Memory: one record or a MiB of a pack at a time, and the damaged ids with
their ancestors up to ``MAX_TAINTED`` (beyond that every snapshot is
reported as possibly affected).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import pack
from .index import Index, IndexUnusable
from .monitor import Monitor, Progress
from .storage import (
    ID_SIZE,
    MAX_BATCH,
    MAX_PACK_SIZE,
    Corrupt,
    Storage,
    StorageError,
    _PACK_NAME_RE,
    _bounds,
    _io,
    _read_config,
    _show,
    _split_ids,
    _Tree,
    open_index,
    read_snapshot,
    scan_packs,
    snapshot_ids,
)

MAX_TAINTED = 1 << 18  # damaged ids and their ancestors kept for attribution (~30 MiB)
_MAX_PASSES = 64  # walking the refs backwards: deeper than any chunk-map tree


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    damaged: set[bytes] = field(default_factory=set)  # blobs that cannot be read back intact
    damaged_total: int = 0  # may exceed len(damaged) when the damage is too wide to list
    bad_snapshots: list[bytes] = field(default_factory=list)  # snapshot files that are damaged
    affected: list[tuple[bytes, list[bytes]]] = field(default_factory=list)  # (snapshot, its refs reaching damage)
    complete: bool = True  # False: attribution gave up (too much damage, or no usable index)

    def add_damaged(self, ids) -> None:
        for id in ids:
            if id in self.damaged:
                continue
            self.damaged_total += 1
            if len(self.damaged) < MAX_TAINTED:
                self.damaged.add(id)
            else:
                self.complete = False


def check_repository(
    storage: Storage, name: str, *, read_data: bool = False, progress: Progress | None = None, stop=None
) -> Report:
    """Check repository ``name`` of ``storage``; see the module docstring."""
    monitor = Monitor(progress, stop)
    tree = storage.open_tree(name)
    try:
        with _io(f"cannot check repository {name!a}"):
            return _check(tree, read_data, monitor)
    finally:
        tree.close()


def _check(tree: _Tree, read_data: bool, monitor: Monitor) -> Report:
    report = Report()
    try:
        pack_size = _read_config(tree).pack_size
    except (StorageError, OSError) as e:
        report.problems.append(f"config: {e}")
        pack_size = MAX_PACK_SIZE
    index = None
    try:
        index = open_index(tree)
        if (problem := index.quick_check()) is not None:
            index.close()
            index = None
            raise IndexUnusable(f"damaged ({problem})")
    except IndexUnusable as e:
        report.problems.append(f"index: {e} (run reindex); index entries and refs not checked")
        report.complete = False
    try:
        _check_packs(tree, index, _bounds(pack_size), read_data, report, monitor)
        _check_snapshots(tree, index, report, monitor)
        if index is not None:
            _check_blob_refs(index, report, monitor)
            if report.damaged_total:
                _attribute(tree, index, report, monitor)
    finally:
        if index is not None:
            index.close()
    return report


# --- packs -------------------------------------------------------------------------


def _check_packs(
    tree: _Tree, index: Index | None, bounds: pack.Bounds, read_data: bool, report: Report, monitor: Monitor
) -> None:
    names, unexpected = scan_packs(tree)
    report.problems += [f"unexpected file {u}" for u in unexpected]
    indexed = index.packs() if index is not None else {}
    for done, name in enumerate(names):
        monitor("packs", done, len(names))
        try:
            fd = tree.open_pack(name)
        except FileNotFoundError:
            continue  # deleted meanwhile (garbage collection)
        except OSError as e:
            _unreadable_pack(index, name, str(e), report)
            continue
        try:
            if read_data:
                scan = pack.scan_pack(fd, bounds)
                trailer = scan.trailer
            else:
                scan, trailer = None, pack.read_trailer(fd, bounds)
        except (pack.PackError, OSError) as e:
            _unreadable_pack(index, name, str(e), report)
            continue
        finally:
            os.close(fd)
        if scan is not None:
            _damaged_records(index, name, scan, report)
        if index is not None:
            _check_pack_index(index, name, trailer, indexed.get(name), report)
    monitor("packs", len(names), len(names), force=True)
    for name in sorted(indexed.keys() - set(names), key=ascii):  # a damaged index may hold non-text names
        if not (isinstance(name, str) and _PACK_NAME_RE.fullmatch(name)):
            report.problems.append(f"index names an invalid pack {name!a}")
        elif index.has_pack(name) and not _pack_exists(tree, name):  # else sealed or collected meanwhile
            report.problems.append(f"index names pack {name!a}, which is missing")
            report.add_damaged(index.pack_entries(name))


def _pack_exists(tree: _Tree, name: str) -> bool:
    try:
        os.close(tree.open_pack(name))
    except FileNotFoundError:
        return False
    except OSError:
        return True  # there, but not a pack we may open: reported as unexpected or unreadable
    return True


def _unreadable_pack(index: Index | None, name: str, problem: str, report: Report) -> None:
    report.problems.append(f"pack {name}: {problem}")
    if index is not None:
        report.add_damaged(index.pack_entries(name))


def _damaged_records(index: Index | None, name: str, scan: pack.Scan, report: Report) -> None:
    if scan.bad:
        first, reason = scan.bad[0]
        more = f" ({len(scan.bad)} damaged records)" if len(scan.bad) > 1 else ""
        report.problems.append(f"pack {name}: {reason}{more}")
        rows = index.pack_entries(name) if index is not None else {}
        # a damaged record costs its blob only where the index reads it from
        report.add_damaged(
            e.id for e, _ in scan.bad if index is None or rows.get(e.id, (None,))[0] == e.offset
        )
    elif not scan.digest_ok:
        report.problems.append(f"pack {name}: checksum mismatch (SHA-256), though every record passes its CRC-32")


def _check_pack_index(
    index: Index, name: str, trailer: pack.Trailer, indexed_size: int | None, report: Report
) -> None:
    if indexed_size is None and not index.has_pack(name):  # has_pack: else sealed since the listing
        report.problems.append(f"pack {name} is not in the index (open the repository for writing, or reindex)")
        return
    if indexed_size is not None and indexed_size != trailer.file_size:
        report.problems.append(f"pack {name}: index says {indexed_size!a} bytes, the file has {trailer.file_size}")
    listed = {e.id: (e.offset, e.length, e.type) for e in trailer.entries}
    rows = index.pack_entries(name)
    wrong = [id for id, place in rows.items() if listed.get(id) != place]
    if wrong:
        report.problems.append(f"pack {name}: {len(wrong)} index entries point nowhere (first {_show(wrong[0])})")
        report.add_damaged(id for id in wrong if isinstance(id, bytes))
    # Records of an indexed pack that the index does not name are no problem by
    # themselves: a garbage collection unindexes the nodes no snapshot reaches in
    # the packs it keeps (FORMAT.md §6). One that something needs is reported as
    # a reference to a missing id.


# --- snapshots and refs ------------------------------------------------------------


def _check_snapshots(tree: _Tree, index: Index | None, report: Report, monitor: Monitor) -> None:
    ids, unexpected = snapshot_ids(tree)
    report.problems += [f"unexpected file snapshots/{name!a}" for name in unexpected]
    for done, id in enumerate(ids):
        monitor("snapshots", done, len(ids))
        try:
            _, refs = read_snapshot(tree, id)
        except FileNotFoundError:
            continue  # deleted meanwhile
        except (StorageError, OSError) as e:
            report.problems.append(str(e) if isinstance(e, Corrupt) else f"snapshot {id.hex()}: {e}")
            report.bad_snapshots.append(id)
            continue
        missing = index.missing(refs) if index is not None else []
        if missing:
            first = refs[missing[0]].hex()
            report.problems.append(f"snapshot {id.hex()} references {len(missing)} missing ids (first {first})")
            report.add_damaged(refs[i] for i in missing)


def _valid_refs(untrusted_refs: object) -> bool:
    size = len(untrusted_refs) if type(untrusted_refs) is bytes else -1
    return 0 <= size <= MAX_BATCH * ID_SIZE and size % ID_SIZE == 0


def _check_blob_refs(index: Index, report: Report, monitor: Monitor) -> None:
    for done, (id, untrusted_refs) in enumerate(index.iter_refs()):
        if done % 1024 == 0:
            monitor("refs", done)
        if not _valid_refs(untrusted_refs):
            report.problems.append(f"index: bad ref list of blob {_show(id)}")
            continue
        refs = _split_ids(untrusted_refs)
        missing = index.missing(refs)
        if missing:
            first = refs[missing[0]].hex()
            report.problems.append(f"blob {_show(id)} references {len(missing)} missing ids (first {first})")
            report.add_damaged(refs[i] for i in missing)


# --- attribution -------------------------------------------------------------------


def _attribute(tree: _Tree, index: Index, report: Report, monitor: Monitor) -> None:
    """Which snapshots reach a damaged blob, and through which of their refs."""
    tainted = _ancestors(index, report.damaged, monitor) if report.complete else None
    if tainted is None:
        report.complete = False
    for done, id in enumerate(snapshot_ids(tree)[0]):
        monitor("attribution", done)
        if id in report.bad_snapshots:
            continue
        try:
            _, refs = read_snapshot(tree, id)
        except (StorageError, OSError):
            continue  # deleted or damaged meanwhile
        if tainted is None:
            report.affected.append((id, []))  # unknown: possibly every ref
        elif roots := [r for r in dict.fromkeys(refs) if r in tainted]:
            report.affected.append((id, roots))


def _ancestors(index: Index, damaged: set[bytes], monitor: Monitor) -> set[bytes] | None:
    """The damaged ids and every indexed blob whose refs reach one; None over MAX_TAINTED."""
    tainted = set(damaged)
    for _ in range(_MAX_PASSES):
        added = []
        for done, (id, untrusted_refs) in enumerate(index.iter_refs()):
            if done % 1024 == 0:
                monitor("attribution", len(tainted))
            if id in tainted or not _valid_refs(untrusted_refs):
                continue
            if any(untrusted_refs[i : i + ID_SIZE] in tainted for i in range(0, len(untrusted_refs), ID_SIZE)):
                added.append(id)
        if not added:
            return tainted
        tainted.update(added)
        if len(tainted) > MAX_TAINTED:
            return None
    return None
