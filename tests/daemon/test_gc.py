# SPDX-License-Identifier: GPL-2.0-or-later
"""Garbage collection without keys (qbackupd.gc, docs/GC.md), in process:
what it deletes and repacks, what it keeps, its refusals, its state, and a
backup that deduplicates against dead blobs while it runs."""

from __future__ import annotations

import fcntl
import random
import sqlite3

import pytest

from gcmodel import Model, content, ident, random_history
from qbackupd import gc
from qbackupd.check import check_repository
from qbackupd.cli import main
from qbackupd.storage import MIN_PACK_SIZE, Locked, Storage

PACK = MIN_PACK_SIZE


@pytest.fixture
def storage(tmp_path) -> Storage:
    return Storage(tmp_path / "store")


def build(storage: Storage, snapshots: int = 6, seed: int = 1, size: int = 3000) -> Model:
    model = Model()
    with storage.create("work", b"config", PACK, "creator") as repo:
        random_history(random.Random(seed), repo, model, snapshots, size=size)
    return model


def pack_names(storage: Storage) -> set[str]:
    return {p.stem for p in (storage.root / "work" / "packs").glob("*/*.pack")}


def delete(storage: Storage, model: Model, *names: str) -> None:
    with storage.open("work", True, "pruner") as repo:
        repo.delete_snapshots([ident(n) for n in names])
    for name in names:
        del model.snapshots[name]


def assert_intact(storage: Storage, model: Model) -> None:
    """Every remaining snapshot complete and the repository healthy, before and after a reindex."""
    for rebuilt in (False, True):
        report = check_repository(storage, "work", read_data=True)
        assert report.problems == [], report.problems
        with storage.open("work", False, "checker") as repo:
            assert {s[0] for s in repo.list_snapshots()} == {ident(n) for n in model.snapshots}
            for snapshot in model.snapshots:
                model.check_snapshot(repo, snapshot)
        if not rebuilt:
            storage.reindex("work")


def pack_of(storage: Storage, name: str) -> str:
    conn = sqlite3.connect(storage.root / "work" / "index.sqlite")
    row = conn.execute(
        "SELECT p.name FROM blobs AS b JOIN packs AS p ON p.id = b.pack WHERE b.id = ?", (ident(name),)
    ).fetchone()
    conn.close()
    return row[0] if row else None


def stored_bytes(storage: Storage) -> int:
    return sum(p.stat().st_size for p in (storage.root / "work" / "packs").glob("*/*.pack"))


def test_nothing_to_collect(storage):
    model = build(storage, 3)
    before = pack_names(storage)
    summary = gc.collect_garbage(storage, "work")
    assert (summary.packs_deleted, summary.packs_repacked, summary.bytes_freed) == (0, 0, 0)
    assert summary.snapshots == 3 and pack_names(storage) == before
    assert not (storage.root / "work" / "gc" / gc.STATE).exists()
    assert_intact(storage, model)


def test_deleted_snapshots_free_their_space(storage):
    model = build(storage, 8, size=60_000)  # about one pack per snapshot
    before = stored_bytes(storage)
    delete(storage, model, "s0", "s1", "s2", "s3")
    dry = gc.collect_garbage(storage, "work", dry_run=True)
    assert dry.dry_run and dry.bytes_freed > 0 and stored_bytes(storage) == before
    summary = gc.collect_garbage(storage, "work", repack_below=90)
    assert summary.packs_deleted + summary.packs_repacked > 0
    assert summary.bytes_freed == before - stored_bytes(storage) > 0
    assert dry.packs_deleted == summary.packs_deleted and dry.packs_repacked == summary.packs_repacked
    assert_intact(storage, model)
    # everything left is reachable: a second collection finds nothing to free beyond the threshold
    again = gc.collect_garbage(storage, "work", repack_below=90)
    assert again.packs_deleted == 0 and again.packs_repacked == 0


def test_repack_threshold(storage):
    model = build(storage, 6, size=60_000)
    delete(storage, model, "s0", "s1", "s2")
    only_dead = gc.collect_garbage(storage, "work", repack_below=0, dry_run=True)
    assert only_dead.packs_repacked == 0
    everything = gc.collect_garbage(storage, "work", repack_below=100, dry_run=True)
    assert everything.packs_repacked >= only_dead.packs_repacked
    gc.collect_garbage(storage, "work", repack_below=100)
    assert_intact(storage, model)


