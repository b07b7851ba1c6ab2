# SPDX-License-Identifier: GPL-2.0-or-later
"""End-to-end tests of the dom0 engine (backup, history, verify, restore,
delete) against the real daemon, started as a subprocess, through
transport.unix_socket and proto.Session."""

import contextlib
import itertools
import os
import subprocess
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
from engine_helpers import write_file

from qbackup import crypto, manifest, proto, transport
from qbackup.backup import VolumeSource, backup
from qbackup.chunkmap import MAX_NODE_PLAIN, TreeWriter
from qbackup.errors import QbackupError, RollbackError
from qbackup.restore import (VolumeStream, delete_snapshots, load_history, resolve_snapshot,
                             restore, verify)
from qbackup.state import State
from qbackup_sim.daemon import daemon_command

CS = 64 << 10  # the smallest chunk size: more chunks per byte of test data
START_TIMEOUT = 30  # guard against a daemon that never comes up, not a performance check


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    base = tmp_path_factory.mktemp("daemon")
    sock, storage = base / "sock", base / "storage"
    storage.mkdir()
    with open(base / "daemon.log", "wb") as log:
        proc = subprocess.Popen(daemon_command("serve", "--socket", str(sock), "--storage",
                                               str(storage), "--log-level", "warning"),
                                stdout=log, stderr=log)
    deadline = time.monotonic() + START_TIMEOUT
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"qbackupd did not start: {(base / 'daemon.log').read_text()}")
        time.sleep(0.05)
    yield sock, storage
    proc.terminate()
    proc.wait(timeout=START_TIMEOUT)


_names = itertools.count()


class Repo:
    """A fresh repository on the test daemon, with its keys and a dom0 state dir."""

    def __init__(self, daemon, tmp_path: Path):
        self.socket, storage = daemon
        self.name = f"repo{next(_names)}"
        self.dir = storage / self.name
        self.keys = crypto.create_keys(CS)
        self.state = State(str(tmp_path / "state"))
        with self.session(init=True):
            pass

    @contextlib.contextmanager
    def session(self, write: bool = True, init: bool = False):
        session = proto.Session(transport.unix_socket(str(self.socket), self.name))
        try:
            if init:
                session.init(crypto.wrap_keys(self.keys, b"pw", scrypt_n=2 ** 14), 8 << 20)
            else:
                session.open(write, lock_wait=15)
            yield session
        finally:
            session.close()

    def backup(self, sources, meta=None, **kwargs):
        meta = meta if meta is not None else {s.qube: qube_meta() for s in sources}
        with self.session() as s:
            return backup(s, self.keys, sources, meta, state=self.state, **kwargs)

    def history(self, **kwargs):
        with self.session(write=False) as s:
            return load_history(s, self.keys, self.state, **kwargs)

    def verify(self, snapshot):
        with self.session(write=False) as s:
            return verify(s, self.keys, snapshot)

    def restore(self, snapshot, targets, **kwargs):
        with self.session(write=False) as s:
            return restore(s, self.keys, snapshot, targets, **kwargs)

    def packs(self) -> list[Path]:
        return sorted(self.dir.glob("packs/*/*.pack"))


@pytest.fixture
def repo(daemon, tmp_path):
    return Repo(daemon, tmp_path)


def qube_meta(klass="AppVM"):
    return {"class": klass, "properties": {"label": "red", "netvm": ""}, "features": {}, "tags": ["t"],
            "volume_config": {}, "firewall": None, "devices": None, "dependencies": {}}


def source(qube, volume, path):
    return VolumeSource(qube, volume, str(path), os.path.getsize(path), {"pool": "varlibqubes", "rw": True})


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Recorder:
    def __init__(self):
        self.calls = []

    def start(self, label, total_bytes):
        self.calls.append(("start", label, total_bytes))

    def advance(self, n):
        self.calls.append(("advance", n))

    def done(self):
        self.calls.append(("done",))

    def per_volume(self):
        """{label: (total, sum of advances)}, checking start/advance/done nesting."""
        out, label, total = {}, None, 0
        for call in self.calls:
            if call[0] == "start":
                assert label is None
                label, total, out[call[1]] = call[1], 0, (call[2], 0)
            elif call[0] == "advance":
                total += call[1]
            else:
                out[label] = (out[label][0], total)
                label = None
        assert label is None
        return out


