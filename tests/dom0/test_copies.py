# SPDX-License-Identifier: GPL-2.0-or-later
"""The copies' bookkeeping (qbackup.copies): which copy is a base, which
waits for a resume, what is left over; the record file; and names that
Qubes R4.2's storage drivers can never take for their own."""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
from dataclasses import dataclass, field

import pytest

from qbackup import copies
from qbackup.copies import Copy, Record, reconcile
from qbackup.errors import QbackupError
from qbackup.state import State

REPO = bytes(range(32))
TAG = copies.tag_of(REPO)


@dataclass
class Snap:
    id: bytes
    time: float
    qubes: dict = field(default_factory=dict)


def snap(n: int, **named: Copy) -> Snap:
    """Snapshot n (time n) whose manifest names the given copies by volume."""
    qubes: dict = {}
    for copy in named.values():
        qubes.setdefault(copy.qube, {"volumes": {}})["volumes"][copy.volume] = {
            "source": {"state": copy.state, "taken": copy.taken, "copy": copy.id}}
    return Snap(bytes([n]) * 32, float(n), qubes)


def copy(n: int, qube: str = "work", volume: str = "private", taken: float | None = None,
         snapshot: bytes | None = None, made: bool = True) -> Copy:
    cid = bytes([n]) * 16
    return Copy(cid, qube, volume, "reflink",
                copies.reflink_name(f"/pool/appvms/{qube}/{volume}.img", TAG, cid), "",
                "shutdown", float(n if taken is None else taken),
                {"ino": n} if made else None, snapshot)


def plan(record: Record, history, alive=("work", "tpl"), found=None, committed=None):
    return reconcile(record, history, set(alive), found or {}, TAG, committed)


def why(p, c: Copy) -> str:
    [reason] = [left.why for left in p.leftovers if left.copy is c]
    return reason


def test_the_newest_copy_a_snapshot_names_is_the_base():
    old, new = copy(1), copy(2)
    record = Record([old, new])
    p = plan(record, [snap(1, a=old), snap(2, a=new)])
    assert p.bases == {"work:private": new} and p.pending == {}
    assert why(p, old) == "a newer copy is the base"
    assert new.snapshot == bytes([2]) * 32  # promoted in the record


def test_a_copy_named_for_another_volume_is_not_its_base():
    c = copy(1)
    other = Copy(c.id, "work", "root", c.kind, c.where, "", "shutdown", 1.0, {"ino": 1})
    p = plan(Record([c]), [snap(1, a=other)])
    assert p.bases == {}
    assert why(p, c) == "no snapshot read it, and no unfinished backup will"


def test_a_base_whose_snapshot_is_gone_is_left_over():
    c = copy(1, snapshot=bytes([9]) * 32)
    p = plan(Record([c]), [snap(2)])
    assert p.bases == {} and "is no longer in the repository" in why(p, c)


def test_a_base_whose_snapshot_is_unreadable_now_is_neither_used_nor_removed():
    from qbackup.restore import Damaged, History
    c = copy(1, snapshot=bytes([1]) * 32)
    history = History([snap(2)], [Damaged(bytes([1]) * 32, "pack unreadable")])
    p = plan(Record([c]), history)
    assert p.bases == {} and p.leftovers == [] and p.held == [c]


def test_unfinished_copies_wait_for_a_resume_of_the_same_run():
    base, first, second = copy(1), copy(2), copy(3)
    history = [snap(1, a=base)]
    run = {"volumes": ["work:private"], "live": False}
    p = plan(Record([base, first, second], run), history)
    assert p.pending == {"work:private": second}
    assert why(p, first) == "an interrupted backup left a newer copy"
    p = plan(Record([base, second], None), history)  # no unfinished run
    assert p.pending == {} and "no unfinished backup" in why(p, second)
    stale = copy(0, taken=0.5)  # taken before the base
    p = plan(Record([base, stale], run), history)
    assert p.pending == {} and why(p, stale) == "a newer copy is the base"