def test_dead_node_in_a_kept_pack_is_unindexed_with_the_blobs_it_references(storage):
    """Pack 1: dead chunks only (deleted). Pack 2: a live chunk and root, and a
    dead node naming pack 1's chunks (kept: mostly live). The dead node must
    leave the index with its children, and stay out of a rebuilt one: a
    client told it exists would build on a tree with holes."""
    with storage.create("work", b"config", PACK, "creator") as repo:
        dead_chunks = [ident(f"dead {n}") for n in range(4)]
        for id_ in dead_chunks:
            repo.put(id_, 1, b"dead chunk", None)
        repo.flush()
        repo.put(ident("live"), 1, bytes(1 << 20), None)
        repo.put(ident("dead node"), 2, b"node", dead_chunks)
        repo.put(ident("live root"), 2, b"root", [ident("live")])
        repo.commit(ident("kept"), b"m", [ident("live root")])
        repo.commit(ident("gone"), b"m", [ident("dead node")])
        repo.delete_snapshots([ident("gone")])
    summary = gc.collect_garbage(storage, "work", repack_below=0)
    assert (summary.packs_deleted, summary.packs_repacked) == (1, 0)
    for rebuilt in (False, True):
        with storage.open("work", False, "r") as repo:
            assert repo.have([ident("dead node"), ident("live root"), ident("live")]) == [0]
            assert repo.get(ident("live")) == (1, bytes(1 << 20))
        assert check_repository(storage, "work", read_data=True).problems == []
        storage.reindex("work")


def test_second_collection_is_refused_while_one_runs(storage):
    build(storage, 2)
    seen = []

    def progress(phase, done, total):
        if not seen:
            seen.append(phase)
            with pytest.raises(Locked, match="already running"):
                gc.collect_garbage(storage, "work")

    gc.collect_garbage(storage, "work", progress=progress)
    assert seen


def test_unreadable_snapshot_refuses_and_deletes_nothing(storage):
    model = build(storage, 4, size=60_000)
    delete(storage, model, "s0")
    path = storage.root / "work" / "snapshots" / ident("s3").hex()
    raw = bytearray(path.read_bytes())
    raw[-40] ^= 1
    path.write_bytes(bytes(raw))
    before = pack_names(storage)
    with pytest.raises(gc.Refused) as e:
        gc.collect_garbage(storage, "work", repack_below=100)
    assert e.value.code == "damaged" and "snapshot" in str(e.value) and "\n" not in str(e.value)
    assert pack_names(storage) == before


def test_missing_reachable_id_refuses(storage):
    model = build(storage, 3)
    conn = sqlite3.connect(storage.root / "work" / "index.sqlite")
    chunk = next(n for n in sorted(model.reach("s2")) if model.blobs[n][0] == 1)
    conn.execute("DELETE FROM blobs WHERE id = ?", (ident(chunk),))
    conn.commit()
    conn.close()
    with pytest.raises(gc.Refused, match="not in the index"):
        gc.collect_garbage(storage, "work")


def test_backup_deduplicating_against_dead_blobs_during_collection(storage):
    """Between the mark and the sweep a backup commits a snapshot that reuses
    blobs only deleted snapshots reached (HAVE says present, PUT deduplicates):
    the sweep marks it and keeps (copies) them."""
    model = build(storage, 5, size=60_000)
    revived = model.snapshots["s0"]
    only_s0 = model.reach("s0") - set().union(*(model.reach(s) for s in ("s2", "s3", "s4")))
    delete(storage, model, "s0", "s1")
    packs_before = {name: pack_of(storage, name) for name in only_s0}
    done = []

    def progress(phase, _done, _total):
        if phase in ("repack", "sweep", "wait") and not done:
            done.append(phase)  # the mark and plan are over: s0's blobs are planned as dead
            with storage.open("work", True, "backup") as repo:
                assert repo.have([ident(r) for r in revived]) == []
                for root in revived:
                    assert repo.put(ident(root), 2, b"ignored", None) is False  # deduplicated
                repo.commit(ident("revived"), b"manifest", [ident(r) for r in revived])
            model.snapshots["revived"] = revived

    summary = gc.collect_garbage(storage, "work", repack_below=100, progress=progress)
    assert done and summary.packs_deleted + summary.packs_repacked > 0
    # the revived blobs were in packs the collection deleted: the sweep copied them
    gone = {name for name, was in packs_before.items() if was not in pack_names(storage)}
    assert gone and all(pack_of(storage, name) not in (None, packs_before[name]) for name in gone)
    assert_intact(storage, model)


def test_interrupted_collection_resumes(storage):
    model = build(storage, 6, size=60_000)
    delete(storage, model, "s0", "s1", "s2")
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 25

    with pytest.raises(Exception, match="stopped"):
        gc.collect_garbage(storage, "work", repack_below=100, stop=stop)
    assert (storage.root / "work" / "gc" / gc.STATE).exists()
    assert_intact(storage, model)
    gc.collect_garbage(storage, "work", repack_below=0)  # resumes with the first run's threshold
    assert not (storage.root / "work" / "gc" / gc.STATE).exists()
    assert_intact(storage, model)
    again = gc.collect_garbage(storage, "work", repack_below=100, dry_run=True)
    assert again.packs_deleted == 0