def test_round_trip_of_assorted_volumes(repo, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rand = os.urandom(5 * CS + 1234)
    vols = {
        ("work", "private"): write_file(src / "random", len(rand), [(0, rand)]),
        ("work", "root"): write_file(src / "sparse", 200 * CS + 77, [(3 * CS, os.urandom(CS)),
                                                                      (100 * CS + 5, b"hello"),
                                                                      (200 * CS, os.urandom(77))]),
        ("zero", "private"): write_file(src / "zeros", 16 * CS, [(0, bytes(16 * CS))]),
        ("tiny", "private"): write_file(src / "one", 1, [(0, b"\x01")]),
        ("empty", "private"): write_file(src / "empty", 0, []),
        ("text", "private"): write_file(src / "text", 3 * CS - 1, [(0, b"compressible " * 15000)]),
    }
    sources = [source(q, v, p) for (q, v), p in vols.items()]
    meta = {q: qube_meta() for q, _ in vols}
    meta["settings-only"] = qube_meta("DispVM")
    progress = Recorder()
    stats = repo.backup(sources, meta, progress=progress, workers=2)
    total = sum(s.size for s in sources)
    assert (stats.volumes, stats.bytes_total) == (6, total)
    assert stats.chunks_total == sum(-(-s.size // CS) for s in sources)
    assert stats.chunks_total == stats.chunks_zero + stats.chunks_new + stats.chunks_dedup
    assert stats.chunks_zero >= 16 + 197
    assert stats.bytes_read < total - 150 * CS  # the sparse file's holes were not read
    assert progress.per_volume() == {f"{s.qube}:{s.volume}": (s.size, s.size) for s in sources}

    [snap] = repo.history()
    assert snap.id == stats.snapshot_id and snap.bytes_total == total
    assert snap.qubes["settings-only"]["volumes"] == {}
    assert snap.qubes["work"]["class"] == "AppVM"
    assert snap.qubes["work"]["volumes"]["root"]["settings"] == {"pool": "varlibqubes", "rw": True}
    result = repo.verify(snap)
    assert result.ok and result.errors == []
    assert result.chunks == stats.chunks_total - stats.chunks_zero

    out = tmp_path / "out"
    out.mkdir()
    targets = {key: str(out / f"{key[0]}-{key[1]}") for key in vols}
    result = repo.restore(snap, targets)
    assert result.ok, result.errors
    for key, path in vols.items():
        assert read(targets[key]) == read(path), key
    assert not list(out.glob("*.qbackup-partial"))
    # zero chunks are holes in the restored files
    assert os.stat(targets["zero", "private"]).st_blocks == 0
    assert os.stat(targets["work", "root"]).st_blocks * 512 <= 4 * CS


def test_dedup_across_volumes_and_snapshots(repo, tmp_path):
    data = os.urandom(20 * CS)
    a = write_file(tmp_path / "a", len(data), [(0, data)])
    b = write_file(tmp_path / "b", len(data), [(0, data)])
    sources = [source("one", "private", a), source("two", "private", b)]
    first = repo.backup(sources, workers=3)
    assert first.chunks_new == 20 and first.chunks_dedup == 20
    assert first.bytes_sent > 20 * CS

    second = repo.backup(sources)
    assert second.chunks_new == 0 and second.chunks_dedup == 40
    assert second.bytes_read == 2 * len(data)
    assert second.bytes_sent < CS  # only metadata: leaves already stored, a new manifest

    with open(a, "r+b") as f:
        f.seek(7 * CS + 3)
        f.write(b"changed")
    third = repo.backup(sources)
    assert third.chunks_new == 1 and third.chunks_dedup == 39
    assert CS < third.bytes_sent < 2 * CS  # one chunk, one leaf, the manifest

    history = repo.history()
    assert [s.id for s in history] == [first.snapshot_id, second.snapshot_id, third.snapshot_id]
    assert [s.predecessor for s in history] == [None, first.snapshot_id, second.snapshot_id]
    out = tmp_path / "restored"
    assert repo.restore(history[0], {("one", "private"): str(out)}).ok
    assert read(out) == data
    os.unlink(out)
    assert repo.restore(history[2], {("one", "private"): str(out)}).ok
    assert read(out) == read(a)


def test_large_volume_with_a_deep_tree(repo, tmp_path):
    """More than FANOUT chunks: a two-level chunk map, mostly holes."""
    size = 1500 * CS + 10
    path = write_file(tmp_path / "big", size, [(k * 97 * CS, os.urandom(1000)) for k in range(16)])
    stats = repo.backup([source("big", "private", path)])
    [snap] = repo.history()
    assert snap.qubes["big"]["volumes"]["private"]["depth"] == 2
    assert stats.chunks_new == 16
    assert repo.verify(snap).ok
    out = tmp_path / "out"
    assert repo.restore(snap, {("big", "private"): str(out)}).ok
    assert read(out) == read(path)


def corrupt_middle(path: Path) -> None:
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0x40]))


