# SPDX-License-Identifier: GPL-2.0-or-later
"""The cross-test that keeps both sides of docs/PROTOCOL.md in step.

It starts the real daemon (`python -m qbackupd serve`, a subprocess) and
drives every operation through the dom0 client (qbackup.proto.Session over
qbackup.transport), errors included. The two sides share no code: if either
drifts from the protocol document, this test fails.
"""

import concurrent.futures
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from qbackup import crypto
from qbackup.errors import QbackupError, RemoteError
from qbackup.proto import MAX_BLOB, Session
from qbackup.transport import SocketTransport, unix_socket
from qbackup_sim.daemon import daemon_command
from hangguard import within

TIMEOUT = 60   # guards against hangs only
PACK = 8 << 20


def ident(n: int) -> bytes:
    return n.to_bytes(4, "big") * 8


def accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


@pytest.fixture
def daemon():
    """The real daemon on a fresh storage directory: (socket path, storage dir)."""
    root = Path(tempfile.mkdtemp(prefix="qbx-"))   # short: Unix socket paths are limited
    sock, storage = root / "sock", root / "storage"
    storage.mkdir()
    proc = subprocess.Popen(daemon_command("serve", "--socket", str(sock), "--storage", str(storage),
                                           "--log-level", "warning"))
    deadline = time.monotonic() + TIMEOUT
    while not accepts(sock):
        assert proc.poll() is None, "the daemon exited at start"
        assert time.monotonic() < deadline, "the daemon does not accept connections"
        time.sleep(0.02)
    yield str(sock), storage
    proc.terminate()
    assert proc.wait(TIMEOUT) == 0
    shutil.rmtree(root)


def connect(sock: str, repo: str = "repo", **kw) -> Session:
    return Session(unix_socket(sock, repo), **kw)




def remote_code(fn, *args) -> str:
    with pytest.raises(RemoteError) as err:
        result = fn(*args)
        if hasattr(result, "result"):
            result.result(TIMEOUT)
    return err.value.code


def test_every_operation(daemon):
    sock, _ = daemon
    keys = crypto.create_keys(64 << 10)
    config = crypto.wrap_keys(keys, b"pw", scrypt_n=2**14)
    sealer = crypto.Sealer(keys)
    s = connect(sock)
    assert s.max_frame == 8 << 20 and s.max_batch == 4096
    s.init(config, PACK)
    chunks = [os.urandom(1000) * (i + 1) for i in range(5)] + [bytes(64 << 10)]
    ids = [keys.chunk_id(c) for c in chunks]
    puts = [s.put(i, crypto.TYPE_DATA, sealer.seal(crypto.TYPE_DATA, i, c))
            for i, c in zip(ids, chunks)]
    assert [f.result(TIMEOUT) for f in puts] == [True] * 6
    assert s.put(ids[0], crypto.TYPE_DATA, b"again").result(TIMEOUT) is False
    tree = b"".join(ids)
    tree_id = keys.chunk_id(tree, crypto.TYPE_TREE)
    assert s.put(tree_id, crypto.TYPE_TREE, sealer.seal(crypto.TYPE_TREE, tree_id, tree),
                 refs=ids).result(TIMEOUT)
    assert s.have([ident(1), ids[2], tree_id, ident(2)]).result(TIMEOUT) == [0, 3]
    s.flush()
    snap_id = os.urandom(32)
    snapshot = crypto.seal_snapshot(keys, snap_id, b"manifest")
    s.commit(snap_id, snapshot, [tree_id])
    [(listed_id, size, stored_time)] = s.list()
    assert listed_id == snap_id and size == len(snapshot)
    assert abs(stored_time - time.time()) < 3600
    assert crypto.open_snapshot(keys, snap_id, s.get_snapshot(snap_id)) == b"manifest"
    got = list(s.get([tree_id, ident(7)] + ids, window=3))
    assert [g[0] for g in got] == [tree_id, ident(7)] + ids
    assert got[1] == (ident(7), None, None)
    assert crypto.open_blob(keys, got[0][1], tree_id, got[0][2], 1 << 20) == tree
    for (blob_id, type_, data), chunk in zip(got[2:], chunks):
        assert type_ == crypto.TYPE_DATA
        assert crypto.open_blob(keys, type_, blob_id, data, keys.chunk_size) == chunk
    stats = s.stats()
    assert (stats["blobs"], stats["snapshots"]) == (7, 1) and stats["packs"] >= 1
    new_config = crypto.wrap_keys(keys, b"new", scrypt_n=2**14)
    assert remote_code(s.set_config, new_config, b"not the config") == "conflict"
    s.set_config(new_config, config)
    s.delete_snapshot(snap_id)
    assert s.list() == []
    within(s.close)
    with pytest.raises(QbackupError, match="session is closed"):
        s.stats()

    s = connect(sock)
    untrusted_config, pack_size = s.open(False)
    assert pack_size == PACK
    assert crypto.unwrap_keys(untrusted_config, b"new").repo_id == keys.repo_id
    assert s.have(ids).result(TIMEOUT) == []
    within(s.close)


