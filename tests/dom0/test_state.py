# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests for qbackup.state: the local record and the rollback/fork rules."""

import json
import os
import stat
from dataclasses import dataclass

import pytest

from qbackup.errors import QbackupError, RepositoryChanged, RollbackError
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
    assert doc == {"format": "qbackup-state", "version": 2, "repo_id": REPO.hex(),
                   "head": {"id": sid(1).hex(), "time": 5.0}, "seen": [sid(1).hex()],
                   "deleted": [], "deleting": [], "lost": [], "protected": []}


def test_version_1_file_is_migrated(state, tmp_path):
    """A version 1 record knew the head and the deletions: the head is all
    it has seen. It is rewritten as version 2 on the next change."""
    os.makedirs(tmp_path / "state")
    path = tmp_path / "state" / (REPO.hex() + ".json")
    path.write_text(json.dumps({"format": "qbackup-state", "version": 1, "repo_id": REPO.hex(),
                                "head": {"id": sid(3).hex(), "time": 1003.0},
                                "deleted": [sid(9).hex()]}))
    assert state.load(REPO) == Record(sid(3), 1003.0, seen={sid(3)}, deleted={sid(9)})
    with pytest.raises(RollbackError, match=f"{sid(3).hex()}, the newest"):
        state.accept(REPO, chain(2))
    state.accept(REPO, chain(4))
    doc = json.loads(path.read_text())
    assert doc["version"] == 2 and doc["seen"] == [sid(i).hex() for i in range(1, 5)]
    assert doc["deleted"] == [sid(9).hex()]


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


def test_descent_through_a_hidden_snapshot_is_a_gap(state):
    state.accept(REPO, chain(3))
    snaps = chain(5)
    del snaps[3]  # 4 gone: 5's descent from 3 cannot be shown
    with pytest.raises(RollbackError, match=f"{sid(5).hex()} follows {sid(4).hex()}, which is missing"):
        state.accept(REPO, snaps)


@pytest.mark.parametrize("hidden", [1, 3, 5], ids=["oldest", "middle", "newest"])
@pytest.mark.parametrize("linked", [False, True], ids=["unlinked", "chained"])
def test_hidden_snapshot_anywhere_is_refused(state, hidden, linked):
    """Every snapshot dom0 has seen must stay listed, not only the head.
    Unlinked snapshots (no predecessors) leave only the record of seen ids
    to notice; in a chain the gap rule would too."""
    snaps = chain(5) if linked else [Snap(s.id, s.time, None) for s in chain(5)]
    state.accept(REPO, snaps)
    listed = [s for s in snaps if s.id != sid(hidden)]
    with pytest.raises(RollbackError, match=f"{sid(hidden).hex()}, (one|the newest) this dom0 has"
                       " seen, is missing"):
        state.accept(REPO, listed)
    assert state.load(REPO).seen == {sid(i) for i in range(1, 6)}  # record unchanged


def test_gap_in_the_chain_is_refused_on_first_use(state):
    """An authenticated predecessor that is neither listed nor deleted by this
    dom0 is a gap, even without any record."""
    snaps = [s for s in chain(4) if s.id != sid(2)]
    with pytest.raises(RollbackError, match=f"{sid(3).hex()} follows {sid(2).hex()}"):
        state.accept(REPO, snaps)
    assert state.load(REPO) == Record()


def test_own_deletion_in_the_middle_is_no_gap(state):
    state.accept(REPO, chain(4))
    state.record_deleted(REPO, sid(2), chain(4))
    state.accept(REPO, [s for s in chain(4) if s.id != sid(2)])
    assert state.load(REPO).seen == {sid(1), sid(3), sid(4)}


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


def test_allow_rollback_accepts_the_listing_but_keeps_deletions(state):
    state.accept(REPO, chain(5))
    state.record_deleted(REPO, sid(1), chain(5))
    listed = chain(5)[1:2]  # only 2 is left: 3, 4 and 5 are gone
    replayed = state.accept(REPO, listed, allow_rollback=True)
    record = state.load(REPO)
    assert replayed == set()
    assert (record.head, record.seen, record.deleted) == (sid(2), {sid(2)}, {sid(1)})
    assert record.lost == {sid(3), sid(4), sid(5)}
    state.accept(REPO, listed)  # the accepted listing is now the reference
    with pytest.raises(RollbackError, match=f"{sid(1).hex()} was deleted by this dom0"):
        state.accept(REPO, chain(2))  # a deletion replayed after the override: still refused
    # with the override, a replayed deletion is left out, and stays deleted
    assert state.accept(REPO, chain(2), allow_rollback=True) == {sid(1)}
    assert state.load(REPO).deleted == {sid(1)} and state.load(REPO).seen == {sid(2)}
    # what was lost may come back (a repaired backup qube): it is seen again
    state.accept(REPO, chain(5)[1:])
    assert state.load(REPO).lost == set() and state.load(REPO).head == sid(5)


def test_allow_rollback_on_an_empty_listing(state):
    state.accept(REPO, chain(2))
    state.accept(REPO, [], allow_rollback=True)
    record = state.load(REPO)
    assert (record.head, record.seen, record.lost) == (None, set(), {sid(1), sid(2)})


