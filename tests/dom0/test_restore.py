# SPDX-License-Identifier: GPL-2.0-or-later
"""Restore targets and partial files (qbackup.restore), in process against
an in-memory store: aliased targets, what may lie at PATH.qbackup-partial,
that no unauthenticated byte is ever written there, block devices opened
once and exclusively, and --force for every kind of target."""

import contextlib
import os
import stat
import subprocess
from pathlib import Path

import pytest
from engine_helpers import MemoryStore, store_volume

from qbackup import crypto, restore
from qbackup.chunkmap import TreeWriter
from qbackup.errors import QbackupError, RemoteError
from qbackup.restore import PARTIAL_SUFFIX, SnapshotInfo
from qbackup.state import State
from hangguard import within

CS = 64 << 10


@pytest.fixture(scope="module")
def keys():
    return crypto.create_keys(CS)


@pytest.fixture
def volume(keys):
    """A store holding one volume work:private of 6 chunks (one zero): (store, snapshot, data)."""
    store = MemoryStore(keys)
    data = os.urandom(2 * CS) + bytes(CS) + os.urandom(3 * CS - 100)
    vol = store_volume(store, data)
    qubes = {"work": {"class": "AppVM", "properties": {}, "features": {}, "tags": [],
                      "volumes": {"private": vol, "root": vol}}}
    return store, SnapshotInfo(os.urandom(32), 1.0, "dom0", None, qubes, 2 * len(data)), data


def run(volume, targets, **kw):
    store, snap, _ = volume
    return within(restore.restore, store, store.keys, snap, targets, **kw)


def test_round_trip(volume, tmp_path):
    target = tmp_path / "out.img"
    assert run(volume, {("work", "private"): str(target)}).ok
    assert target.read_bytes() == volume[2]


@pytest.mark.parametrize("alias", ["dot", "symlinked-dir", "double-slash", "partial-of-the-other"])
def test_aliased_targets_are_refused(volume, tmp_path, monkeypatch, alias):
    """Two names for one target would clobber each other; nothing is created."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir").mkdir()
    os.symlink("dir", tmp_path / "link")
    first, second = {
        "dot": ("out.img", "./out.img"),
        "symlinked-dir": ("dir/out.img", str(tmp_path / "link" / "out.img")),
        "double-slash": ("dir/out.img", "dir//out.img"),
        "partial-of-the-other": ("out.img", "out.img" + PARTIAL_SUFFIX),
    }[alias]
    with pytest.raises(QbackupError, match="same path"):
        run(volume, {("work", "private"): first, ("work", "root"): second})
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dir", "link"]


def test_a_symlink_target_is_replaced_not_followed(volume, tmp_path):
    """A file target replaces the name it is given: a symlink there is
    replaced (with --force), never written through, so a symlink and its
    destination are two targets."""
    (tmp_path / "real.img").write_bytes(b"precious")
    os.symlink("real.img", tmp_path / "link.img")
    result = run(volume, {("work", "private"): str(tmp_path / "link.img")}, force=True)
    assert result.ok and (tmp_path / "real.img").read_bytes() == b"precious"
    assert not (tmp_path / "link.img").is_symlink()


def planted(kind: str, partial: Path, victim: Path) -> None:
    if kind == "fifo":
        os.mkfifo(partial)
    elif kind == "hard-link":
        os.link(victim, partial)
    elif kind == "symlink":
        os.symlink(victim, partial)
    elif kind == "dangling-symlink":
        os.symlink(victim.parent / "nowhere", partial)
    else:
        partial.mkdir()


@pytest.mark.parametrize("kind", ["fifo", "hard-link", "symlink", "dangling-symlink", "directory"])
def test_planted_partial_is_refused(volume, tmp_path, kind):
    """Only a regular file with no other name may lie at PATH.qbackup-partial:
    a FIFO would hang the restore, a hard link or symlink would be written
    through. The restore is refused before anything is written."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "out.img"
    partial = Path(str(target) + PARTIAL_SUFFIX)
    planted(kind, partial, victim)
    with pytest.raises(QbackupError, match=f"{partial} exists and is .*refusing to use it"):
        run(volume, {("work", "private"): str(target)})
    assert victim.read_bytes() == b"precious" and not target.exists()
    assert os.path.lexists(partial)