def test_error_codes(daemon):
    sock, _ = daemon
    s = connect(sock)
    assert remote_code(s.open, False) == "no_repository"
    s.init(b"config", PACK)
    assert remote_code(s.get_snapshot, ident(1)) == "not_found"
    assert remote_code(s.delete_snapshot, ident(1)) == "not_found"
    assert remote_code(s.put, ident(2), 2, b"node", [ident(1)]) == "missing_refs"
    with pytest.raises(RemoteError, match="missing_refs"):
        s.commit(ident(3), b"snapshot", [ident(1)])
    s.put(ident(1), 1, b"chunk").result(TIMEOUT)
    s.put(ident(2), 2, b"node", [ident(1)]).result(TIMEOUT)    # refs put on this connection
    s.commit(ident(3), b"snapshot", [ident(2)])
    assert remote_code(s.commit, ident(3), b"snapshot", [ident(2)]) == "exists"

    other = connect(sock)
    assert remote_code(other.init, b"config", PACK) == "exists"
    assert remote_code(other.open, True) == "locked"
    assert other.open(False) == (b"config", PACK)
    assert remote_code(other.put, ident(4), 1, b"x") == "read_only"
    assert remote_code(other.flush) == "read_only"
    assert remote_code(other.commit, ident(5), b"s", []) == "read_only"
    assert remote_code(other.delete_snapshot, ident(3)) == "read_only"
    assert remote_code(other.set_config, b"c", b"config") == "read_only"
    assert other.list()[0][0] == ident(3)
    within(other.close)
    within(s.close)

    s = connect(sock)       # the lock went with the first session
    s.open(True)
    assert s.stats()["snapshots"] == 1
    within(s.close)


def test_bad_repo_name_and_forbidden_source(daemon):
    sock, _ = daemon
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(sock)
    raw.sendall(b"qubes.BackupChunk+ dom0\0")      # no repository name
    s = Session(SocketTransport(raw))
    assert remote_code(s.open, False) == "bad_repo_name"
    assert remote_code(s.init, b"c", PACK) == "bad_repo_name"
    within(s.close)
    with pytest.raises(RemoteError) as err:
        s = Session(unix_socket(sock, "repo", source="someqube"))
        s.open(False)
    assert err.value.code == "forbidden"


