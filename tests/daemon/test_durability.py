# SPDX-License-Identifier: GPL-2.0-or-later
"""Power-loss durability of the daemon's storage, beyond what a SIGKILL shows.

A SIGKILL keeps everything the kernel was told; a power loss keeps only what
was fsynced. These tests check the orderings that matter then:

- an index transaction is durable when it commits (``synchronous=FULL``):
  a snapshot file is fsynced after the index rows of its refs, and a reader
  (a restore after the power loss) does not repair the index, so rows that a
  WAL fsync never covered would make committed blobs look lost;
- a pack found on disk and indexed on open (orphan recovery, rebuild) is made
  durable first, file and directory entry, so the index never names a pack
  whose rename a power loss can undo (the writer that renamed it may have
  been killed before its directory fsync).
"""

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from qbackupd import storage as st
from qbackupd.storage import MIN_PACK_SIZE, Storage, StorageError

SYNCHRONOUS_FULL = 2


def ident(n: int) -> bytes:
    return hashlib.sha256(b"id %d" % n).digest()


def fill(repo, count: int, start: int = 0) -> list[bytes]:
    ids = [ident(n) for n in range(start, start + count)]
    for n, id in enumerate(ids, start):
        assert repo.put(id, 1, b"data %d" % n, None)
    return ids


def synchronous(repo) -> int:
    return repo._index._conn.execute("PRAGMA synchronous").fetchone()[0]


@pytest.fixture
def storage(tmp_path) -> Storage:
    return Storage(tmp_path / "store")


def test_index_transactions_are_durable_on_commit(storage):
    with storage.create("work", b"config", MIN_PACK_SIZE, "creator") as repo:
        assert synchronous(repo) == SYNCHRONOUS_FULL
        fill(repo, 3)
        repo.commit(ident(100), b"snap", [ident(0)])
    for write in (True, False):
        with storage.open("work", write, "again") as repo:
            assert synchronous(repo) == SYNCHRONOUS_FULL
    # an index rebuilt on open (here by a writer, then by a reader) is durable too
    for write in (True, False):
        (storage.root / "work" / "index.sqlite").unlink()
        with storage.open("work", write, "rebuilt") as repo:
            assert synchronous(repo) == SYNCHRONOUS_FULL
            assert repo.have([ident(0), ident(1), ident(2)]) == []


class Recorder:
    """Records, in order, the fsyncs of packs and directories and the index inserts."""

    def __init__(self, monkeypatch):
        self.events: list[tuple[str, str]] = []
        real_fsync, real_fsync_dir, real_add = os.fsync, st._fsync_dir, st.Index.add_pack

        def fsync(fd):
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            return real_fsync(fd)

        def fsync_dir(directory):
            self.events.append(("fsync", str(Path(directory.path).resolve())))
            return real_fsync_dir(directory)

        def add_pack(index, name, size, entries):
            self.events.append(("index", name))
            return real_add(index, name, size, entries)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(st, "_fsync_dir", fsync_dir)
        monkeypatch.setattr(st.Index, "add_pack", add_pack)

    def check_durable_before_indexed(self, packs: list[Path]) -> None:
        for path in packs:
            indexed = self.events.index(("index", path.stem))
            before = self.events[:indexed]
            for needed in (path, path.parent, path.parent.parent):
                assert ("fsync", str(needed.resolve())) in before, (needed, self.events)


def pack_files(storage: Storage) -> list[Path]:
    return sorted((storage.root / "work" / "packs").glob("*/*.pack"))


def test_orphan_pack_made_durable_before_it_is_indexed(storage, monkeypatch):
    """Writer killed between rename and directory fsync / index insert: the
    next writer fsyncs the pack and its directories before indexing it."""
    repo = storage.create("work", b"config", MIN_PACK_SIZE, "creator")
    ids = fill(repo, 3)
    with monkeypatch.context() as m:
        m.setattr(st.Index, "add_pack", lambda *a: (_ for _ in ()).throw(OSError(5, "killed")))
        with pytest.raises(StorageError):
            repo.flush()
    repo.close()
    (orphan,) = pack_files(storage)
    recorder = Recorder(monkeypatch)
    with storage.open("work", True, "next writer") as writer:
        assert writer.have(ids) == []
    recorder.check_durable_before_indexed([orphan])


@pytest.mark.parametrize("how", ["reindex", "open"])
def test_rebuild_makes_packs_durable_before_indexing_them(storage, monkeypatch, how):
    with storage.create("work", b"config", MIN_PACK_SIZE, "creator") as repo:
        for n in range(3):
            fill(repo, 2, start=10 * n)
            repo.flush()
    packs = pack_files(storage)
    assert len(packs) == 3
    if how == "open":
        conn = sqlite3.connect(storage.root / "work" / "index.sqlite")
        conn.execute("DELETE FROM meta")
        conn.commit()
        conn.close()
    recorder = Recorder(monkeypatch)
    if how == "reindex":
        assert storage.reindex("work")["packs"] == 3
    else:
        storage.open("work", False, "reader").close()
    recorder.check_durable_before_indexed(packs)