def test_a_commit_not_yet_recorded_still_promotes():
    base, new = copy(1), copy(2)
    run = {"volumes": ["work:private"], "live": False}
    p = plan(Record([base, new], run), [snap(1, a=base)], committed={new.id: snap(2)})
    assert p.bases == {"work:private": new} and why(p, base) == "a newer copy is the base"


def test_interrupted_makings_gone_qubes_and_unknown_files_are_left_over():
    making, gone = copy(1, made=False), copy(2, qube="old")
    found = {making.where: "reflink", "/pool/appvms/work/private.qbackup-x.img": "reflink"}
    p = plan(Record([making, gone]), [snap(2, a=gone)], found=found)
    assert why(p, making) == "its making was interrupted"
    assert why(p, gone) == "qube old no longer exists"
    [unknown] = [left for left in p.leftovers if left.copy is None]
    assert unknown.where == "/pool/appvms/work/private.qbackup-x.img"
    assert "no record of it" in unknown.why


def test_record_round_trip_and_damage(tmp_path):
    store = copies.Store(State(str(tmp_path)), REPO)
    assert store.load() == Record()
    record = Record([copy(1, snapshot=bytes(32)), copy(2, made=False)],
                    {"volumes": ["work:private"], "live": True})
    store.save(record)
    assert store.load() == record
    assert oct(os.stat(store.path).st_mode & 0o777) == "0o600"
    doc = json.loads(open(store.path).read())
    assert doc["format"] == "qbackup-copies" and doc["version"] == 1
    other = copies.Store(State(str(tmp_path)), bytes(32))
    os.replace(store.path, other.path)
    with pytest.raises(QbackupError, match="corrupt .*not a version 1 copies record of this"):
        other.load()
    doc["copies"][0]["kind"] = "zfs"
    with open(store.path, "w") as f:
        json.dump(doc, f)
    with pytest.raises(QbackupError, match="corrupt .*read every volume in full"):
        store.load()


def test_one_backup_or_cleanup_at_a_time(tmp_path):
    state = State(str(tmp_path))
    with copies.run_lock(state, REPO):
        with pytest.raises(QbackupError, match="another qbackup backup or cleanup"):
            with copies.run_lock(state, REPO):
                pass
        with copies.run_lock(state, bytes(32)):  # another repository: fine
            pass


# -- names ---------------------------------------------------------------------

# qubes/storage/reflink.py (R4.2): revisions (incomplete images: `{vid}*.img*~*`)
REVISION = re.compile(r".*\.img\.[^/]+@\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


@pytest.mark.parametrize("qube, volume", [("work", "private"), ("a", "root"),
                                          ("x" * 31, "private"), ("sys-net", "private")])
def test_names_qubes_r42_never_takes_for_its_own(qube, volume):
    cid = os.urandom(16)
    vid = f"appvms/{qube}/{volume}"
    path = copies.reflink_name(f"/var/lib/qubes/{vid}.img", TAG, cid)
    assert path.startswith(f"/var/lib/qubes/{vid}.qbackup-{TAG}-")
    assert not fnmatch.fnmatch(path, glob.escape("/var/lib/qubes/" + vid) + "*.img*~*")
    assert not REVISION.fullmatch(path)
    assert copies.tag_in("reflink", path) == TAG
    lv = copies.lvm_name(TAG, cid, qube, volume)
    assert len(lv) <= 127 and copies.tag_in("lvm", f"qubes_dom0/{lv}") == TAG
    # qubes/storage/lvm.py: a volume's revisions are VG/vm-QUBE-VOLUME-*-back;
    # list_volumes skips -snap, -import and -back
    for other in ("work", qube, "qbackup"):
        assert not lv.startswith(f"vm-{other}-")
    assert lv.endswith("-back") and not lv.startswith("vm-")
    assert copies.tag_in("lvm", "qubes_dom0/vm-work-private-1700000000-back") is None
    assert copies.tag_in("reflink", f"/var/lib/qubes/{vid}-dirty.img") is None