@pytest.mark.parametrize("kind", ["hard-link", "symlink", "fifo"])
def test_partial_planted_after_the_checks_is_never_followed(volume, tmp_path, monkeypatch, kind):
    """Planted between the checks and the write, the partial is still only
    ever created with O_EXCL | O_NOFOLLOW: the restore fails, the victim is
    untouched."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "out.img"
    partial = Path(str(target) + PARTIAL_SUFFIX)
    check = restore._check_partial
    calls = []

    def plant_late(path):
        check(path)
        calls.append(path)
        if len(calls) == 2:  # the second check, just before the partial is created
            monkeypatch.setattr(os, "unlink", lambda p, *a, **k: None)  # it cannot be removed
            planted(kind, partial, victim)
    monkeypatch.setattr(restore, "_check_partial", plant_late)
    store, snap, _ = volume  # opened without O_EXCL, a FIFO would hang: fail in 10 s instead
    result = within(restore.restore, store, store.keys, snap, {("work", "private"): str(target)},
                    hang_limit=10)
    assert not result.ok and "File exists" in result.errors[0]
    assert victim.read_bytes() == b"precious" and not target.exists()


def test_partial_left_by_an_interrupted_restore_is_replaced(volume, tmp_path):
    target = tmp_path / "out.img"
    Path(str(target) + PARTIAL_SUFFIX).write_bytes(b"half a volume")
    assert run(volume, {("work", "private"): str(target)}).ok
    assert target.read_bytes() == volume[2]
    assert not Path(str(target) + PARTIAL_SUFFIX).exists()


class Flip(MemoryStore):
    """Serves the blobs of `bad_ids` with a flipped bit."""

    def __init__(self, store: MemoryStore, *bad_ids: bytes):
        self.__dict__.update(store.__dict__)
        self.bad_ids = set(bad_ids)

    def get(self, ids, **kw):
        for i, t, d in super().get(ids, **kw):
            if i in self.bad_ids:
                d = d[:60] + bytes([d[60] ^ 1]) + d[61:]
            yield i, t, d


def test_no_unauthenticated_byte_reaches_the_partial_file(volume, tmp_path, monkeypatch):
    """The partial file is looked at when the failing chunk is found (just
    before it is removed): it holds authenticated plaintext or holes, and
    nothing at all where the forged chunk is."""
    store, snap, data = volume
    bad = 4
    forged = Flip(store, store.keys.chunk_id(data[bad * CS:(bad + 1) * CS]))
    target = tmp_path / "out.img"
    seen = []
    unlink = os.unlink

    def look_then_unlink(path, *args, **kw):
        if str(path).endswith(PARTIAL_SUFFIX):
            seen.append(Path(path).read_bytes())
        unlink(path, *args, **kw)
    monkeypatch.setattr(os, "unlink", look_then_unlink)
    result = within(restore.restore, forged, store.keys, snap, {("work", "private"): str(target)})
    assert not result.ok and result.errors == [f"work:private at offset {bad * CS}: "
                                               + result.errors[0].split(": ", 1)[1]]
    [partial] = seen
    assert len(partial) == len(data)
    for k in range(0, len(data), CS):
        assert partial[k:k + CS] in (bytes(len(data[k:k + CS])), data[k:k + CS]), f"chunk {k // CS}"
    assert partial[bad * CS:(bad + 1) * CS] == bytes(CS)
    assert partial[:CS] == data[:CS]  # written before the failure was found
    assert not target.exists()


def test_a_regular_file_target_needs_force(volume, tmp_path):
    target = tmp_path / "out.img"
    target.write_bytes(b"precious")
    with pytest.raises(QbackupError, match="exists: refusing to overwrite it without --force"):
        run(volume, {("work", "private"): str(target)})
    assert target.read_bytes() == b"precious"


def test_block_device_is_checked_on_the_descriptor_it_is_written_through(volume, tmp_path,
                                                                       monkeypatch):
    """A path that looked like a block device but is something else once
    opened is refused: the device is checked on the one descriptor that
    writes it, not by path before."""
    target = tmp_path / "out.img"
    target.write_bytes(b"precious")
    real_stat = os.stat

    def looks_like_a_device(path, *a, **kw):
        st = real_stat(path, *a, **kw)
        if str(path) == str(target):
            return os.stat_result((stat.S_IFBLK | 0o600,) + tuple(st)[1:])
        return st
    monkeypatch.setattr(os, "stat", looks_like_a_device)
    with pytest.raises(QbackupError, match="no longer a block device"):
        run(volume, {("work", "private"): str(target)}, force=True)
    assert target.read_bytes() == b"precious"


@contextlib.contextmanager
def loop_device(path: Path, size: int):
    with open(path, "wb") as f:
        f.truncate(size)
    dev = subprocess.run(["losetup", "--find", "--show", str(path)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


@pytest.mark.root
def test_a_block_device_target_needs_force_too(volume, tmp_path):
    """A block device is an existing target like any other: without --force
    it is refused, and with it written in place (zeros included)."""
    data = volume[2]
    with loop_device(tmp_path / "img", 8 * CS) as dev:
        with open(dev, "wb") as f:
            f.write(b"\xff" * 8 * CS)
        with pytest.raises(QbackupError, match="exists: refusing to overwrite it without --force"):
            run(volume, {("work", "private"): dev})
        with open(dev, "rb") as f:
            assert f.read() == b"\xff" * 8 * CS
        assert run(volume, {("work", "private"): dev}, force=True).ok
        with open(dev, "rb") as f:
            assert f.read(len(data)) == data


@pytest.mark.root
def test_a_mounted_block_device_is_refused_even_with_force(volume, tmp_path):
    with loop_device(tmp_path / "img", 8 << 20) as dev:
        subprocess.run(["mkfs.ext4", "-q", dev], check=True)
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        subprocess.run(["mount", dev, str(mountpoint)], check=True)
        try:
            with pytest.raises(QbackupError, match=f"{dev} is in use \\(mounted\\?\\)"):
                run(volume, {("work", "private"): dev}, force=True)
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True)


@pytest.mark.root
def test_two_names_of_one_device_are_one_target(volume, tmp_path):
    with loop_device(tmp_path / "img", 8 * CS) as dev:
        alias = tmp_path / "alias"
        os.mknod(alias, stat.S_IFBLK | 0o600, os.stat(dev).st_rdev)
        with pytest.raises(QbackupError, match="same path"):
            run(volume, {("work", "private"): dev, ("work", "root"): str(alias)}, force=True)


@pytest.mark.root
def test_a_device_too_small_is_refused(volume, tmp_path):
    with loop_device(tmp_path / "img", 2 * CS) as dev:
        with pytest.raises(QbackupError, match=f"{dev} holds {2 * CS} bytes"):
            run(volume, {("work", "private"): dev}, force=True)


@pytest.fixture(scope="module")
def big(keys):
    """200 distinct chunks, stored as two volumes sharing every chunk."""
    store = MemoryStore(keys)
    data = os.urandom(200 * CS)
    vol = store_volume(store, data)
    qubes = {"work": {"class": "AppVM", "properties": {}, "features": {}, "tags": [],
                      "volumes": {"private": vol, "root": vol}}}
    return store, SnapshotInfo(os.urandom(32), 1.0, "dom0", None, qubes, 2 * len(data)), data


def test_verify_sample_reads_a_random_subset_of_distinct_chunks(big):
    store, snap, _ = big
    full = restore.verify(store, store.keys, snap)
    assert full.ok and (full.chunks, full.skipped) == (400, 0)
    first, second = restore.Sample(0.3), restore.Sample(0.3)
    result = restore.verify(store, store.keys, snap, sample=first)
    assert result.ok and result.chunks + result.skipped == 400
    assert 0 < result.chunks < 400
    # a distinct chunk is sampled everywhere or nowhere: both volumes hold each once
    assert result.chunks % 2 == 0
    picked = {i for i in store.blobs if store.blobs[i][0] == crypto.TYPE_DATA and i in first}
    assert result.chunks == 2 * len(picked)
    assert picked != {i for i in store.blobs if store.blobs[i][0] == crypto.TYPE_DATA
                      and i in second}  # a new random subset each run


def test_verify_sample_still_checks_every_chunk_map_node(big):
    store, snap, _ = big
    leaves = [i for i, (t, _) in store.blobs.items() if t == crypto.TYPE_TREE]
    damaged = MemoryStore(store.keys)
    damaged.blobs = {i: b for i, b in store.blobs.items() if i != leaves[0]}
    result = restore.verify(damaged, store.keys, snap, sample=restore.Sample(0.0001))
    assert not result.ok and len(result.errors) == 2  # the node's range in both volumes
    assert all("chunk map node missing" in e for e in result.errors)


def test_verify_sample_finds_a_forged_chunk_it_reads(big):
    store, snap, data = big
    bad_id = store.keys.chunk_id(data[7 * CS:8 * CS])
    forged = Flip(store, bad_id)
    samples = [restore.Sample(0.5) for _ in range(40)]
    hit = next(s for s in samples if bad_id in s)
    missed = next(s for s in samples if bad_id not in s)
    result = restore.verify(forged, store.keys, snap, sample=hit)
    assert [e.split(": ")[0] for e in result.errors] == [f"work:private at offset {7 * CS}",
                                                         f"work:root at offset {7 * CS}"]
    assert restore.verify(forged, store.keys, snap, sample=missed).ok


def test_verify_reports_every_bad_chunk(big):
    """Not only the first bad chunk of a volume: every one, at its offset,
    up to MAX_ERRORS lines and then a count."""
    store, snap, data = big
    bad = [3, 4, 50, 199]
    forged = Flip(store, *(store.keys.chunk_id(data[k * CS:(k + 1) * CS]) for k in bad))
    result = restore.verify(forged, store.keys, snap)
    assert [e.split(": ")[0] for e in result.errors] == [
        f"work:{vol} at offset {k * CS}" for vol in ("private", "root") for k in bad]
    assert all("authentication failed" in e for e in result.errors)
    assert result.chunks == 400 - 2 * len(bad)
    everything = Flip(store, *(i for i, (t, _) in store.blobs.items() if t == crypto.TYPE_DATA))
    result = restore.verify(everything, store.keys, snap)
    assert len(result.errors) == restore.MAX_ERRORS + 1
    assert result.errors[-1] == f"... and {400 - restore.MAX_ERRORS} more errors"


class Unreadable:
    """A session listing two snapshots whose manifests cannot be fetched."""

    def __init__(self, error: RemoteError):
        self.error = error

    def list(self):
        return [(bytes([1]) * 32, 100, 0), (bytes([2]) * 32, 100, 0)]

    def get_snapshot(self, snapshot_id):
        raise self.error


def test_a_snapshot_the_daemon_cannot_read_is_damaged_but_a_dead_session_is_an_error(keys, tmp_path):
    state = State(str(tmp_path / "state"))
    history = restore.load_history(Unreadable(RemoteError("io", "checksum mismatch")), keys, state)
    assert list(history) == [] and len(history.damaged) == 2
    assert "checksum mismatch" in history.damaged[0].reason
    with pytest.raises(RemoteError, match="internal"):  # the daemon closed the session
        restore.load_history(Unreadable(RemoteError("internal", "bug")), keys, state)


# --- sparse writes, devices, dedup-aware verify ---------------------------------

BLOCK = restore.BLOCK


def holey_data() -> bytes:
    """Chunks with all-zero 4 KiB blocks inside them, a zero chunk, a chunk
    with one non-zero byte, and a short tail whose partial block is data."""
    rnd = bytearray(os.urandom(4 * CS))
    for k in (1, 3, 4):
        rnd[k * BLOCK:(k + 1) * BLOCK] = bytes(BLOCK)
    one_byte = bytearray(CS)
    one_byte[30000] = 7
    last_block = bytearray(CS)
    last_block[-1] = 1
    tail = bytes(BLOCK) + os.urandom(904)
    return bytes(rnd[:CS]) + bytes(CS) + bytes(one_byte) + bytes(rnd[CS:2 * CS]) + bytes(last_block) + tail


def data_blocks(data: bytes) -> set[int]:
    return {k for k in range(-(-len(data) // BLOCK)) if data[k * BLOCK:(k + 1) * BLOCK].count(0)
            != len(data[k * BLOCK:(k + 1) * BLOCK])}


def allocated_blocks(path: Path) -> set[int]:
    """The 4 KiB blocks of a file that SEEK_DATA/SEEK_HOLE call data."""
    blocks, fd = set(), os.open(path, os.O_RDONLY)
    try:
        size, offset = os.fstat(fd).st_size, 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            blocks.update(range(start // BLOCK, -(-end // BLOCK)))
            offset = end
    finally:
        os.close(fd)
    return blocks


@pytest.fixture
def holey(keys):
    """A store holding holey_data() as work:private: (store, snapshot, data)."""
    store = MemoryStore(keys)
    data = holey_data()
    qubes = {"work": {"class": "AppVM", "properties": {}, "features": {}, "tags": [],
                      "volumes": {"private": store_volume(store, data)}}}
    return store, SnapshotInfo(os.urandom(32), 1.0, "dom0", None, qubes, len(data)), data


def test_zero_blocks_inside_chunks_stay_holes(holey, tmp_path):
    """Restored to a file, every all-zero 4 KiB block is a hole, inside
    chunks too (one non-zero byte costs one block, not a chunk)."""
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        f.truncate(1 << 20)
    if allocated_blocks(probe):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the file system of {tmp_path} does not report holes: CI must give one that does",
                        pytrace=False)
        pytest.skip(f"the file system of {tmp_path} does not report holes")
    store, snap, data = holey
    target = tmp_path / "out.img"
    result = within(restore.restore, store, store.keys, snap, {("work", "private"): str(target)})
    assert result.ok and result.chunks == 5
    assert target.read_bytes() == data
    assert allocated_blocks(target) == data_blocks(data) == (
        set(range(16)) - {1, 3, 4}) | {39} | set(range(48, 64)) | {79, 81}


@pytest.mark.root
def test_a_device_gets_the_zero_blocks_too(holey, tmp_path):
    store, snap, data = holey
    with loop_device(tmp_path / "img", 8 * CS) as dev:
        with open(dev, "wb") as f:
            f.write(b"\xff" * 8 * CS)
        assert within(restore.restore, store, store.keys, snap, {("work", "private"): dev},
                      force=True).ok
        with open(dev, "rb") as f:
            assert f.read(len(data)) == data


class Counting(Flip):
    """Flip that also counts how often each id is asked for."""

    def __init__(self, store: MemoryStore, *bad_ids: bytes):
        super().__init__(store, *bad_ids)
        self.asked: dict[bytes, int] = {}

    def get(self, ids, **kw):
        ids = list(ids)
        for i in ids:
            self.asked[i] = self.asked.get(i, 0) + 1
        yield from super().get(ids, **kw)


def test_verify_of_many_snapshots_reads_each_chunk_once_and_places_every_error(keys):
    """Three snapshots sharing chunks at other offsets: each distinct chunk
    is fetched once, and a bad one is reported at every place of every
    snapshot that uses it, with its volume and offset."""
    store = MemoryStore(keys)
    a, b, c, d = (os.urandom(CS) for _ in range(4))
    layouts = {"one": [a, b, a], "two": [c, a, bytes(CS), b], "three": [d, d, c]}
    snaps = []
    for name, chunks in layouts.items():
        vol = store_volume(store, b"".join(chunks))
        qubes = {"work": {"class": "AppVM", "properties": {}, "features": {}, "tags": [],
                          "volumes": {"private": vol, name: vol}}}
        snaps.append(SnapshotInfo(os.urandom(32), 1.0, "dom0", None, qubes, 0))
    honest = Counting(store)
    results = restore.verify_snapshots(honest, keys, snaps)
    assert [(r.ok, r.chunks, r.bytes) for r in results] == [(True, 6, 6 * CS), (True, 6, 6 * CS),
                                                           (True, 6, 6 * CS)]
    data_ids = {keys.chunk_id(x) for x in (a, b, c, d)}
    assert {i: n for i, n in honest.asked.items() if i in data_ids} == dict.fromkeys(data_ids, 1)

    forged = Counting(store, keys.chunk_id(a))
    results = restore.verify_snapshots(forged, keys, snaps)
    assert [n for i, n in forged.asked.items() if i in data_ids] == [1] * 4
    assert [[e.split(": ")[0] for e in r.errors] for r in results] == [
        [f"work:{vol} at offset {k * CS}" for vol in ("one", "private") for k in (0, 2)],
        [f"work:{vol} at offset {CS}" for vol in ("private", "two")],
        []]
    assert all("authentication failed" in e for r in results for e in r.errors)
    assert [(r.ok, r.chunks) for r in results] == [(False, 2), (False, 4), (True, 6)]


def test_verify_of_many_snapshots_checks_a_shared_chunk_against_every_place(keys):
    """One authentic short chunk: rightly the tail of one volume, wrongly at
    full-size places of another snapshot's map (as a dom0 bug could write
    it). Read once, it is still checked against the length of every place."""
    store = MemoryStore(keys)
    data = os.urandom(CS) + os.urandom(10)
    tail = keys.chunk_id(data[CS:])
    good = store_volume(store, data)
    writer = TreeWriter(keys, store.put_node)
    writer.add(tail)
    writer.add(tail)
    root, depth = writer.finish()
    bad = {"size": 2 * CS, "chunks": 2, "root": root, "depth": depth, "settings": {}}
    snaps = [SnapshotInfo(os.urandom(32), 1.0, "dom0", None, {"work": {
        "class": "AppVM", "properties": {}, "features": {}, "tags": [], "volumes": {"private": vol}}},
        0) for vol in (good, bad)]
    first, second = restore.verify_snapshots(store, keys, snaps)
    assert first.ok and first.chunks == 2
    assert second.errors == [f"work:private at offset {k * CS}: chunk has 10 bytes, expected {CS}"
                             for k in (0, 1)]