def test_pipelined_puts_and_streamed_gets_at_scale(daemon):
    sock, _ = daemon
    s = connect(sock, max_in_flight_bytes=1 << 20)
    s.init(b"config", PACK)
    def blob(i: int) -> bytes:
        size = MAX_BLOB if i % 50 == 0 else (100, 5000, 64 << 10)[i % 3]
        return i.to_bytes(4, "big") * (size // 4)

    def writer(t: int) -> list[bool]:
        futures = [s.put(ident(i), 1, blob(i)) for i in range(t, 400, 4)]
        return [f.result(TIMEOUT) for f in futures]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(all(r) for r in within(lambda: list(pool.map(writer, range(4)))))
    ids = [ident(i) for i in range(410)]
    missing = [f.result(TIMEOUT) for f in [s.have(ids[k:k + 100]) for k in range(0, 410, 100)]]
    assert missing == [[], [], [], [], list(range(10))]

    def read_all() -> int:
        n = 0
        for i, (blob_id, type_, data) in enumerate(s.get(ids, window=16)):
            assert blob_id == ids[i]
            assert (type_, data) == ((1, blob(i)) if i < 400 else (None, None))
            n += 1
        return n
    assert within(read_all) == 410
    gen = s.get(ids, window=32)
    assert next(gen)[0] == ids[0]
    gen.close()
    s.flush()
    assert s.stats()["blobs"] == 400
    within(s.close)


def test_disconnect_without_bye_keeps_what_was_put(daemon):
    sock, _ = daemon
    t = unix_socket(sock, "repo")
    s = Session(t)
    s.init(b"config", PACK)
    assert s.put(ident(1), 1, b"data").result(TIMEOUT)
    t.abort()
    t.close()
    deadline = time.monotonic() + TIMEOUT
    while True:           # the daemon releases the lock once it has seen the disconnect
        s = connect(sock)
        try:
            s.open(True)
            break
        except RemoteError as exc:
            assert exc.code == "locked" and time.monotonic() < deadline
            s.close()
            time.sleep(0.05)
    assert s.have([ident(1)]).result(TIMEOUT) == []
    within(s.close)


def test_version_2_operations(daemon):
    """delete_snapshots, usage, check (with bit rot) and gc, through the dom0
    client against the real daemon, with their progress frames."""
    sock, storage = daemon
    s = connect(sock)
    assert s.version == 3
    s.init(b"config", PACK)
    chunks = {n: os.urandom(300_000) for n in range(40)}
    for n, data in chunks.items():
        s.put(ident(n), 1, data)
    s.put(ident(100), 2, b"root a", refs=[ident(n) for n in range(20)])
    s.put(ident(101), 2, b"root b", refs=[ident(n) for n in range(20, 40)])
    s.put(ident(102), 2, b"root c", refs=[ident(0)])
    for snap, roots in ((200, [100]), (201, [101, 102]), (202, [102])):
        s.commit(ident(snap), b"manifest", [ident(r) for r in roots])
    assert remote_code(s.delete_snapshots, [ident(200), ident(999)]) == "not_found"
    assert len(s.list()) == 3                       # all or nothing
    assert remote_code(s.gc) == "read_write"         # gc wants a read-only session
    s.delete_snapshots([ident(200), ident(202)])
    assert [x[0] for x in s.list()] == [ident(201)]
    within(s.close)

    s = connect(sock)
    s.open(False)
    phases = []
    used = s.usage(progress=lambda phase, done, total: phases.append(phase))
    # root b, root c, chunks 20..39 and chunk 0; chunks 1..19 and root a are garbage
    assert used["snapshots"] == [(ident(201), 23, 21 * 300_000 + len(b"root b") + len(b"root c"))]
    assert used["unreferenced_blobs"] == 19 + 1 and used["missing"] == 0
    dry = s.gc(dry_run=True, repack_below=100)
    assert dry["dry_run"] and dry["bytes_freed"] > 0
    summary = s.gc(repack_below=100, progress=lambda phase, done, total: phases.append(phase))
    assert not summary["dry_run"] and summary["packs_deleted"] + summary["packs_repacked"] > 0
    assert {"mark", "repack", "sweep"} <= set(phases)
    assert s.usage()["unreferenced_blobs"] == 0
    clean = s.check(read_data=True)
    assert clean["problems"] == [] and clean["affected"] == [] and clean["complete"]

    pack = sorted(storage.glob("repo/packs/*/*.pack"))[0]
    raw = bytearray(pack.read_bytes())
    raw[100] ^= 0x01                                 # inside the first record's data
    pack.write_bytes(bytes(raw))
    assert s.check()["problems"] == []               # only reading the data finds it
    report = s.check(read_data=True, progress=lambda *a: phases.append(a[0]))
    assert report["problems_total"] == 1 and "CRC-32" in report["problems"][0]
    assert report["damaged_total"] == len(report["damaged"]) == 1
    assert report["affected"][0][0] == ident(201) and report["affected_total"] == 1
    assert set(report["affected"][0][1]) <= {ident(101), ident(102)}
    within(s.close)

    s = connect(sock)
    s.version = 1                                    # as against a daemon of protocol 1
    with pytest.raises(QbackupError, match="needs version 2"):
        s.usage()
    within(s.close)


def test_version_3_locate(daemon):
    """locate through the dom0 client: sorting by its keys gives the order the
    blobs were stored in, across packs (30 blobs of 300 kB fill two)."""
    sock, storage = daemon
    s = connect(sock)
    s.init(b"config", PACK)
    for n in range(30):
        s.put(ident(n), 1, os.urandom(300_000))
    s.flush()
    within(s.close)
    assert len(list(storage.glob("repo/packs/*/*.pack"))) >= 2
    s = connect(sock)
    s.open(False)
    wanted = [ident(n) for n in reversed(range(30))] + [ident(99)]
    batches = [s.locate(wanted[:10]), s.locate(wanted[10:])]     # pipelined
    keys = [k for f in batches for k in f.result(TIMEOUT)]
    assert [i for _, i in sorted(zip(keys, wanted))] == [ident(n) for n in range(30)] + [ident(99)]
    s.version = 2                                    # as against a daemon of protocol 2
    with pytest.raises(QbackupError, match="'locate' needs version 3"):
        s.locate(wanted[:1])
    within(s.close)
