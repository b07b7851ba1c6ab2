# SPDX-License-Identifier: GPL-2.0-or-later
"""`check --read-data` finds bit rot in any record of any pack, without keys,
and attributes it: the damaged blob ids, and each snapshot that reaches one
with the refs (volume roots) it reaches it through."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest

from qbackupd import pack
from qbackupd.check import check_repository
from qbackupd.storage import MIN_PACK_SIZE, Storage


def ident(name: object) -> bytes:
    return hashlib.sha256(repr(name).encode()).digest()


def data_of(name: object, size: int = 2000) -> bytes:
    return hashlib.shake_256(repr(name).encode()).digest(size)


@pytest.fixture
def storage(tmp_path) -> Storage:
    """Two volumes' trees (two levels) and three snapshots:
    s1 = {vol a v1, vol b}, s2 = {vol a v2, vol b}, s3 = {vol b}.
    Chunks a0..a9 are shared by a v1 and a v2 except a9 (v1 only) and a9' (v2 only)."""
    storage = Storage(tmp_path / "store")
    with storage.create("work", b"config", MIN_PACK_SIZE, "creator") as repo:
        for name in [f"a{i}" for i in range(10)] + ["a9'"] + [f"b{i}" for i in range(5)]:
            repo.put(ident(name), 1, data_of(name), None)
        leaves = {
            "a-v1": [f"a{i}" for i in range(10)],
            "a-v2": [f"a{i}" for i in range(9)] + ["a9'"],
            "b": [f"b{i}" for i in range(5)],
        }
        for leaf, chunks in leaves.items():
            repo.put(ident(f"leaf {leaf}"), 2, b"leaf", [ident(c) for c in chunks])
            repo.put(ident(f"root {leaf}"), 2, b"root", [ident(f"leaf {leaf}")])
        repo.commit(ident("s1"), b"m1", [ident("root a-v1"), ident("root b")])
        repo.commit(ident("s2"), b"m2", [ident("root a-v2"), ident("root b")])
        repo.commit(ident("s3"), b"m3", [ident("root b")])
    return storage


def flip_record(storage: Storage, name: str) -> None:
    """Flip one bit in the data of blob `name`'s record."""
    conn = sqlite3.connect(storage.root / "work" / "index.sqlite")
    pack_name, pos = conn.execute(
        "SELECT p.name, b.pos FROM blobs b JOIN packs p ON p.id = b.pack WHERE b.id = ?", (ident(name),)
    ).fetchone()
    conn.close()
    path = storage.root / "work" / "packs" / pack_name[:2] / f"{pack_name}.pack"
    raw = bytearray(path.read_bytes())
    raw[pos + pack.RECORD_HEADER_SIZE + 7] ^= 0x04
    path.write_bytes(bytes(raw))


def test_healthy(storage):
    report = check_repository(storage, "work", read_data=True)
    assert report.problems == [] and report.damaged == set() and report.affected == []


def test_bit_rot_found_only_by_reading_the_data_and_attributed(storage):
    flip_record(storage, "a9'")
    flip_record(storage, "b3")
    quick = check_repository(storage, "work")
    assert quick.problems == [] and quick.affected == []  # trailers are intact
    report = check_repository(storage, "work", read_data=True)
    assert len(report.problems) == 1 and "fails its CRC-32" in report.problems[0]
    assert "2 damaged records" in report.problems[0]
    assert report.damaged == {ident("a9'"), ident("b3")}
    assert sorted(report.affected) == sorted([
        (ident("s1"), [ident("root b")]),
        (ident("s2"), [ident("root a-v2"), ident("root b")]),
        (ident("s3"), [ident("root b")]),
    ])
    assert report.complete


def test_chunk_of_one_volume_version_affects_only_its_snapshot(storage):
    flip_record(storage, "a9")
    report = check_repository(storage, "work", read_data=True)
    assert report.damaged == {ident("a9")}
    assert report.affected == [(ident("s1"), [ident("root a-v1")])]


def test_lost_pack_and_missing_refs_are_attributed(storage):
    (path,) = (storage.root / "work" / "packs").glob("*/*.pack")
    path.unlink()
    report = check_repository(storage, "work")
    assert any("which is missing" in p for p in report.problems)
    assert len(report.damaged) == 16 + 6  # every blob of the lost pack
    assert {s for s, _ in report.affected} == {ident("s1"), ident("s2"), ident("s3")}


def test_damaged_snapshot_file_is_named(storage):
    path = storage.root / "work" / "snapshots" / ident("s3").hex()
    raw = bytearray(path.read_bytes())
    raw[70] ^= 1
    path.write_bytes(bytes(raw))
    report = check_repository(storage, "work", read_data=True)
    assert report.bad_snapshots == [ident("s3")] and report.damaged == set()