def test_usage_per_snapshot_unique_and_shared(storage):
    from qbackupd.usage import usage

    model = build(storage, 4)
    reach = {s: model.reach(s) for s in model.snapshots}
    sizes = {name: model.blobs[name][2] for name in model.blobs}
    report = usage(storage, "work")
    for id, blobs, size in report.snapshots:
        (snapshot,) = [s for s in model.snapshots if ident(s) == id]
        others = set().union(*(reach[s] for s in model.snapshots if s != snapshot))
        unique = reach[snapshot] - others
        assert (blobs, size) == (len(unique), sum(sizes[n] for n in unique)), snapshot
    everything = set().union(*reach.values())
    assert report.shared_blobs == sum(1 for n in everything if sum(n in r for r in reach.values()) > 1)
    assert (report.unreferenced_blobs, report.missing, report.unreadable) == (0, 0, 0)
    delete(storage, model, "s0")
    after = usage(storage, "work")
    (s0,) = [(blobs, size) for id, blobs, size in report.snapshots if id == ident("s0")]
    assert (after.unreferenced_blobs, after.unreferenced_bytes) == s0


@pytest.mark.parametrize("rebuild", [False, True])
def test_packs_unindexed_over_several_rounds_with_backups_between(storage, monkeypatch, rebuild):
    """With a tiny row budget every pack takes several sweep rounds; between two
    rounds a backup revives what the deleted snapshot held, trusting HAVE on
    tree nodes (as a backup with change tracking does: it sends a node's
    chunks only if the node is missing). Some of it is already unindexed
    (sent again), some not yet (deduplicated, then kept). With `rebuild`, the
    index is rebuilt before the sweep: rows may point at the originals of
    the copies again, and the sweep must look at every live row."""
    monkeypatch.setattr(gc, "ROUND_ROWS", 3)
    monkeypatch.setattr(gc, "ROUND_PAUSE", 0)
    model = build(storage, 5, size=20_000)
    roots = model.snapshots["s0"]
    delete(storage, model, "s0", "s1")
    rounds = []

    def revive(repo) -> None:
        for root in roots:
            for leaf in model.blobs[root][1]:
                if repo.have([ident(leaf)]):  # missing: send it, and its chunks the repository lacks
                    chunks = model.blobs[leaf][1]
                    for chunk in chunks:
                        repo.put(ident(chunk), 1, content(chunk, 20_000), None)
                    repo.put(ident(leaf), 2, content(leaf, 200), [ident(c) for c in chunks])
            repo.put(ident(root), 2, content(root, 100), [ident(leaf) for leaf in model.blobs[root][1]])
        repo.commit(ident("revived"), b"manifest", [ident(r) for r in roots])
        model.snapshots["revived"] = roots

    def progress(phase, done, total):
        if phase == "sweep":
            rounds.append(done)
            if len(rounds) == 1 and rebuild:
                storage.reindex("work")
            if len(rounds) == 2:  # between two rounds: the writer lock is free
                with storage.open("work", True, "backup") as repo:
                    revive(repo)

    summary = gc.collect_garbage(storage, "work", repack_below=100, progress=progress)
    assert len(rounds) > 2 and summary.packs_kept == 0
    assert_intact(storage, model)


def test_orphan_refs_are_purged_but_never_those_of_a_node_indexed_again(tmp_path):
    from qbackupd.index import Index
    from qbackupd.pack import Entry

    index = Index.create(tmp_path / "index.sqlite")
    index.mark_complete()
    node = Entry(ident("node"), 2, 12, 10, ident("child"))
    other = Entry(ident("other"), 2, 63, 10, ident("child"))
    index.add_pack("a" * 32, 1000, [Entry(ident("child"), 1, 114, 5, b""), node, other])
    assert index.drop_rows([], [node.id, other.id], []) == []  # unindexed; their refs rows stay
    assert index.missing([node.id, other.id]) == [0, 1]
    index.add_pack("b" * 32, 1000, [node])  # a backup sends the node again
    assert index.purge_orphan_refs(10) == 1 and index.purge_orphan_refs(10) == 0
    assert dict(index.iter_refs()) == {node.id: ident("child")}
    index.close()


def test_qbackupd_gc_all_collects_every_repository_and_skips_one_being_collected(storage, capsys):
    """`qbackupd gc --all` (what qbackupd-gc.timer runs): every repository of the
    storage directory; one whose collection another process holds is skipped;
    a symlink to a repository, and a directory without a config, are not
    repositories."""
    model = build(storage)
    delete(storage, model, "s0", "s1")
    with storage.create("other", b"config", PACK, "creator"):
        pass
    (storage.root / "alias").symlink_to(storage.root / "work")
    (storage.root / "empty").mkdir()
    (storage.root / "not a name").mkdir()
    assert storage.names() == ["other", "work"]
    before = pack_names(storage)
    assert main(["gc", "--all", "--storage", str(storage.root), "--repack-below", "100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("other: 0 snapshots") and "\nwork: " in out and "freed" in out
    assert pack_names(storage) != before
    assert_intact(storage, model)

    with open(storage.root / "work" / "gc" / "lock", "a+b") as held:   # another collection
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["gc", "--all", "--storage", str(storage.root)]) == 0
    out = capsys.readouterr().out
    assert "work: skipped:" in out and out.startswith("other: ")
