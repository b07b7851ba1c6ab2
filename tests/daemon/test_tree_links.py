# SPDX-License-Identifier: GPL-2.0-or-later
"""Symbolic links, FIFOs and hard links planted in the storage tree are
refused with a clear one-line error, never followed: the daemon must not
read, truncate, write or delete anything outside its tree, nor block on a
FIFO (issue 11 §1).  The storage root itself may be a symlink (the
administrator's choice)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from qbackupd.check import check_repository
from qbackupd.storage import MIN_PACK_SIZE, Storage, StorageError
from hangguard import within


def ident(n: int) -> bytes:
    return hashlib.sha256(b"id %d" % n).digest()


@pytest.fixture
def storage(tmp_path) -> Storage:
    storage = Storage(tmp_path / "store")
    with storage.create("work", b"config", MIN_PACK_SIZE, "creator") as repo:
        for n in range(3):
            repo.put(ident(n), 1, b"data %d" % n, None)
        repo.put(ident(10), 2, b"node", [ident(0), ident(1)])
        repo.commit(ident(100), b"snapshot", [ident(10)])
    return storage


@pytest.fixture
def outside(tmp_path) -> Path:
    """A file outside the storage tree that must never change."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    return victim


def repo_dir(storage: Storage) -> Path:
    return storage.root / "work"


def the_pack(storage: Storage) -> Path:
    (path,) = (repo_dir(storage) / "packs").glob("*/*.pack")
    return path


def replace_with_link(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


def refused(call, *needles: str) -> str:
    with pytest.raises(StorageError) as e:
        within(call)
    message = str(e.value)
    assert "\n" not in message and any(n in message for n in needles), message
    return message


def test_lock_symlink_and_hard_link_are_refused(storage, outside):
    lock = repo_dir(storage) / "lock"
    replace_with_link(lock, outside)
    refused(lambda: storage.open("work", True, "w"), "symbolic link")
    lock.unlink()
    os.link(outside, lock)
    refused(lambda: storage.open("work", True, "w"), "hard links")
    assert outside.read_bytes() == b"precious"  # never truncated nor written
    lock.unlink()
    os.mkfifo(lock)
    refused(lambda: storage.open("work", True, "w"), "FIFO")
    lock.unlink()
    storage.open("work", True, "w").close()


def test_staging_symlink_is_refused_and_nothing_outside_is_deleted(storage, tmp_path, outside):
    staging = repo_dir(storage) / "staging"
    staging.rmdir()
    staging.symlink_to(tmp_path)  # a writer's open empties staging: it must not empty tmp_path
    refused(lambda: storage.open("work", True, "w"), "symbolic link")
    assert outside.read_bytes() == b"precious"
    staging.unlink()
    staging.mkdir()
    (staging / "planted.tmp").symlink_to(outside)  # a link inside staging is removed, not followed
    storage.open("work", True, "w").close()
    assert not (staging / "planted.tmp").exists() and outside.read_bytes() == b"precious"


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_planted_pack_is_refused_by_get_check_and_reindex(storage, tmp_path, kind):
    path = the_pack(storage)
    copy = tmp_path / "copy.pack"
    copy.write_bytes(path.read_bytes())  # a valid pack: only where it lives is wrong
    path.unlink()
    if kind == "symlink":
        path.symlink_to(copy)
    elif kind == "hardlink":
        os.link(copy, path)
    else:
        os.mkfifo(path)
    needle = {"symlink": "symbolic link", "hardlink": "hard links", "fifo": "FIFO"}[kind]
    with storage.open("work", False, "r") as reader:
        refused(lambda: reader.get(ident(0)), needle)
    report = within(lambda: check_repository(storage, "work", read_data=True))
    assert any(needle in p for p in report.problems), report.problems
    assert {ident(0), ident(1), ident(2), ident(10)} <= report.damaged
    assert report.affected == [(ident(100), [ident(10)])]
    assert within(lambda: storage.reindex("work"))["bad_packs"] == 1
    assert copy.read_bytes()[:8] == b"QBKPACK\x00"


def test_planted_shard_directory_is_refused(storage, tmp_path):
    path = the_pack(storage)
    shard = path.parent
    moved = tmp_path / "elsewhere"
    shard.rename(moved)
    shard.symlink_to(moved)
    with storage.open("work", False, "r") as reader:
        refused(lambda: reader.get(ident(0)), "symbolic link")
    problems = storage.check("work")
    assert f"unexpected file packs/'{shard.name}'" in problems


def test_planted_snapshot_config_and_index_links(storage, tmp_path, outside):
    snapshot = repo_dir(storage) / "snapshots" / ident(100).hex()
    copy = tmp_path / "snapshot"
    copy.write_bytes(snapshot.read_bytes())
    replace_with_link(snapshot, copy)
    with storage.open("work", False, "r") as reader:
        assert reader.list_snapshots() == []  # not listed, logged
        refused(lambda: reader.get_snapshot(ident(100)), "symbolic link")
    assert any("symbolic link" in p for p in storage.check("work"))
    snapshot.unlink()
    snapshot.write_bytes(copy.read_bytes())

    for name in ("config", "index.sqlite"):
        path = repo_dir(storage) / name
        (tmp_path / name).write_bytes(path.read_bytes())
        replace_with_link(path, tmp_path / name)
        for write in (False, True):
            refused(lambda: storage.open("work", write, "x"), "symbolic link")
        path.unlink()
        path.write_bytes((tmp_path / name).read_bytes())
    (repo_dir(storage) / "index.sqlite-wal").symlink_to(outside)
    refused(lambda: storage.open("work", True, "x"), "symbolic link")
    assert outside.read_bytes() == b"precious"


def test_repository_symlink_is_refused_but_the_root_may_be_one(storage, tmp_path):
    (storage.root / "alias").symlink_to(repo_dir(storage))
    refused(lambda: storage.open("alias", False, "x"), "symbolic link")
    via_link = tmp_path / "root-link"
    via_link.symlink_to(storage.root)
    with Storage(via_link).open("work", False, "x") as reader:
        assert reader.get(ident(0)) == (1, b"data 0")


def test_the_daemon_answers_a_planted_link_with_an_io_error(daemon, tmp_path):
    client = daemon.open_repo(create=True)
    client.bye()
    lock = daemon.storage / "repo" / "lock"
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    lock.unlink()
    lock.symlink_to(victim)
    client = daemon.client()
    answer = client.expect_error("io", "open", write=True)
    assert "symbolic link" in answer["message"]
    assert client.call("open", write=False)["op"] == "opened"  # the session goes on
    client.bye()
    assert victim.read_bytes() == b"precious"