def test_verify_and_restore_detect_a_corrupted_pack(repo, tmp_path):
    data = os.urandom(40 * CS)
    path = write_file(tmp_path / "v", len(data), [(0, data)])
    repo.backup([source("work", "private", path)])
    [snap] = repo.history()
    [pack] = repo.packs()
    corrupt_middle(pack)
    result = repo.verify(snap)
    assert not result.ok
    assert 1 <= len(result.errors) <= 2
    assert all(e.startswith("work:private at offset ") for e in result.errors)
    assert result.chunks >= 38

    target = tmp_path / "out"
    result = repo.restore(snap, {("work", "private"): str(target)})
    assert not result.ok and result.errors[0].startswith("work:private at offset ")
    assert not target.exists() and not Path(str(target) + ".qbackup-partial").exists()


def test_verify_reports_every_chunk_of_a_lost_pack(repo, tmp_path):
    data = os.urandom(10 * CS)
    path = write_file(tmp_path / "v", len(data), [(0, data)])
    repo.backup([source("work", "private", path)])
    more = os.urandom(3 * CS)
    other = write_file(tmp_path / "w", len(more), [(0, more)])
    repo.backup([source("work", "private", path), source("other", "private", other)])
    history = repo.history()
    first_packs = set(repo.packs())
    assert len(first_packs) >= 2
    oldest = min(first_packs, key=lambda p: p.stat().st_mtime_ns)
    oldest.unlink()  # the first backup's pack: its chunks and tree nodes are gone
    result = repo.verify(history[1])
    assert not result.ok
    # the lost pack held work:private's only chunk map leaf: one line covers its range
    assert [e.split(": ")[0] for e in result.errors] == ["work:private at offset 0"]
    assert "cannot fetch chunk map node" in result.errors[0]
    assert result.chunks == 3  # other:private is whole


class Tamper:
    """A session whose get answers a malicious backup qube has altered."""

    def __init__(self, session, alter):
        self._session, self._alter = session, alter

    def __getattr__(self, name):
        return getattr(self._session, name)

    def get(self, ids, *, window=64, max_size=proto.MAX_BLOB):
        for item in self._session.get(ids, window=window, max_size=max_size):
            yield self._alter(*item)

    def locate(self, ids):
        """Equal keys: verify gets the chunks in the order the maps name them
        (honest keys follow the records in the pack, which is the order the
        workers' puts arrived in)."""
        keys = Future()
        keys.set_result([0] * len(ids))
        return keys