def test_allow_rollback_accepts_a_gap(state):
    snaps = [s for s in chain(4) if s.id != sid(2)]
    state.accept(REPO, snaps, allow_rollback=True)
    assert state.load(REPO).lost == {sid(2)}
    state.accept(REPO, snaps)  # the gap is known now


def test_unconfirmed_deletions_are_settled_by_the_next_listing(state):
    """dom0 marks snapshots as being deleted before asking; stopped before
    the confirmation, the next listing says which went and which stayed."""
    state.accept(REPO, chain(4))
    state.record_deleting(REPO, [sid(1), sid(2)])
    listed = [s for s in chain(4) if s.id != sid(1)]  # 1 went, 2 stayed
    state.accept(REPO, listed)
    record = state.load(REPO)
    assert record.deleted == {sid(1)} and sid(2) in record.seen and record.deleting == set()
    with pytest.raises(RollbackError, match="deleted by this dom0"):
        state.accept(REPO, chain(4))


def test_damaged_snapshots_are_present_not_hidden(state):
    """A listed snapshot whose manifest fails authentication is reported by
    the caller; it is neither missing nor a gap, and a damaged head stays
    the head."""
    state.accept(REPO, chain(4))
    listed = [s for s in chain(4) if s.id not in (sid(2), sid(4))]
    state.accept(REPO, listed, damaged=[sid(2), sid(4)])
    record = state.load(REPO)
    assert record.head == sid(4) and record.seen == {sid(i) for i in range(1, 5)}
    unknown = bytes([77]) * 32  # a damaged entry dom0 never saw is not recorded as seen
    state.accept(REPO, chain(4), damaged=[unknown])
    assert unknown not in state.load(REPO).seen


def test_protection_is_recorded_and_dropped_on_deletion(state):
    state.accept(REPO, chain(3))
    state.set_protected(REPO, sid(2), True)
    assert state.load(REPO).protected == {sid(2)}
    state.set_protected(REPO, sid(2), False)
    assert state.load(REPO).protected == set()
    state.set_protected(REPO, sid(1), True)
    state.record_deleted(REPO, sid(1), chain(3))
    assert state.load(REPO).protected == set()


def test_pins(state, tmp_path):
    assert state.pins() == {}
    assert state.check_pin("sys-backup", "daily", REPO)  # first use pins
    assert not state.check_pin("sys-backup", "daily", REPO)
    assert not state.check_pin("sys-backup", "daily", REPO)
    assert state.check_pin("sys-backup", "weekly", OTHER_REPO)  # names are separate
    assert state.check_pin("other-backup", "daily", OTHER_REPO)  # and so are backup qubes
    with pytest.raises(RepositoryChanged) as exc:
        state.check_pin("sys-backup", "daily", OTHER_REPO)
    message = str(exc.value)
    assert REPO.hex() in message and OTHER_REPO.hex() in message and "repo trust" in message
    assert (exc.value.old, exc.value.new) == (REPO, OTHER_REPO)
    state.pin("sys-backup", "daily", OTHER_REPO)
    assert not state.check_pin("sys-backup", "daily", OTHER_REPO)
    assert set(state.pins()) == {("sys-backup", "daily"), ("sys-backup", "weekly"),
                                 ("other-backup", "daily")}
    path = tmp_path / "state" / "pins.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text())["version"] == 1


@pytest.mark.parametrize("content", [
    "not json", "{}", '{"format": "qbackup-pins", "version": 2, "pins": []}',
    '{"format": "qbackup-pins", "version": 1, "pins": [{"backup_vm": "b", "repo": "r", '
    '"repo_id": "00", "since": 0}]}',
])
def test_corrupt_pins_file(state, tmp_path, content):
    os.makedirs(tmp_path / "state")
    (tmp_path / "state" / "pins.json").write_text(content)
    with pytest.raises(QbackupError, match="pins"):
        state.check_pin("b", "r", REPO)


def test_state_files_are_not_followed_through_symlinks(state, tmp_path):
    os.makedirs(tmp_path / "state")
    (tmp_path / "elsewhere.json").write_text("{}")
    os.symlink(tmp_path / "elsewhere.json", tmp_path / "state" / (REPO.hex() + ".json"))
    with pytest.raises(QbackupError, match="cannot read state file"):
        state.load(REPO)


def test_record_head_after_commit(state):
    state.accept(REPO, chain(2))
    state.record_head(REPO, sid(3), 1003.0)
    with pytest.raises(RollbackError):
        state.accept(REPO, chain(2))  # the snapshot we wrote vanished
    state.accept(REPO, chain(3))


@pytest.mark.parametrize("content", [
    "not json",
    "[]",
    '{"format": "qbackup-state", "version": 3, "repo_id": "%s", "head": null, "deleted": []}' % REPO.hex(),
    '{"format": "qbackup-state", "version": 2, "repo_id": "%s", "head": null, "deleted": []}' % REPO.hex(),
    '{"format": "qbackup-state", "version": 2, "repo_id": "%s", "head": null, "deleted": [], '
    '"seen": ["00"], "deleting": [], "lost": [], "protected": []}' % REPO.hex(),
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
