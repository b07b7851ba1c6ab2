# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests for qbackup.state: the local record and the rollback/fork rules."""

import json
import os
import stat
from dataclasses import dataclass

import pytest

from qbackup.errors import QbackupError, RollbackError
from qbackup.state import Record, State

REPO = bytes(range(32))
OTHER_REPO = bytes(32)


@dataclass
class Snap:
    id: bytes
    time: float
    predecessor: bytes | None


def sid(n: int) -> bytes:
    return bytes([n]) * 32


def chain(n: int) -> list[Snap]:
    """Snapshots 1..n, each the predecessor of the next."""
    return [Snap(sid(i), 1000.0 + i, sid(i - 1) if i > 1 else None) for i in range(1, n + 1)]


@pytest.fixture
def state(tmp_path):
    return State(str(tmp_path / "state"))


def test_first_use_accepts_and_records_newest(state):
    assert state.load(REPO) == Record()
    state.accept(REPO, chain(3))
    record = state.load(REPO)
    assert (record.head, record.head_time) == (sid(3), 1003.0)
    assert record.deleted == set()


def test_file_is_private_and_atomic(state, tmp_path):
    state.record_head(REPO, sid(1), 5.0)
    path = tmp_path / "state" / (REPO.hex() + ".json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    assert not (tmp_path / "state" / (REPO.hex() + ".json.tmp")).exists()
    doc = json.loads(path.read_text())
    assert doc["format"] == "qbackup-state" and doc["version"] == 1
    assert doc["head"] == {"id": sid(1).hex(), "time": 5.0}


def test_interrupted_write_leaves_old_record(state, tmp_path):
    """A crash between writing the temporary file and renaming it changes nothing."""
    state.record_head(REPO, sid(1), 5.0)
    tmp = tmp_path / "state" / (REPO.hex() + ".json.tmp")
    tmp.write_text("{half a rec")
    assert state.load(REPO).head == sid(1)
    state.record_head(REPO, sid(2), 6.0)  # the stale temporary file is replaced
    assert state.load(REPO).head == sid(2)
    assert not tmp.exists()


def test_repositories_are_separate(state):
    state.record_head(REPO, sid(1), 5.0)
    assert state.load(OTHER_REPO) == Record()


def test_growing_history_is_accepted(state):
    state.accept(REPO, chain(2))
    state.accept(REPO, chain(5))
    assert state.load(REPO).head == sid(5)


def test_rollback_is_refused(state):
    state.accept(REPO, chain(5))
    with pytest.raises(RollbackError) as exc:
        state.accept(REPO, chain(4))
    message = str(exc.value)
    assert sid(5).hex() in message and "missing" in message and "--allow-rollback" in message
    assert "\n" not in message
    assert state.load(REPO).head == sid(5)  # record unchanged


def test_empty_repository_after_history_is_rollback(state):
    state.accept(REPO, chain(2))
    with pytest.raises(RollbackError):
        state.accept(REPO, [])


def test_fork_is_refused(state):
    state.accept(REPO, chain(3))
    fork = Snap(sid(9), 2000.0, sid(2))  # newer than head 3 but branches off 2
    with pytest.raises(RollbackError, match=f"{sid(9).hex()} is newer.*forked"):
        state.accept(REPO, chain(3) + [fork])
    orphan = Snap(sid(9), 2000.0, None)
    with pytest.raises(RollbackError, match="forked"):
        state.accept(REPO, chain(3) + [orphan])


def test_descendant_through_several_snapshots(state):
    state.accept(REPO, chain(3))
    state.accept(REPO, chain(7))  # 7 -> 6 -> 5 -> 4 -> 3
    assert state.load(REPO).head == sid(7)


def test_descent_through_a_hidden_snapshot_is_a_fork(state):
    state.accept(REPO, chain(3))
    snaps = chain(5)
    del snaps[3]  # 4 gone: 5's descent from 3 cannot be shown
    with pytest.raises(RollbackError, match="forked"):
        state.accept(REPO, snaps)


def test_predecessor_cycle_terminates(state):
    state.accept(REPO, chain(1))
    a = Snap(sid(20), 3000.0, sid(21))
    b = Snap(sid(21), 3001.0, sid(20))
    with pytest.raises(RollbackError, match="forked"):
        state.accept(REPO, chain(1) + [a, b])


def test_older_side_branch_is_not_a_fork(state):
    state.accept(REPO, chain(3))
    old = Snap(sid(30), 500.0, None)  # older than the head: not checked
    state.accept(REPO, chain(3) + [old])
    assert state.load(REPO).head == sid(3)


def test_own_deletion_of_head_is_not_rollback(state):
    state.accept(REPO, chain(3))
    state.record_deleted(REPO, sid(3), chain(3))
    state.accept(REPO, chain(2))
    record = state.load(REPO)
    assert record.head == sid(2)  # the newest remaining snapshot
    assert record.deleted == {sid(3)}
    # a later snapshot following the deleted one descends from the new head
    later = Snap(sid(4), 1004.0, sid(3))
    with pytest.raises(RollbackError, match="forked"):
        # 4 names 3 (deleted, unknown) as predecessor: not provably after head 2
        state.accept(REPO, chain(2) + [later])
    state.accept(REPO, chain(2) + [Snap(sid(4), 1004.0, sid(2))])
    assert state.load(REPO).head == sid(4)


def test_hiding_the_newest_left_after_deleting_the_head_is_rollback(state):
    """Deleting the head moves it to the newest snapshot left at once: the
    repository cannot hide that one before the next listing."""
    state.accept(REPO, chain(3))
    state.record_deleted(REPO, sid(3), chain(3))
    record = state.load(REPO)
    assert (record.head, record.head_time, record.deleted) == (sid(2), 1002.0, {sid(3)})
    with pytest.raises(RollbackError, match=f"{sid(2).hex()}.*missing"):
        state.accept(REPO, chain(1))
    state.accept(REPO, chain(2))
    assert state.load(REPO).head == sid(2)


def test_deleting_an_older_snapshot_keeps_the_head(state):
    state.accept(REPO, chain(3))
    state.record_deleted(REPO, sid(1), chain(3))
    assert state.load(REPO).head == sid(3)


def test_deleting_everything(state):
    state.accept(REPO, chain(1))
    state.record_deleted(REPO, sid(1), chain(1))
    state.accept(REPO, [])
    assert state.load(REPO).head == sid(1)


def test_own_deletion_of_older_snapshot(state):
    state.accept(REPO, chain(3))
    state.record_deleted(REPO, sid(1), chain(3))
    snaps = chain(3)[1:]
    state.accept(REPO, snaps)
    assert state.load(REPO).head == sid(3)


def test_replayed_deleted_snapshot_is_refused(state):
    state.accept(REPO, chain(3))
    state.record_deleted(REPO, sid(3), chain(3))
    state.accept(REPO, chain(2))
    with pytest.raises(RollbackError, match=f"{sid(3).hex()} was deleted by this dom0"):
        state.accept(REPO, chain(3))


def test_allow_rollback_resets_the_record(state):
    state.accept(REPO, chain(5))
    state.record_deleted(REPO, sid(1), chain(5))
    state.accept(REPO, chain(2), allow_rollback=True)
    record = state.load(REPO)
    assert (record.head, record.deleted) == (sid(2), set())
    state.accept(REPO, chain(2))  # the reset record is now the reference
    state.accept(REPO, [], allow_rollback=True)
    assert state.load(REPO) == Record()


def test_record_head_after_commit(state):
    state.accept(REPO, chain(2))
    state.record_head(REPO, sid(3), 1003.0)
    with pytest.raises(RollbackError):
        state.accept(REPO, chain(2))  # the snapshot we wrote vanished
    state.accept(REPO, chain(3))


@pytest.mark.parametrize("content", [
    "not json",
    "[]",
    '{"format": "qbackup-state", "version": 2, "repo_id": "%s", "head": null, "deleted": []}' % REPO.hex(),
    '{"format": "qbackup-state", "version": 1, "repo_id": "%s", "head": null, "deleted": []}' % OTHER_REPO.hex(),
    '{"format": "qbackup-state", "version": 1, "repo_id": "%s", "head": {"id": "zz"}, "deleted": []}' % REPO.hex(),
    '{"format": "qbackup-state", "version": 1, "repo_id": "%s", "head": null, "deleted": [1]}' % REPO.hex(),
])
def test_corrupt_state_file(state, tmp_path, content):
    os.makedirs(tmp_path / "state")
    (tmp_path / "state" / (REPO.hex() + ".json")).write_text(content)
    with pytest.raises(QbackupError, match="state file"):
        state.load(REPO)
    with pytest.raises(QbackupError, match="state file"):
        state.accept(REPO, chain(1))


def test_unwritable_directory(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(QbackupError, match="cannot open state"):
        State(str(tmp_path / "file" / "sub")).record_head(REPO, sid(1), 1.0)