def flip(blob: bytes) -> bytes:
    return blob[:len(blob) // 2] + bytes([blob[len(blob) // 2] ^ 1]) + blob[len(blob) // 2 + 1:]


@pytest.mark.parametrize("attack,reason", [
    (lambda i, t, d, other: (i, t, flip(d)), "fails authentication"),
    (lambda i, t, d, other: (i, t, other), "fails authentication"),  # another chunk's blob
    (lambda i, t, d, other: (i, None, None), "chunk missing"),
    (lambda i, t, d, other: (i, 2, d), "blob has type 2"),
    (lambda i, t, d, other: (i, t, d[:40]), "fails authentication"),
])
def test_tampered_chunks_are_caught(repo, tmp_path, attack, reason):
    data = os.urandom(6 * CS)
    path = write_file(tmp_path / "v", len(data), [(0, data)])
    repo.backup([source("work", "private", path)])
    [snap] = repo.history()
    blobs = {}

    def alter(i, t, d):
        blobs.setdefault(t, {})[i] = d
        if t == crypto.TYPE_DATA and len(blobs[t]) == 4:  # the fourth chunk
            other = next(iter(blobs[t].values()))
            return attack(i, t, d, other)
        return i, t, d

    with repo.session(write=False) as s:
        result = verify(Tamper(s, alter), repo.keys, snap)
    assert not result.ok and result.chunks == 5
    assert result.errors == [f"work:private at offset {3 * CS}: " + result.errors[0].split(": ", 1)[1]]
    assert reason in result.errors[0]
    blobs.clear()
    target = tmp_path / "out"
    with repo.session(write=False) as s:
        result = restore(Tamper(s, alter), repo.keys, snap, {("work", "private"): str(target)})
    assert not result.ok and reason in result.errors[0]
    assert not target.exists() and not Path(str(target) + ".qbackup-partial").exists()


def test_fetches_bound_blob_sizes_to_what_they_can_hold(repo, tmp_path):
    """verify and restore let the session refuse any blob larger than a sealed
    chunk (or chunk-map node) can be, so a hostile backup qube cannot fill
    dom0's memory with a window of 4 MiB blobs."""
    class Record(Tamper):
        def get(self, ids, *, window=64, max_size=proto.MAX_BLOB):
            max_sizes.add(max_size)
            return self._session.get(ids, window=window, max_size=max_size)

    max_sizes = set()
    data = os.urandom(3 * CS)
    path = write_file(tmp_path / "v", len(data), [(0, data)])
    repo.backup([source("work", "private", path)])
    [snap] = repo.history()
    expected = {crypto.max_blob_size(CS), crypto.max_blob_size(MAX_NODE_PLAIN)}
    with repo.session(write=False) as s:
        assert verify(Record(s, None), repo.keys, snap).ok
        assert max_sizes == expected
        max_sizes.clear()
        target = tmp_path / "out"
        assert restore(Record(s, None), repo.keys, snap,
                       {("work", "private"): str(target)}).ok
    assert max_sizes == expected
    assert read(target) == data


def test_authentic_map_with_wrong_chunk_lengths(repo, tmp_path):
    """A chunk map (authentic, as a dom0 bug could write it) naming a short chunk
    at full-size positions: verify reports each bad position."""
    data = os.urandom(CS + 10)
    path = write_file(tmp_path / "v", len(data), [(0, data)])
    first = repo.backup([source("work", "private", path)]).snapshot_id
    short_id = repo.keys.chunk_id(data[CS:])
    sealer = crypto.Sealer(repo.keys)
    snapshot_id = os.urandom(32)
    with repo.session() as s:
        def put_node(level, node_id, plain, refs):
            s.put(node_id, crypto.TYPE_TREE, sealer.seal(crypto.TYPE_TREE, node_id, plain), refs).result()
        writer = TreeWriter(repo.keys, put_node)
        for _ in range(3):
            writer.add(short_id)
        root, depth = writer.finish()
        qubes = {"work": {**qube_meta(), "volumes": {"private": {
            "size": 3 * CS, "chunks": 3, "root": root, "depth": depth, "settings": {}}}}}
        plain = manifest.encode(manifest.Manifest(repo.keys.repo_id, snapshot_id, time.time(), "dom0",
                                                  first, CS, qubes))
        s.commit(snapshot_id, crypto.seal_snapshot(repo.keys, snapshot_id, plain), [root])
    snap = resolve_snapshot(repo.history(), snapshot_id.hex())
    result = repo.verify(snap)
    assert [e.split(": ")[0] for e in result.errors] == [f"work:private at offset {k * CS}" for k in range(3)]
    assert all(e.endswith(f"chunk has 10 bytes, expected {CS}") for e in result.errors)


def test_restore_refuses_existing_targets(repo, tmp_path):
    data = os.urandom(3 * CS)
    path = write_file(tmp_path / "v", len(data), [(0, data)])
    repo.backup([source("work", "private", path)])
    [snap] = repo.history()
    target = tmp_path / "existing"
    target.write_bytes(b"precious")
    fresh = tmp_path / "fresh"
    targets = {("work", "private"): str(target)}
    with pytest.raises(QbackupError, match="exists"):
        repo.restore(snap, targets)
    assert target.read_bytes() == b"precious"
    with pytest.raises(QbackupError, match="no volume work:nope"):
        repo.restore(snap, {("work", "nope"): str(fresh)})
    with pytest.raises(QbackupError, match="same path"):
        repo.restore(snap, {("work", "private"): str(fresh), ("work", "other"): str(fresh)})
    assert not fresh.exists()
    assert repo.restore(snap, targets, force=True).ok
    assert read(target) == data
    (tmp_path / "dir").mkdir()
    with pytest.raises(QbackupError, match="neither a regular file nor a block device"):
        repo.restore(snap, {("work", "private"): str(tmp_path / "dir")}, force=True)


def test_restore_goes_on_after_an_unwritable_target(repo, tmp_path):
    a = write_file(tmp_path / "a", CS, [(0, os.urandom(CS))])
    b = write_file(tmp_path / "b", 2 * CS, [(0, os.urandom(2 * CS))])
    repo.backup([source("a", "private", a), source("b", "private", b)])
    [snap] = repo.history()
    out = tmp_path / "out-b"
    result = repo.restore(snap, {("a", "private"): str(tmp_path / "no-such-dir" / "a"),
                                 ("b", "private"): str(out)})
    assert not result.ok
    assert result.errors == [f"a:private: cannot write {tmp_path}/no-such-dir/a: No such file or directory"]
    assert read(out) == read(b) and result.chunks == 2


@pytest.mark.root
def test_restore_to_a_block_device(repo, tmp_path):
    data = os.urandom(CS) + bytes(2 * CS) + os.urandom(100)
    path = write_file(tmp_path / "v", len(data), [(0, data)])
    repo.backup([source("work", "private", path)])
    [snap] = repo.history()
    image = write_file(tmp_path / "img", 4 * CS, [(0, b"\xff" * 4 * CS)])
    dev = subprocess.run(["losetup", "--find", "--show", image], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        with pytest.raises(QbackupError, match="exists"):
            repo.restore(snap, {("work", "private"): dev})
        assert repo.restore(snap, {("work", "private"): dev}, force=True).ok
        with open(dev, "rb") as f:
            assert f.read(len(data)) == data  # zero chunks written over the old bytes
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def test_history_rollback_and_own_deletion(repo, tmp_path):
    path = write_file(tmp_path / "v", CS, [(0, os.urandom(CS))])
    ids = [repo.backup([source("work", "private", path)]).snapshot_id for _ in range(3)]
    history = repo.history()
    assert [s.id for s in history] == ids
    assert resolve_snapshot(history, "latest").id == ids[2]
    assert resolve_snapshot(history, ids[1].hex()[:8].upper()).id == ids[1]
    with pytest.raises(QbackupError, match="8 to 64 hex digits"):
        resolve_snapshot(history, ids[1].hex()[:7])
    with pytest.raises(QbackupError, match="no snapshot"):
        resolve_snapshot(history, "0" * 64 if not ids[0].hex().startswith("0" * 8) else "f" * 64)

    with repo.session() as s:
        delete_snapshots(s, repo.keys, repo.state, [history[2]], history)
    assert [s.id for s in repo.history()] == ids[:2]  # our own deletion: no rollback

    # the backup qube hides the newest snapshot
    hidden = [p for p in repo.dir.rglob("*") if p.is_file() and ids[1].hex() in p.name]
    assert len(hidden) == 1
    hidden[0].unlink()
    with pytest.raises(RollbackError, match=f"{ids[1].hex()}.*--allow-rollback"):
        repo.history()
    assert [s.id for s in repo.history(allow_rollback=True)] == ids[:1]
    assert [s.id for s in repo.history()] == ids[:1]


def test_hiding_the_newest_left_right_after_deleting_the_head(repo, tmp_path):
    """Once dom0 has deleted its newest snapshot, the backup qube cannot hide
    the newest one left before dom0 lists the history again."""
    path = write_file(tmp_path / "v", CS, [(0, os.urandom(CS))])
    ids = [repo.backup([source("work", "private", path)]).snapshot_id for _ in range(3)]
    history = repo.history()
    with repo.session() as s:
        delete_snapshots(s, repo.keys, repo.state, [history[2]], history)
    hidden = [p for p in repo.dir.rglob("*") if p.is_file() and ids[1].hex() in p.name]
    assert len(hidden) == 1
    hidden[0].unlink()
    with pytest.raises(RollbackError, match=f"{ids[1].hex()}.*--allow-rollback"):
        repo.history()


def test_allow_rollback_keeps_the_record_of_deletions(repo, tmp_path):
    """After the backup qube lost snapshots (restored from an old copy, say),
    --allow-rollback accepts what is listed, but a snapshot this dom0 deleted
    stays deleted: it is left out when replayed, and refused again after."""
    path = write_file(tmp_path / "v", CS, [(0, os.urandom(CS))])
    ids = [repo.backup([source("work", "private", path)]).snapshot_id for _ in range(3)]
    files = {i: repo.dir / "snapshots" / i.hex() for i in ids}
    kept = {i: f.read_bytes() for i, f in files.items()}
    history = repo.history()
    with repo.session() as s:
        delete_snapshots(s, repo.keys, repo.state, [history[0]], history)
    files[ids[2]].unlink()  # the newest is lost ...
    files[ids[0]].write_bytes(kept[ids[0]])  # ... and the deleted one is back
    with pytest.raises(RollbackError, match="deleted by this dom0"):
        repo.history()
    assert [s.id for s in repo.history(allow_rollback=True)] == [ids[1]]
    with pytest.raises(RollbackError, match=f"{ids[0].hex()} was deleted by this dom0"):
        repo.history()
    files[ids[0]].unlink()
    assert [s.id for s in repo.history()] == [ids[1]]


def test_forged_manifest_is_reported_and_hides_nothing(repo, tmp_path):
    path = write_file(tmp_path / "v", CS, [(0, os.urandom(CS))])
    good = repo.backup([source("work", "private", path)]).snapshot_id
    forged = os.urandom(32)
    with repo.session() as s:
        s.commit(forged, os.urandom(200), [])
    history = repo.history()
    assert [s.id for s in history] == [good]
    [bad] = history.damaged
    assert bad.id == forged and "fails authentication" in bad.reason
    assert forged not in repo.state.load(repo.keys.repo_id).seen  # never authenticated


def test_one_bit_rotted_snapshot_hides_no_other(repo, tmp_path):
    """A damaged snapshot (oldest, middle or newest) is reported; every
    other one stays listable, verifiable and restorable, and the history
    rules still hold around it."""
    data = [os.urandom(2 * CS) for _ in range(4)]
    paths = [write_file(tmp_path / f"v{i}", 2 * CS, [(0, d)]) for i, d in enumerate(data)]
    ids = [repo.backup([source("work", "private", p)]).snapshot_id for p in paths]
    for rotten in (0, 2, 3):
        snapshot_file = repo.dir / "snapshots" / ids[rotten].hex()
        original = snapshot_file.read_bytes()
        corrupt_middle(snapshot_file)
        history = repo.history()
        assert [d.id for d in history.damaged] == [ids[rotten]]
        assert [s.id for s in history] == [i for k, i in enumerate(ids) if k != rotten]
        for snap in history:
            assert repo.verify(snap).ok
            target = tmp_path / f"out-{rotten}-{snap.id.hex()[:8]}"
            assert repo.restore(snap, {("work", "private"): str(target)}).ok
            assert read(target) == data[ids.index(snap.id)]
        snapshot_file.write_bytes(original)
    assert repo.state.load(repo.keys.repo_id).head == ids[3]
    corrupt_middle(repo.dir / "snapshots" / ids[3].hex())  # a damaged head stays the head
    repo.history()
    assert repo.state.load(repo.keys.repo_id).head == ids[3]


def test_snapshot_of_another_repository_is_damaged(daemon, tmp_path):
    """Same keys, two repositories: a manifest moved across fails
    authentication (other repo_id, other subkeys) and is reported."""
    a, b = Repo(daemon, tmp_path / "a"), Repo(daemon, tmp_path / "b")
    b.keys = crypto.Keys(a.keys._master, os.urandom(32), CS, 0)
    path = write_file(tmp_path / "v", CS, [(0, os.urandom(CS))])
    stats = a.backup([source("work", "private", path)])
    with a.session(write=False) as s:
        blob = s.get_snapshot(stats.snapshot_id)
    with b.session() as s:
        s.commit(stats.snapshot_id, blob, [])
    history = b.history()
    assert list(history) == [] and [d.id for d in history.damaged] == [stats.snapshot_id]
    assert "fails authentication" in history.damaged[0].reason


class Interrupt(Recorder):
    """Progress that interrupts the backup (as Ctrl-C would) after `after` bytes."""

    def __init__(self, after: int):
        super().__init__()
        self.after, self.seen = after, 0

    def advance(self, n):
        self.seen += n
        if self.seen >= self.after:
            raise KeyboardInterrupt


def test_interrupted_backup_resumes(repo, tmp_path):
    data = os.urandom(12 * CS)
    good = write_file(tmp_path / "good", len(data), [(0, data)])
    with pytest.raises(KeyboardInterrupt):
        repo.backup([source("work", "private", good)], progress=Interrupt(5 * CS))
    assert repo.history() == []  # nothing committed
    stats = repo.backup([source("work", "private", good)])
    assert stats.chunks_dedup >= 5  # what was sent before the interruption is reused
    assert stats.chunks_new + stats.chunks_dedup == 12
    [snap] = repo.history()
    assert repo.verify(snap).ok


def test_unreadable_volume_fails_cleanly(repo, tmp_path):
    good = write_file(tmp_path / "good", CS, [(0, os.urandom(CS))])
    bad = VolumeSource("work", "root", str(tmp_path / "missing"), CS, {})
    with pytest.raises(QbackupError, match="cannot open volume .*missing"):
        repo.backup([source("work", "private", good), bad])
    assert repo.history() == []
    assert repo.state.load(repo.keys.repo_id).head is None


def test_bad_metadata_fails_before_sending(repo, tmp_path):
    path = write_file(tmp_path / "v", CS, [(0, os.urandom(CS))])
    with pytest.raises(QbackupError, match="without metadata"):
        repo.backup([source("work", "private", path)], meta={})
    with pytest.raises(QbackupError, match="listed twice"):
        repo.backup([source("work", "private", path)] * 2)
    with pytest.raises(QbackupError, match="invalid qube metadata"):
        repo.backup([source("work", "private", path)], meta={"work": {"properties": {}}})
    with pytest.raises(QbackupError, match="invalid qube metadata"):
        repo.backup([source("work", "private", path)], meta={"work": {"class": "AppVM", "tags": "x"}})
    with repo.session(write=False) as s:
        assert s.stats()["blobs"] == 0


def test_oversized_manifest_fails_before_anything_is_sent(repo, tmp_path):
    path = write_file(tmp_path / "v", 3 * CS, [(0, os.urandom(3 * CS))])
    # features of at most 64 KiB each (qubesd's payload bound), 4 MiB in all
    meta = {"work": {**qube_meta(), "features": {f"notes{i}": "x" * manifest.MAX_FEATURE
                                                 for i in range(64)}}}
    with pytest.raises(QbackupError, match="manifest would take .* qube work alone takes"):
        repo.backup([source("work", "private", path)], meta=meta)
    with repo.session(write=False) as s:
        assert s.stats()["blobs"] == 0  # refused before any chunk was sent
    assert repo.history() == []


def test_volume_changing_size_fails_cleanly(repo, tmp_path):
    path = write_file(tmp_path / "v", 2 * CS, [(0, os.urandom(2 * CS))])
    src = source("work", "private", path)
    src.size = 4 * CS  # the volume shrank after it was measured
    with pytest.raises(QbackupError, match="expected"):
        repo.backup([src])
    assert repo.history() == []


# -- change tracking: the previous chunk map and the changed chunks --------------

def _previous(snap, qube="work", volume="private"):
    from qbackup.backup import Previous
    vol = snap.qubes[qube]["volumes"][volume]
    return Previous(vol["root"], vol["depth"], vol["chunks"], vol["size"])


def _changed_source(path, previous, changed):
    s = source("work", "private", path)
    s.previous, s.changed, s.how = previous, changed, "changed"
    return s


def _restored(repo, snap, tmp_path, name):
    target = str(tmp_path / name)
    assert repo.restore(snap, {("work", "private"): target}).ok
    return read(target)


@pytest.mark.parametrize("new_chunks", [2100, 2100 + 700, 1500, 1024, 3 * 1024])
def test_only_changed_chunks_are_read_whatever_the_size(repo, tmp_path, new_chunks):
    """2100 chunks (three leaves, the last partial) with data in a few of
    them; then chunks 5 and 1500 rewritten and the size changed to
    `new_chunks` (plus 100 bytes: a short last chunk): only the chunks
    listed as changed, those past the old end and the new short last one
    are read; whole leaves are reused; the restore is byte for byte."""
    data = {i: os.urandom(CS) for i in (0, 5, 7, 1023, 1024, 1500, 2047, 2048, 2099)}
    path = write_file(tmp_path / "vol", 2100 * CS, list((i * CS, d) for i, d in data.items()))
    first = repo.backup([source("work", "private", path)])
    [snap] = repo.history()
    size = new_chunks * CS + 100
    with open(path, "r+b") as f:
        f.truncate(size)
        for i in (5, 1500):
            if i < new_chunks:
                f.seek(i * CS)
                f.write(os.urandom(CS))
        f.seek(size - 100)
        f.write(b"t" * 100)
    second = repo.backup([_changed_source(path, _previous(snap), [(5, 6), (1500, 1501)])])
    [read_] = second.reads
    assert (read_.how, read_.why) == ("changed", None)
    kept = [i for i in data if i < min(2100, new_chunks) and i not in (5, 1500)]
    rewritten = 2 if new_chunks > 1500 else 1
    assert read_.bytes_read == rewritten * CS + 100  # past the old end: holes, not read
    assert second.chunks_unchanged == min(2100, new_chunks) - rewritten
    assert second.chunks_new == rewritten + 1
    assert first.chunks_new == len(data) and kept
    latest = repo.history()[-1]
    assert _restored(repo, latest, tmp_path, "out") == read(path)
    assert repo.verify(latest).ok


def test_an_unreadable_previous_map_falls_back_to_a_full_read(repo, tmp_path):
    from qbackup.backup import Previous
    path = write_file(tmp_path / "vol", 1100 * CS, [(0, os.urandom(40 * CS))])
    repo.backup([source("work", "private", path)])
    forged = Previous(os.urandom(32), 2, 1100, 1100 * CS)  # a root the repository lacks
    stats = repo.backup([_changed_source(path, forged, [])])
    [read_] = stats.reads
    assert read_.how == "fallback" and "chunk map cannot be read" in read_.why
    assert read_.bytes_read == 40 * CS and stats.chunks_dedup == 40  # still nothing resent
    assert _restored(repo, repo.history()[-1], tmp_path, "out") == read(path)


def test_a_reused_leaf_the_repository_lost_is_a_clear_error(repo, tmp_path):
    """Unchanged leaves are not asked about: if the repository lost one
    (here: a depth-1 map whose root it lacks), the commit's references
    catch it, and the error says what to do."""
    from qbackup.backup import Previous
    path = write_file(tmp_path / "vol", 40 * CS, [(0, os.urandom(40 * CS))])
    repo.backup([source("work", "private", path)])
    lost = Previous(os.urandom(32), 1, 40, 40 * CS)
    with pytest.raises(QbackupError, match="lacks data that an earlier snapshot references.*"
                                           "backup --full sends it again"):
        repo.backup([_changed_source(path, lost, [])])
    assert len(repo.history()) == 1


# -- VolumeStream: a volume in order, for admin.vm.volume.ImportWithSize ---------

def stream_all(stream: VolumeStream, sizes) -> bytes:
    out, k = [], 0
    while data := stream.read(sizes[k % len(sizes)]):
        assert len(data) <= sizes[k % len(sizes)]
        out.append(data)
        k += 1
    stream.close()
    return b"".join(out)


def test_volume_stream_gives_every_byte_in_order(repo, tmp_path):
    """Zero chunks, a short last chunk, chunks repeated next to each other
    and far apart (beyond the stream's cache: fetched again), and a tree of
    two levels: the stream's bytes are the volume's bytes."""
    blocks = [os.urandom(CS) for _ in range(12)]
    layout = ([0, 1, 0, None, 2, 2, 2] + list(range(3, 12)) + [None] * 1000 + [1, 0, 5]
              + list(range(12)) * 3)
    data = b"".join(bytes(CS) if b is None else blocks[b] for b in layout) + b"tail"
    path = write_file(tmp_path / "v", len(data), [(0, data)])
    repo.backup([source("work", "private", path)])
    [snap] = repo.history()
    vol = snap.qubes["work"]["volumes"]["private"]
    assert vol["depth"] == 2
    progress = Recorder()
    with repo.session(write=False) as s:
        stream = VolumeStream(s, repo.keys, "work:private", vol, progress=progress)
        assert stream_all(stream, [65536, 1, CS * 3 + 7, 100000]) == data
        assert stream.complete and stream.error is None and stream.bytes == len(data)
        assert stream.chunks == sum(1 for b in layout if b is not None) + 1
        # a second stream on the same session: the first left nothing behind
        again = VolumeStream(s, repo.keys, "work:private", vol)
        assert again.read() == data and again.read(10) == b""
    assert progress.per_volume() == {"work:private": (len(data), len(data))}


@pytest.mark.parametrize("attack,reason", [
    (lambda i, t, d: (i, t, flip(d)), "fails authentication"),
    (lambda i, t, d: (i, None, None), "chunk missing"),
    (lambda i, t, d: (i, t, d[:40]), "fails authentication"),
])
def test_volume_stream_stops_before_a_tampered_chunk(repo, tmp_path, attack, reason):
    """Nothing of a bad chunk, and nothing after it, comes out: the stream
    ends exactly where the bad chunk begins, and says so."""
    data = os.urandom(6 * CS)
    path = write_file(tmp_path / "v", len(data), [(0, data)])
    repo.backup([source("work", "private", path)])
    [snap] = repo.history()
    seen = []

    def alter(i, t, d):
        if t == crypto.TYPE_DATA:
            seen.append(i)
            if len(seen) == 4:
                return attack(i, t, d)
        return i, t, d

    with repo.session(write=False) as s:
        stream = VolumeStream(Tamper(s, alter), repo.keys, "work:private",
                              snap.qubes["work"]["volumes"]["private"])
        out = stream_all(stream, [CS // 3])
    assert out == data[:3 * CS]
    assert not stream.complete and stream.chunks == 3
    assert stream.error.startswith(f"work:private at offset {3 * CS}: ") and reason in stream.error


def test_volume_stream_stops_at_a_bad_chunk_map_node(repo, tmp_path):
    data = os.urandom(3 * CS)
    path = write_file(tmp_path / "v", len(data), [(0, data)])
    repo.backup([source("work", "private", path)])
    [snap] = repo.history()

    def alter(i, t, d):
        return (i, t, flip(d)) if t == crypto.TYPE_TREE else (i, t, d)

    with repo.session(write=False) as s:
        stream = VolumeStream(Tamper(s, alter), repo.keys, "work:private",
                              snap.qubes["work"]["volumes"]["private"])
        assert stream.read() == b""
    assert stream.error.startswith("work:private at offset 0: chunk map node fails")
