# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests of the daemon's repository storage (qbackupd.storage): the Storage /
Repository API, argument validation, dedup, snapshots, config compare-and-swap,
the SQLite index (rebuild, reindex), check, the writer lock (one process and
two), readers beside a writer, and hostile files on disk."""

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from qbackupd import storage as st
from qbackupd.storage import (
    MAX_BATCH,
    MAX_BLOB,
    MAX_COMMIT_REFS,
    MAX_CONFIG,
    MAX_SNAPSHOT,
    MIN_PACK_SIZE,
    BadRepoName,
    BadRequest,
    Conflict,
    Corrupt,
    Exists,
    Locked,
    MissingRefs,
    NotFound,
    ReadOnly,
    Storage,
    StorageError,
    TooLarge,
)

CHILD = Path(__file__).with_name("storage_child.py")


def ident(n: int) -> bytes:
    return hashlib.sha256(b"id %d" % n).digest()


def data_of(n: int, size: int = 1000) -> bytes:
    return hashlib.shake_256(b"data %d" % n).digest(size)


@pytest.fixture
def storage(tmp_path) -> Storage:
    return Storage(tmp_path / "store")


@pytest.fixture
def repo(storage):
    r = storage.create("work", b"client config", MIN_PACK_SIZE, "test writer")
    yield r
    r.close()


def pack_files(storage: Storage, name: str = "work") -> list[Path]:
    return sorted((storage.root / name / "packs").glob("*/*.pack"))


def fill(repo, count: int, size: int = 1000, start: int = 0) -> list[bytes]:
    ids = [ident(n) for n in range(start, start + count)]
    for n, id in enumerate(ids, start):
        assert repo.put(id, n % 3, data_of(n, size), None) is True
    return ids


# --- create / open ---------------------------------------------------------------


def test_create_and_open(storage, repo):
    assert (repo.config, repo.pack_size, repo.format, repo.write) == (b"client config", MIN_PACK_SIZE, 1, True)
    repo.close()
    reader = storage.open("work", False, "reader")
    assert (reader.config, reader.pack_size, reader.write) == (b"client config", MIN_PACK_SIZE, False)
    reader.close()
    with pytest.raises(Exists) as e:
        storage.create("work", b"", MIN_PACK_SIZE, "again")
    assert e.value.code == "exists"
    assert sorted(os.listdir(storage.root)) == ["work"]  # no leftover temporary directory


def test_open_missing(storage):
    for write in (False, True):
        with pytest.raises(NotFound) as e:
            storage.open("nothing", write, "x")
        assert e.value.code == "no_repository"
    with pytest.raises(NotFound):
        storage.check("nothing")


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a..b", "-x", "_x", ".hidden", "a/b", "a\0", "é", "a\n", "x" * 65, None, 5]
)
def test_bad_repository_names(storage, name):
    for call in (
        lambda: storage.create(name, b"", MIN_PACK_SIZE, "x"),
        lambda: storage.open(name, True, "x"),
        lambda: storage.reindex(name),
        lambda: storage.check(name),
    ):
        with pytest.raises(BadRepoName) as e:
            call()
        assert e.value.code == "bad_repo_name"
    assert not storage.root.exists()


@pytest.mark.parametrize(
    "config, pack_size, error",
    [
        (b"x" * (MAX_CONFIG + 1), MIN_PACK_SIZE, TooLarge),
        ("text", MIN_PACK_SIZE, BadRequest),
        (b"", MIN_PACK_SIZE - 1, BadRequest),
        (b"", st.MAX_PACK_SIZE + 1, BadRequest),
        (b"", True, BadRequest),
        (b"", float(MIN_PACK_SIZE), BadRequest),
    ],
)
def test_create_validates(storage, config, pack_size, error):
    with pytest.raises(error) as e:
        storage.create("work", config, pack_size, "x")
    assert e.value.code == {TooLarge: "too_large", BadRequest: "bad_request"}[error]
    assert not (storage.root / "work").exists()


def test_open_write_flag_must_be_bool(storage, repo):
    with pytest.raises(BadRequest):
        storage.open("work", 1, "x")


# --- put / get / have ------------------------------------------------------------


def test_put_get_have(storage, repo):
    refs = fill(repo, 3)
    assert repo.put(ident(10), 0, b"", None)
    assert repo.put(ident(11), 255, b"tree", refs)
    wanted = [ident(10), ident(99), ident(0), ident(99), ident(11)]
    for stage in ("open pack", "sealed"):
        assert repo.have(wanted) == [1, 3], stage
        assert repo.get(ident(10)) == (0, b"")
        assert repo.get(ident(11)) == (255, b"tree")
        assert repo.get(ident(1)) == (1, data_of(1))
        assert repo.get(ident(99)) is None
        repo.flush()
    assert len(pack_files(storage)) == 1
    repo.flush()  # nothing open: no new pack
    assert len(pack_files(storage)) == 1


def test_dedup(storage, repo):
    ids = fill(repo, 5)
    assert repo.put(ids[0], 1, b"other data", None) is False  # held in the open pack
    repo.flush()
    size = pack_files(storage)[0].stat().st_size
    assert all(repo.put(id, 2, b"other data", None) is False for id in ids)  # held in the index
    repo.flush()
    assert len(pack_files(storage)) == 1 and pack_files(storage)[0].stat().st_size == size
    assert repo.get(ids[0]) == (0, data_of(0))
    assert repo.stats()["blobs"] == 5


def test_puts_of_ids_have_called_missing_skip_the_lookup_and_dedup_after(storage, repo, monkeypatch):
    """A writer's put of an id its HAVE answered missing stores it without an
    index lookup; once stored, a second put of it (open pack, then index)
    is deduplicated as any other. Past _TOLD_MISSING ids nothing more is
    remembered, and puts look up as before."""
    fill(repo, 2)
    ids = [ident(n) for n in range(6)]
    lookups = []
    real_missing = repo._index.missing
    monkeypatch.setattr(repo._index, "missing", lambda ids: lookups.append(len(ids)) or real_missing(ids))
    assert repo.have(ids) == [2, 3, 4, 5]
    lookups.clear()
    assert [repo.put(id, 1, data_of(n), None) for n, id in enumerate(ids[2:4], 2)] == [True, True]
    assert 1 not in lookups  # no lookup of the put id (at most one of its empty refs)
    assert repo.put(ids[2], 1, b"again", None) is False  # in the open pack
    repo.flush()
    assert repo.put(ids[3], 1, b"again", None) is False  # in the index
    assert repo.get(ids[2]) == (1, data_of(2)) and repo.get(ids[3]) == (1, data_of(3))
    repo.close()
    monkeypatch.setattr(st, "_TOLD_MISSING", 1)
    writer = storage.open("work", True, "second writer")
    try:
        assert writer.have(ids) == [4, 5]  # two: more than may be remembered
        assert writer._told_missing == set()
        lookups = []
        real_missing = writer._index.missing
        monkeypatch.setattr(writer._index, "missing", lambda ids: lookups.append(len(ids)) or real_missing(ids))
        assert writer.put(ids[5], 1, data_of(5), None) is True
        assert lookups[0] == 1
        writer.flush()
        assert writer.have(ids) == [4]
        assert writer.stats()["blobs"] == 5
    finally:
        writer.close()


def test_reader_remembers_no_missing_ids(storage, repo):
    fill(repo, 1)
    repo.close()
    reader = storage.open("work", False, "reader")
    try:
        assert reader.have([ident(0), ident(9)]) == [1]
        assert reader._told_missing == set()
    finally:
        reader.close()


def test_pack_sealed_at_pack_size(storage, repo):
    """Blobs go to one open pack until it reaches pack_size; then it is sealed and indexed."""
    reader = storage.open("work", False, "reader")
    ids = fill(repo, 3, size=3 << 20)  # 9 MiB > 8 MiB
    assert len(pack_files(storage)) == 1
    assert reader.have(ids) == []
    assert reader.get(ids[2]) == (2, data_of(2, 3 << 20))
    fill(repo, 1, start=10)
    assert len(pack_files(storage)) == 1 and reader.have([ident(10)]) == [0]
    assert pack_files(storage)[0].stat().st_size < MIN_PACK_SIZE + MAX_BLOB
    reader.close()


def test_put_refs(repo):
    child, missing = ident(1), ident(2)
    repo.put(child, 1, b"c", None)
    assert repo.put(ident(3), 2, b"node", [child]) is True  # ref in the open pack
    with pytest.raises(MissingRefs) as e:
        repo.put(ident(4), 2, b"node", [child, missing])
    assert e.value.code == "missing_refs" and e.value.ids == [missing]
    assert repo.have([ident(4)]) == [0]  # nothing stored
    repo.flush()
    assert repo.put(ident(5), 2, b"node", [child, ident(3)]) is True  # refs in the index
    many = [ident(1000 + n) for n in range(MAX_BATCH)]
    with pytest.raises(MissingRefs) as e:
        repo.put(ident(6), 2, b"node", many)
    assert e.value.ids == many[: st.MAX_LISTED_MISSING]


def test_refs_survive_in_trailer_and_index(storage, repo):
    fill(repo, 2)
    repo.put(ident(9), 2, b"node", [ident(0), ident(1)])
    repo.close()
    conn = sqlite3.connect(storage.root / "work" / "index.sqlite")
    assert conn.execute("SELECT refs FROM refs WHERE id = ?", (ident(9),)).fetchone()[0] == ident(0) + ident(1)
    conn.close()
    fd = os.open(pack_files(storage)[0], os.O_RDONLY)
    entries = st.pack.read_trailer(fd, st._bounds(MIN_PACK_SIZE)).entries
    os.close(fd)
    assert [e.refs for e in entries] == [b"", b"", ident(0) + ident(1)]


BAD_ID = [b"x" * 31, b"x" * 33, "x" * 32, bytearray(32), None]


@pytest.mark.parametrize(
    "args, error",
    [(dict(id=bad), BadRequest) for bad in BAD_ID]
    + [(dict(type=bad), BadRequest) for bad in (-1, 256, True, "1", 1.0)]
    + [
        (dict(data="text"), BadRequest),
        (dict(data=bytearray(3)), BadRequest),
        (dict(data=b"x" * (MAX_BLOB + 1)), TooLarge),
        (dict(refs=ident(1)), BadRequest),
        (dict(refs=[ident(1)] * (MAX_BATCH + 1)), BadRequest),
        (dict(refs=[b"short"]), BadRequest),
    ],
)
def test_put_validates(repo, args, error):
    call = dict(id=ident(1), type=1, data=b"ok", refs=None) | args
    with pytest.raises(error) as e:
        repo.put(**call)
    assert e.value.code == ("too_large" if error is TooLarge else "bad_request")
    assert repo.have([ident(1)]) == [0]


def test_put_accepts_largest_blob(repo):
    assert repo.put(ident(1), 1, b"x" * MAX_BLOB, None)
    assert repo.get(ident(1)) == (1, b"x" * MAX_BLOB)


@pytest.mark.parametrize("bad", BAD_ID)
def test_other_calls_validate_ids(repo, bad):
    calls = [
        lambda: repo.get(bad),
        lambda: repo.have([ident(1), bad]),
        lambda: repo.get_snapshot(bad),
        lambda: repo.delete_snapshot(bad),
        lambda: repo.commit(bad, b"s", []),
        lambda: repo.commit(ident(1), b"s", [bad]),
    ]
    for call in calls:
        with pytest.raises(BadRequest):
            call()


def test_batch_limits(repo):
    assert repo.have([ident(1)] * MAX_BATCH) == list(range(MAX_BATCH))
    with pytest.raises(BadRequest):
        repo.have([ident(1)] * (MAX_BATCH + 1))
    with pytest.raises(BadRequest):
        repo.have(ident(1))
    with pytest.raises(BadRequest):
        repo.commit(ident(1), b"", [ident(1)] * (MAX_COMMIT_REFS + 1))
    with pytest.raises(TooLarge):
        repo.commit(ident(1), b"x" * (MAX_SNAPSHOT + 1), [])


def test_locate_keys_follow_the_packs_and_the_offsets_in_them(storage, repo):
    """Sorting by the keys reads the sealed packs one after the other, each
    from its start, then the open pack; an id not held sorts last."""
    first = fill(repo, 3)
    repo.flush()
    second = fill(repo, 3, start=3)
    repo.flush()
    unsealed = fill(repo, 2, start=6)
    wanted = [second[2], ident(99), unsealed[1], first[1], second[0], unsealed[0], first[2], first[0], second[1]]
    keys = repo.locate(wanted)
    assert all(type(k) is int and 0 <= k < 2**63 for k in keys)
    in_order = [id for _, id in sorted(zip(keys, wanted))]
    assert in_order == first + second + unsealed + [ident(99)]
    assert keys[1] == st.NOT_HELD
    repo.close()
    reader = storage.open("work", False, "reader")  # read-only; the open pack was sealed at close
    assert reader.locate(first + second) == sorted(reader.locate(first + second))
    assert reader.locate([ident(100)]) == [st.NOT_HELD] and reader.locate([]) == []
    reader.close()


@pytest.mark.parametrize("ids", [[ident(0)] * (MAX_BATCH + 1), [ident(0)[:31]], [ident(0) + b"x"], [ident(0).hex()], ident(0)])
def test_locate_refuses_hostile_batches(repo, ids):
    with pytest.raises(BadRequest):
        repo.locate(ids)


def test_locate_puts_an_index_row_out_of_bounds_last(storage, repo):
    """A damaged index row is reported by get; locate only must not fail on it."""
    ids = fill(repo, 2)
    repo.close()
    db = sqlite3.connect(storage.root / "work" / "index.sqlite")
    with db:
        db.execute("UPDATE blobs SET pos = ? WHERE id = ?", (1 << 40, ids[0]))
    db.close()
    reader = storage.open("work", False, "reader")
    assert reader.locate(ids)[0] == st.NOT_HELD and reader.locate(ids)[1] < st.NOT_HELD
    with pytest.raises(Corrupt):
        reader.get(ids[0])
    reader.close()


# --- snapshots -------------------------------------------------------------------


def test_snapshots(storage, repo):
    ids = fill(repo, 4)
    reader = storage.open("work", False, "reader")
    repo.commit(ident(100), b"manifest", ids[:2])
    assert reader.have(ids) == []  # commit sealed the open pack first
    repo.commit(ident(101), b"x" * MAX_SNAPSHOT, ids)
    with pytest.raises(Exists) as e:
        repo.commit(ident(100), b"other", [])
    assert e.value.code == "exists"
    with pytest.raises(MissingRefs) as e:
        repo.commit(ident(102), b"m", [ids[0], ident(77)])
    assert e.value.ids == [ident(77)]
    listed = reader.list_snapshots()
    assert sorted((s[0], s[1]) for s in listed) == sorted([(ident(100), 8), (ident(101), MAX_SNAPSHOT)])
    assert all(isinstance(s[2], int) and s[2] > 1_600_000_000 for s in listed)
    assert reader.get_snapshot(ident(100)) == (b"manifest", ids[:2])
    assert reader.get_snapshot(ident(101)) == (b"x" * MAX_SNAPSHOT, ids)
    with pytest.raises(NotFound) as e:
        reader.get_snapshot(ident(102))
    assert e.value.code == "not_found"
    repo.delete_snapshot(ident(100))
    with pytest.raises(NotFound):
        repo.delete_snapshot(ident(100))
    assert [s[0] for s in reader.list_snapshots()] == [ident(101)]
    assert repo.stats()["snapshots"] == 1
    assert os.listdir(storage.root / "work" / "staging") == []
    reader.close()


def test_commit_with_many_refs(repo):
    ids = fill(repo, 10, size=10)
    refs = ids * 6000  # 60000 refs
    repo.commit(ident(50), b"big", refs)
    assert repo.get_snapshot(ident(50)) == (b"big", refs)


# --- config ----------------------------------------------------------------------


def test_set_config_compare_and_swap(storage, repo):
    with pytest.raises(Conflict) as e:
        repo.set_config(b"new", b"not the stored one")
    assert e.value.code == "conflict"
    repo.set_config(b"new", b"client config")
    assert repo.config == b"new"
    with pytest.raises(TooLarge):
        repo.set_config(b"x" * (MAX_CONFIG + 1), b"new")
    repo.close()
    reader = storage.open("work", False, "r")
    assert reader.config == b"new"
    with pytest.raises(ReadOnly):
        reader.set_config(b"newer", b"new")
    reader.close()


# --- read-only, stats, close -----------------------------------------------------


def test_reader_cannot_write(storage, repo):
    repo.close()
    reader = storage.open("work", False, "r")
    for call in (
        lambda: reader.put(ident(1), 1, b"", None),
        reader.flush,
        lambda: reader.commit(ident(1), b"", []),
        lambda: reader.delete_snapshot(ident(1)),
    ):
        with pytest.raises(ReadOnly) as e:
            call()
        assert e.value.code == "read_only"
    reader.close()


def test_stats(storage, repo):
    fill(repo, 3, size=100)
    fs = os.statvfs(storage.root)
    fs_size = fs.f_frsize * fs.f_blocks
    stats = repo.stats()
    assert 0 < stats.pop("fs_free") <= stats.pop("fs_size") == fs_size
    assert stats == {"packs": 0, "pack_bytes": 0, "blobs": 0, "bytes": 0, "snapshots": 0}
    repo.commit(ident(50), b"s", [])
    size = pack_files(storage)[0].stat().st_size
    stats = repo.stats()
    assert {k: stats[k] for k in ("packs", "pack_bytes", "blobs", "bytes", "snapshots")} == {
        "packs": 1, "pack_bytes": size, "blobs": 3, "bytes": 300, "snapshots": 1}


def test_close_seals_and_is_idempotent(storage, repo):
    fill(repo, 2)
    repo.close()
    repo.close()
    with pytest.raises(StorageError) as e:
        repo.have([])
    assert e.value.code == "internal"
    with storage.open("work", False, "r") as reader:
        assert reader.have([ident(0), ident(1)]) == []


# --- index: rebuild, reindex -----------------------------------------------------


def answers(repo, ids):
    stats = repo.stats()
    del stats["fs_free"]  # the file system's, not the repository's: other writers move it
    return (
        repo.have(ids),
        [repo.get(id) for id in ids],
        stats,
        repo.list_snapshots(),
    )


def index_files(storage):
    return [storage.root / "work" / f"index.sqlite{s}" for s in ("", "-wal", "-shm")]


@pytest.mark.parametrize("damage", ["delete", "garbage", "empty", "incomplete"])
@pytest.mark.parametrize("write", [False, True])
def test_index_rebuilt_from_packs(storage, repo, damage, write):
    ids = fill(repo, 40, size=300_000)  # two packs
    repo.put(ident(500), 2, b"node", ids[:3])
    repo.commit(ident(600), b"snap", [ident(500)])
    repo.close()
    wanted = ids + [ident(500), ident(999)]
    with storage.open("work", False, "r") as reader:
        before = answers(reader, wanted)
    assert before[2]["packs"] == 2
    main = index_files(storage)[0]
    if damage == "incomplete":
        conn = sqlite3.connect(main)
        conn.execute("DELETE FROM meta")
        conn.commit()
        conn.close()
    else:
        for path in index_files(storage):
            path.unlink(missing_ok=True)
        if damage == "garbage":
            main.write_bytes(os.urandom(8192))
        elif damage == "empty":
            main.touch()
    with storage.open("work", write, "after") as again:
        assert answers(again, wanted) == before
    assert storage.check("work") == []


def test_index_with_damaged_pages_rebuilt_by_writer(storage, repo):
    ids = fill(repo, 3000, size=10)
    repo.close()
    main = index_files(storage)[0]
    raw = bytearray(main.read_bytes())
    assert len(raw) > 8 * 4096
    raw[4096 * 3 : 4096 * 6] = os.urandom(3 * 4096)
    main.write_bytes(bytes(raw))
    assert any(p.startswith("index") for p in storage.check("work"))
    with storage.open("work", True, "writer") as again:
        assert again.have(ids) == []
    assert storage.check("work") == []


def test_reindex(storage, repo):
    fill(repo, 30, size=300_000)
    with pytest.raises(Locked):
        storage.reindex("work")
    repo.close()
    assert storage.reindex("work") == {"packs": 2, "blobs": 30, "bad_packs": 0}
    with storage.open("work", False, "r") as reader:
        assert reader.have([ident(n) for n in range(30)]) == []


def test_reindex_skips_bad_pack_and_check_reports_it(storage, repo):
    fill(repo, 30, size=300_000)
    repo.close()
    bad = pack_files(storage)[0]
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size - 10)
    report = storage.reindex("work")
    assert report["packs"] == 1 and report["bad_packs"] == 1 and 0 < report["blobs"] < 30
    problems = storage.check("work")
    assert any(bad.stem in p and "footer magic" in p for p in problems)


def fail_with(error: Exception):
    def fail(*_args: object, **_kwargs: object) -> None:
        raise error

    return fail


def test_orphan_pack_reindexed_on_open_for_writing(storage, repo, monkeypatch):
    """Crash between rename and index insert: the next writer indexes the pack."""
    ids = fill(repo, 3)
    monkeypatch.setattr(st.Index, "add_pack", fail_with(OSError(5, "simulated")))
    with pytest.raises(StorageError):
        repo.flush()
    monkeypatch.undo()
    assert repo.have(ids) == [0, 1, 2]
    assert any("not in the index" in p for p in storage.check("work"))
    repo.close()
    with storage.open("work", False, "r") as reader:
        assert reader.have(ids) == [0, 1, 2]  # readers do not repair
    with storage.open("work", True, "w") as writer:
        assert writer.have(ids) == []
        assert writer.get(ids[1]) == (1, data_of(1))
    assert storage.check("work") == []


def test_failed_seal_reported_by_next_flush(storage, repo, monkeypatch):
    """A pack that fails to seal during put loses its blobs; the next flush says so."""
    fill(repo, 2, size=3 << 20)
    monkeypatch.setattr(st.os, "rename", fail_with(OSError(28, "No space left")))
    with pytest.raises(StorageError) as e:
        fill(repo, 1, size=3 << 20, start=2)
    assert "No space left" in str(e.value) and e.value.code == "io"
    monkeypatch.undo()
    with pytest.raises(StorageError, match="lost"):
        repo.flush()
    repo.flush()
    assert repo.have([ident(0), ident(1), ident(2)]) == [0, 1, 2]
    assert os.listdir(storage.root / "work" / "staging") == [] and pack_files(storage) == []


# --- check -----------------------------------------------------------------------


def flip_bit(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


@pytest.fixture
def checked(storage, repo):
    """A repository with two packs, a tree node and a snapshot, closed."""
    ids = fill(repo, 40, size=300_000)
    repo.put(ident(500), 2, b"node", ids[:5])
    repo.commit(ident(600), b"snap", [ident(500), ids[-1]])
    repo.close()
    assert storage.check("work") == []
    return ids


def test_check_flipped_bit(storage, checked):
    path = pack_files(storage)[1]
    flip_bit(path, path.stat().st_size // 2)
    assert storage.check("work") == []  # the structure is intact: only reading the data finds it
    (problem,) = storage.check("work", read_data=True)
    assert path.stem in problem and ("CRC-32" in problem or "SHA-256" in problem)
    with storage.open("work", False, "r") as reader:
        with pytest.raises(Corrupt):
            for id in checked:
                reader.get(id)


def pack_of(storage: Storage, id: bytes) -> Path:
    conn = sqlite3.connect(storage.root / "work" / "index.sqlite")
    query = "SELECT p.name FROM blobs AS b JOIN packs AS p ON p.id = b.pack WHERE b.id = ?"
    (name,) = conn.execute(query, (id,)).fetchone()
    conn.close()
    return storage.root / "work" / "packs" / name[:2] / f"{name}.pack"


def test_check_missing_pack(storage, checked):
    path = pack_of(storage, checked[0])
    assert path != pack_of(storage, ident(500))
    path.unlink()
    assert storage.check("work") == [f"index names pack '{path.stem}', which is missing"]
    with storage.open("work", False, "r") as reader, pytest.raises(Corrupt, match="missing"):
        for id in checked:
            reader.get(id)


def test_check_dangling_refs(storage, checked):
    conn = sqlite3.connect(storage.root / "work" / "index.sqlite")
    conn.execute("DELETE FROM blobs WHERE id = ?", (checked[0],))  # a child of node 500
    conn.execute("DELETE FROM blobs WHERE id = ?", (checked[-1],))  # a root of snapshot 600
    conn.commit()
    conn.close()
    problems = storage.check("work")
    assert any(p.startswith(f"snapshot {ident(600).hex()} references 1 missing ids") for p in problems)
    assert any(p.startswith(f"blob {ident(500).hex()} references 1 missing ids") for p in problems)


def test_check_index_pointing_nowhere(storage, checked):
    conn = sqlite3.connect(storage.root / "work" / "index.sqlite")
    conn.execute("UPDATE blobs SET pos = pos + 1 WHERE id = ?", (checked[3],))
    conn.commit()
    conn.close()
    problems = storage.check("work")
    assert any("index entries point nowhere" in p for p in problems)
    with storage.open("work", False, "r") as reader, pytest.raises(Corrupt):
        reader.get(checked[3])


def test_check_damaged_snapshot_and_strays(storage, checked):
    snap = storage.root / "work" / "snapshots" / ident(600).hex()
    flip_bit(snap, 70)
    (storage.root / "work" / "snapshots" / "notes.txt").write_text("x")
    (storage.root / "work" / "packs" / "zz").mkdir()
    problems = storage.check("work")
    assert any(p.startswith(f"snapshot {ident(600).hex()}: checksum mismatch") for p in problems)
    assert "unexpected file snapshots/'notes.txt'" in problems
    assert "unexpected file packs/'zz'" in problems
    with storage.open("work", False, "r") as reader:
        with pytest.raises(Corrupt):
            reader.get_snapshot(ident(600))


# --- hostile files on disk -------------------------------------------------------


def sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def test_hostile_config_file(storage, repo):
    repo.close()
    config = storage.root / "work" / "config"
    good = config.read_bytes()
    for bad in (good[:-1], good[:10], b"", b"X" + good[1:], good[:-1] + bytes([good[-1] ^ 1])):
        config.write_bytes(bad)
        for write in (False, True):
            with pytest.raises(StorageError) as e:
                storage.open("work", write, "x")
            assert e.value.code == "io" and "config file" in str(e.value) and "\n" not in str(e.value)
    sparse(config, 1 << 40)
    with pytest.raises(Corrupt, match="over the limit"):
        storage.open("work", False, "x")
    config.write_bytes(good)
    storage.open("work", True, "x").close()  # the failed opens released the lock


def test_hostile_snapshot_files(storage, checked):
    snaps = storage.root / "work" / "snapshots"
    sparse(snaps / ident(700).hex(), 1 << 40)
    (snaps / ident(701).hex()).write_bytes((snaps / ident(600).hex()).read_bytes())  # wrong name
    (snaps / ident(702).hex()).write_bytes(b"QBKSNAP\x00" + b"\xff" * 100)
    with storage.open("work", False, "r") as reader:
        assert [s[0] for s in reader.list_snapshots()] == [ident(600)]
        for n, message in ((700, "over the limit"), (701, "holds snapshot"), (702, "magic")):
            with pytest.raises(Corrupt, match=message):
                reader.get_snapshot(ident(n))
    assert len(storage.check("work")) == 3


def test_hostile_index_rows(storage, checked):
    conn = sqlite3.connect(storage.root / "work" / "index.sqlite")
    conn.execute("UPDATE blobs SET length = ? WHERE id = ?", (1 << 40, checked[0]))
    conn.execute("UPDATE blobs SET type = 'x' WHERE id = ?", (checked[1],))
    conn.execute("INSERT INTO packs (name, size) VALUES ('../../../etc/passwd', 1)")
    conn.execute("UPDATE blobs SET pack = last_insert_rowid() WHERE id = ?", (checked[2],))
    conn.commit()
    conn.close()
    with storage.open("work", False, "r") as reader:
        for id in checked[:3]:
            with pytest.raises(Corrupt, match="out of bounds"):
                reader.get(id)
    assert storage.check("work")


def test_hostile_index_pack_names_do_not_crash_check(storage, checked):
    conn = sqlite3.connect(storage.root / "work" / "index.sqlite")
    conn.execute("INSERT INTO packs (name, size) VALUES (X'00ff', 1)")  # a blob where text belongs
    conn.execute("INSERT INTO packs (name, size) VALUES ('not a pack', 1)")
    conn.commit()
    conn.close()
    problems = storage.check("work")
    assert "index names an invalid pack b'\\x00\\xff'" in problems
    assert "index names an invalid pack 'not a pack'" in problems


def test_unreadable_snapshot_entry_does_not_hide_the_others(storage, checked):
    (storage.root / "work" / "snapshots" / ident(700).hex()).mkdir()
    with storage.open("work", False, "r") as reader:
        assert [s[0] for s in reader.list_snapshots()] == [ident(600)]


def test_hostile_pack_files(storage, checked):
    shard = storage.root / "work" / "packs" / "ab"
    shard.mkdir(exist_ok=True)
    sparse(shard / ("ab" + "0" * 30 + ".pack"), 100 << 30)
    (shard / ("ab" + "1" * 30 + ".pack")).write_bytes(b"\0" * 1000)
    with storage.open("work", True, "w") as writer:  # orphan recovery skips them
        assert writer.stats()["packs"] == 2
    problems = storage.check("work")
    assert len(problems) == 2 and all("pack ab" in p for p in problems)
    assert storage.reindex("work")["bad_packs"] == 2


# --- lock ------------------------------------------------------------------------


def test_two_writers_in_one_process(storage, repo):
    with pytest.raises(Locked) as e:
        storage.open("work", True, "second writer")
    assert e.value.code == "locked"
    assert e.value.holder["pid"] == os.getpid() and e.value.holder["holder"] == "test writer"
    assert isinstance(e.value.holder["time"], int)
    assert "test writer" in str(e.value)
    repo.close()
    storage.open("work", True, "second writer").close()


def test_writer_in_another_process(storage, repo):
    repo.close()
    child = subprocess.Popen(
        [sys.executable, str(CHILD), "hold", str(storage.root), "work", "child holder"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline() == "locked\n"
        with pytest.raises(Locked) as e:
            storage.open("work", True, "parent")
        assert e.value.holder["pid"] == child.pid and e.value.holder["holder"] == "child holder"
        with storage.open("work", False, "reader") as reader:  # readers take no lock
            assert reader.have([ident(1)]) == [0]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdin.close()
        child.stdout.close()
    with storage.open("work", True, "parent") as writer:  # the kernel dropped the dead holder's lock
        assert writer.write


def test_unreadable_holder_info(storage, repo):
    lock = storage.root / "work" / "lock"
    for junk in (b"", b"[" * 4000, b'{"pid": "1", "holder": "x", "time": 1}', b"\xff\xfe"):
        with open(lock, "r+b") as f:
            f.truncate(0)
            f.write(junk)
        with pytest.raises(Locked) as e:
            storage.open("work", True, "x")
        assert e.value.holder == {} and "unknown holder" in str(e.value)


def test_readers_beside_a_writer(storage, repo):
    first = fill(repo, 5)
    reader = storage.open("work", False, "reader")
    assert reader.have(first) == list(range(5))  # open pack: not visible
    assert reader.get(first[0]) is None
    repo.flush()
    assert reader.have(first) == []
    second = fill(repo, 5, start=5)
    assert reader.get(second[0]) is None and repo.get(second[0]) == (2, data_of(5))
    repo.commit(ident(100), b"s", second)
    assert [s[0] for s in reader.list_snapshots()] == [ident(100)]
    assert reader.get(second[4]) == (0, data_of(9))
    reader.close()


# --- the index never names a blob whose refs it does not all name -----------------


@pytest.fixture
def two_packs(storage, repo):
    """Chunks in one pack, a node referencing them and a snapshot in another: (chunk pack, node pack)."""
    chunks = fill(repo, 3)
    repo.flush()
    repo.put(ident(50), 2, b"node", chunks)
    repo.put(ident(51), 2, b"parent", [ident(50)])
    repo.commit(ident(60), b"snapshot", [ident(51)])
    repo.close()
    return pack_of(storage, ident(0)), pack_of(storage, ident(50))


def test_rebuild_leaves_out_nodes_whose_children_are_lost(storage, two_packs):
    chunk_pack, _ = two_packs
    chunk_pack.unlink()
    assert storage.reindex("work") == {"packs": 1, "blobs": 2, "bad_packs": 0}
    with storage.open("work", True, "w") as repo:
        # a client asking HAVE is not told the incomplete nodes exist: it sends them again
        assert repo.have([ident(50), ident(51)]) == [0, 1]
        fill(repo, 3)
        assert repo.put(ident(50), 2, b"node", [ident(0), ident(1), ident(2)])
    assert any("references 1 missing ids" in p for p in storage.check("work"))  # the old snapshot


def test_orphan_recovery_leaves_out_nodes_whose_children_are_lost(storage, two_packs):
    chunk_pack, node_pack = two_packs
    conn = sqlite3.connect(storage.root / "work" / "index.sqlite")
    conn.execute("DELETE FROM blobs")
    conn.execute("DELETE FROM refs")
    conn.execute("DELETE FROM packs")
    conn.commit()
    conn.close()
    chunk_pack.unlink()  # the node pack is an orphan whose nodes' children are gone
    with storage.open("work", True, "w") as repo:
        assert repo.stats()["packs"] == 1
        assert repo.have([ident(50), ident(51)]) == [0, 1]
    assert node_pack.exists()


def test_format_1_index_is_read_as_it_is_and_migrated_by_a_writer(storage, two_packs):
    """Index format 1 kept the refs WITHOUT ROWID; a writer's open migrates it in place."""
    path = storage.root / "work" / "index.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE old (id BLOB PRIMARY KEY, refs BLOB NOT NULL) WITHOUT ROWID;"
        "INSERT INTO old SELECT id, refs FROM refs; DROP TABLE refs; ALTER TABLE old RENAME TO refs;"
        "UPDATE meta SET value = 1 WHERE key = 'format';"
    )
    conn.close()
    with storage.open("work", False, "reader") as reader:
        assert reader.have([ident(50), ident(51)]) == [] and reader._index.format == 1
    with storage.open("work", True, "writer") as writer:
        assert writer._index.format == 2 and writer.have([ident(50), ident(51)]) == []
    conn = sqlite3.connect(path)
    assert "WITHOUT ROWID" not in conn.execute("SELECT sql FROM sqlite_master WHERE name = 'refs'").fetchone()[0]
    assert conn.execute("SELECT value FROM meta").fetchone() == (2,)
    conn.close()
    assert storage.check("work") == []
