# SPDX-License-Identifier: GPL-2.0-or-later
"""qbackup.proto and qbackup.transport against a well-behaved fake daemon.

The fake daemon below follows docs/PROTOCOL.md with an in-memory repository
on one end of a socketpair; it is written from the document, not from either
real implementation. Hostile daemons are in test_proto_hostile.py.
"""

import concurrent.futures
import hashlib
import os
import socket
import struct
import subprocess
import threading
import time

import msgpack
import pytest

from qbackup.errors import ProtocolError, QbackupError, RemoteError
from qbackup.proto import Session
from qbackup.transport import ProcessTransport, SocketTransport, unix_socket
from hangguard import within

TIMEOUT = 20


def ident(n: int) -> bytes:
    return hashlib.sha256(b"id%d" % n).digest()




def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class FakeDaemon:
    """An in-memory qbackupd speaking PROTOCOL.md version 1 over a socketpair."""

    def __init__(self, *, max_batch: int = 4096, gate: threading.Event | None = None):
        self.client_sock, self.sock = socket.socketpair()
        self.max_batch, self.gate = max_batch, gate
        self.blobs: dict[bytes, tuple[int, bytes]] = {}
        self.snapshots: dict[bytes, bytes] = {}
        self.config: bytes | None = None
        self.writable = False
        self.locked = False
        self.rids: list[int] = []
        self.frames_read = 0
        self.get_batches: list[int] = []
        self.ids_requested = 0
        self.hello: dict | None = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def session(self, **kw) -> Session:
        return Session(SocketTransport(self.client_sock), **kw)

    def recv(self) -> dict | None:
        head = self.sock.recv(4, socket.MSG_WAITALL)
        if not head:
            return None
        (n,) = struct.unpack(">I", head)
        payload = self.sock.recv(n, socket.MSG_WAITALL)
        if len(payload) < n:
            return None  # the client aborted mid-frame
        msg = msgpack.unpackb(payload, raw=False)
        self.frames_read += 1
        return msg

    def send(self, **msg) -> None:
        payload = msgpack.packb(msg, use_bin_type=True)
        try:
            self.sock.sendall(struct.pack(">I", len(payload)) + payload)
        except OSError:
            pass  # the client went away: carry on with what it sent, as qbackupd does

    def run(self) -> None:
        self.hello = self.recv()
        self.send(op="hello", rid=0, version=1, server="fake/1", max_frame=8 << 20,
                  max_batch=self.max_batch, repo="test")
        if self.gate is not None:
            self.gate.wait()
        while (msg := self.recv()) is not None:
            self.rids.append(msg["rid"])
            op, rid = msg.pop("op"), msg.pop("rid")
            getattr(self, "op_" + op)(rid, **msg)
            if op == "bye":
                break
        self.sock.close()

    def error(self, rid, code, **extra) -> None:
        self.send(op="error", rid=rid, code=code, message=f"fake {code}", **extra)

    def op_init(self, rid, config, pack_size):
        if self.config is not None:
            return self.error(rid, "exists")
        self.config, self.pack_size, self.writable = config, pack_size, True
        self.send(op="ok", rid=rid)

    def op_open(self, rid, write):
        if self.config is None:
            return self.error(rid, "no_repository")
        if write and self.locked:
            return self.error(rid, "locked", holder={"pid": 1})
        self.writable = write
        self.send(op="opened", rid=rid, config=self.config, pack_size=self.pack_size, format=1)

    def op_set_config(self, rid, config, expect):
        if not self.writable:
            return self.error(rid, "read_only")
        if expect != self.config:
            return self.error(rid, "conflict")
        self.config = config
        self.send(op="ok", rid=rid)

    def op_have(self, rid, ids):
        self.send(op="have", rid=rid, missing=[i for i, x in enumerate(ids) if x not in self.blobs])

    def op_put(self, rid, id, type, data, refs=()):
        if not self.writable:
            return self.error(rid, "read_only")
        stored = id not in self.blobs
        self.blobs.setdefault(id, (type, data))
        self.send(op="ok", rid=rid, stored=stored)

    def op_flush(self, rid):
        self.send(op="ok", rid=rid)

    def op_commit(self, rid, id, data, refs):
        missing = [r for r in refs if r not in self.blobs]
        if missing:
            return self.error(rid, "missing_refs", ids=missing[:64])
        if id in self.snapshots:
            return self.error(rid, "exists")
        self.snapshots[id] = data
        self.send(op="ok", rid=rid)

    def op_list(self, rid):
        self.send(op="list", rid=rid, snapshots=[
            {"id": k, "size": len(v), "time": 1700000000} for k, v in self.snapshots.items()])

    def op_get_snapshot(self, rid, id):
        if id not in self.snapshots:
            return self.error(rid, "not_found")
        self.send(op="snapshot", rid=rid, id=id, data=self.snapshots[id], refs=[])

    def op_get(self, rid, ids):
        self.get_batches.append(len(ids))
        self.ids_requested += len(ids)
        for x in ids:
            if x in self.blobs:
                type_, data = self.blobs[x]
                self.send(op="blob", rid=rid, id=x, type=type_, data=data)
            else:
                self.send(op="missing", rid=rid, id=x)
        self.send(op="done", rid=rid)

    def op_delete_snapshot(self, rid, id):
        if self.snapshots.pop(id, None) is None:
            return self.error(rid, "not_found")
        self.send(op="ok", rid=rid)

    def op_stats(self, rid):
        self.send(op="stats", rid=rid, packs=1, blobs=len(self.blobs), bytes=sum(
            len(d) for _, d in self.blobs.values()), snapshots=len(self.snapshots), pack_bytes=0,
            fs_size=1 << 30, fs_free=1 << 29)

    def op_bye(self, rid):
        self.send(op="bye", rid=rid, status="ok")


def test_every_operation_round_trip():
    d = FakeDaemon()
    s = within(d.session)
    assert d.hello == {"op": "hello", "rid": 0, "versions": [1, 2, 3], "client": "qbackup/0.1.0"}
    s.init(b"cfg1", 64 << 20)
    assert s.open(True) == (b"cfg1", 64 << 20)
    s.set_config(b"cfg2", b"cfg1")
    assert s.open(False) == (b"cfg2", 64 << 20)
    s.open(True)
    assert s.put(ident(1), 1, b"one").result(TIMEOUT) is True
    assert s.put(ident(1), 1, b"one").result(TIMEOUT) is False
    assert s.put(ident(2), 2, b"tree", [ident(1)]).result(TIMEOUT) is True
    assert s.have([ident(0), ident(1), ident(2), ident(3)]).result(TIMEOUT) == [0, 3]
    assert s.have([]).result(TIMEOUT) == []
    s.flush()
    s.commit(ident(100), b"snap", [ident(2)])
    assert s.list() == [(ident(100), 4, 1700000000)]
    assert s.get_snapshot(ident(100)) == b"snap"
    assert s.stats() == {"packs": 1, "blobs": 2, "bytes": 7, "snapshots": 1, "pack_bytes": 0,
                         "fs_size": 1 << 30, "fs_free": 1 << 29}
    assert list(s.get([ident(2), ident(9), ident(1)])) == [
        (ident(2), 2, b"tree"), (ident(9), None, None), (ident(1), 1, b"one")]
    assert list(s.get([])) == []
    s.delete_snapshot(ident(100))
    assert s.list() == []
    within(s.close)
    assert d.rids == sorted(set(d.rids)) and d.rids[0] == 1
    with pytest.raises(QbackupError, match="session is closed"):
        s.stats()
    s.close()  # idempotent


def test_error_frames_map_to_remote_error_and_session_goes_on():
    d = FakeDaemon()
    s = within(d.session)
    with pytest.raises(RemoteError) as err:
        s.open(True)
    assert err.value.code == "no_repository"
    s.init(b"cfg", 8 << 20)
    with pytest.raises(RemoteError, match="exists"):
        s.init(b"cfg", 8 << 20)
    with pytest.raises(RemoteError, match="conflict"):
        s.set_config(b"new", b"not the old one")
    with pytest.raises(RemoteError) as err:
        s.get_snapshot(ident(5))
    assert (err.value.code, err.value.message) == ("not_found", "fake not_found")
    with pytest.raises(RemoteError, match="missing_refs"):
        s.commit(ident(5), b"x", [ident(6)])
    s.put(ident(6), 1, b"six").result(TIMEOUT)
    s.commit(ident(5), b"x", [ident(6)])
    with pytest.raises(RemoteError, match="exists"):
        s.commit(ident(5), b"x", [ident(6)])
    with pytest.raises(RemoteError, match="not_found"):
        s.delete_snapshot(ident(7))
    s.open(False)
    with pytest.raises(RemoteError, match="read_only"):
        s.put(ident(8), 1, b"x").result(TIMEOUT)
    d.locked = True
    with pytest.raises(RemoteError) as err:
        s.open(True)
    assert err.value.code == "locked"
    assert s.stats()["blobs"] == 1
    within(s.close)


def test_open_waits_for_a_lock_that_is_released():
    d = FakeDaemon()
    s = within(d.session)
    s.init(b"cfg", 8 << 20)
    d.locked = True
    threading.Timer(0.5, lambda: setattr(d, "locked", False)).start()
    assert within(s.open, True, lock_wait=10) == (b"cfg", 8 << 20)
    d.locked = True
    started = time.monotonic()
    with pytest.raises(RemoteError) as err:
        within(s.open, True, lock_wait=0.3)
    assert err.value.code == "locked" and time.monotonic() - started >= 0.3
    within(s.close)


def test_pipelined_puts_from_several_threads():
    d = FakeDaemon()
    s = within(d.session)
    s.init(b"cfg", 8 << 20)

    def worker(t: int) -> list[bool]:
        futures = [s.put(ident(t * 1000 + i), 1, os.urandom(100) * (i % 7)) for i in range(250)]
        return [f.result(TIMEOUT) for f in futures]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(worker, range(4)))
    assert all(all(r) for r in results)
    assert len(d.blobs) == 1000
    assert d.rids == sorted(set(d.rids))      # written in rid order, none lost
    within(s.close)


def test_senders_block_while_too_much_request_data_is_unanswered():
    gate = threading.Event()
    d = FakeDaemon(gate=gate)
    s = within(d.session, max_in_flight_bytes=50_000)
    sent = []

    def sender():
        for i in range(20):
            sent.append(s.put(ident(i), 1, bytes(10_000)))

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    wait_until(lambda: len(sent) == 4, "4 puts to be sent")
    time.sleep(0.3)  # a broken bound would let more through meanwhile
    assert len(sent) == 4 and t.is_alive()
    d.writable = True
    gate.set()
    t.join(TIMEOUT)
    assert [f.result(TIMEOUT) for f in sent] == [True] * 20
    within(s.close)


def test_puts_return_while_the_sender_thread_is_blocked_writing():
    """Callers only queue their frames: with the daemon reading nothing (the
    socket buffers full, the sender thread stuck in its write), puts within
    the in-flight budget still return at once, and all are answered later
    in order."""
    gate = threading.Event()
    d = FakeDaemon(gate=gate)
    s = within(d.session, max_in_flight_bytes=64 << 20)
    futures = within(lambda: [s.put(ident(i), 1, bytes([i]) * (256 << 10)) for i in range(40)])
    time.sleep(0.1)
    assert d.frames_read == 1 and not any(f.done() for f in futures)  # only hello was read
    d.writable = True
    gate.set()
    assert [f.result(TIMEOUT) for f in futures] == [True] * 40
    assert d.rids == list(range(1, 41))
    within(s.close)


def test_a_failed_write_fails_every_queued_call():
    """The sender thread's write fails: every call queued fails with one
    error, later calls raise it at once, and close() still returns."""
    class BreakingTransport(SocketTransport):
        broken = False

        def write(self, data: bytes) -> None:
            if self.broken:
                raise OSError(32, "Broken pipe")
            super().write(data)

    d = FakeDaemon(gate=threading.Event())
    transport = BreakingTransport(d.client_sock)
    s = within(Session, transport)
    transport.broken = True
    futures = [s.put(ident(i), 1, bytes(1000)) for i in range(8)]
    for f in futures:
        with pytest.raises(ProtocolError, match="cannot send to the daemon: .*Broken pipe"):
            f.result(TIMEOUT)
    with pytest.raises(ProtocolError, match="Broken pipe"):
        s.put(ident(99), 1, b"x")
    within(s.close)


def test_abort_wakes_the_sender_blocked_in_its_write():
    """A daemon that stopped reading, then an abort (Ctrl-C elsewhere): the
    sender thread's blocked write is woken, every call fails, close() ends."""
    d = FakeDaemon(gate=threading.Event())
    s = within(d.session, max_in_flight_bytes=64 << 20)
    futures = within(lambda: [s.put(ident(i), 1, bytes(256 << 10)) for i in range(40)])
    time.sleep(0.1)
    within(s.abort, "backup interrupted")
    for f in futures:
        with pytest.raises(QbackupError, match="backup interrupted"):
            f.result(TIMEOUT)
    within(s.close)
    assert not s._sender.is_alive()


def test_abort_still_writes_the_frames_already_queued():
    """Ctrl-C during a backup: the calls fail at once, but the frames the
    callers had queued still reach the daemon (an interrupted backup's
    re-run then reuses those chunks); nothing queued after the abort."""
    d = FakeDaemon()
    transport = SocketTransport(d.client_sock)
    s = within(Session, transport)
    d.writable = True
    held = threading.Event()
    real_write = transport.write

    def first_write_waits(data: bytes) -> None:
        held.wait(TIMEOUT)
        transport.write = real_write
        real_write(data)
    transport.write = first_write_waits
    futures = [s.put(ident(i), 1, bytes([i]) * 1000) for i in range(10)]
    aborting = threading.Thread(target=s.abort, args=("backup interrupted",), daemon=True)
    aborting.start()
    wait_until(lambda: s._error is not None, "the abort to start")
    with pytest.raises(QbackupError, match="backup interrupted"):
        s.put(ident(99), 1, b"late")
    held.set()
    aborting.join(TIMEOUT)
    assert not aborting.is_alive()
    for f in futures:
        with pytest.raises(QbackupError, match="backup interrupted"):
            f.result(TIMEOUT)
    d.thread.join(TIMEOUT)
    assert set(d.blobs) == {ident(i) for i in range(10)}
    within(s.close)


def test_small_frames_are_joined_into_few_writes():
    """The sender joins queued frames (up to WRITE_COALESCE bytes) into one
    write: a burst of small requests does not cost a write each, and large
    frames are not copied into larger writes."""
    from qbackup import proto

    class CountingTransport(SocketTransport):
        writes = 0
        sizes: list[int] = []

        def write(self, data: bytes) -> None:
            self.writes += 1
            self.sizes.append(len(data))
            super().write(data)

    gate = threading.Event()
    d = FakeDaemon(gate=gate)
    transport = CountingTransport(d.client_sock)
    s = within(Session, transport)
    d.writable = True
    held = threading.Event()
    real_write = transport.write

    def first_write_waits(data: bytes) -> None:  # the burst queues up behind it
        held.wait(TIMEOUT)
        transport.write = real_write
        real_write(data)
    transport.write = first_write_waits
    futures = [s.put(ident(i), 1, bytes(100)) for i in range(200)]
    big = [s.put(ident(1000 + i), 1, bytes([i]) * (200 << 10)) for i in range(4)]
    held.set()
    gate.set()
    assert [f.result(TIMEOUT) for f in futures + big] == [True] * 204
    # 204 frames in a handful of writes (the small ones joined; exactly how
    # many depends on what was queued when the sender looked), and no write
    # joins two large frames (that would pass WRITE_COALESCE)
    assert transport.writes < 10
    assert max(transport.sizes) < proto.WRITE_COALESCE
    within(s.close)


def test_get_streams_in_order_within_window():
    d = FakeDaemon()
    s = within(d.session)
    s.init(b"cfg", 8 << 20)
    ids = [ident(i) for i in range(3000)]
    for i, x in enumerate(ids):
        if i % 3:
            s.put(x, 1 + i % 2, x[:i % 50])
    s.flush()
    window = 8

    def consume():
        for k, (x, type_, data) in enumerate(s.get(ids, window=window), 1):
            assert d.ids_requested <= k - 1 + window
            i = k - 1
            assert x == ids[i]
            assert (type_, data) == ((None, None) if i % 3 == 0 else (1 + i % 2, x[:i % 50]))
        return k

    assert within(consume) == 3000
    assert max(d.get_batches) <= window and sum(d.get_batches) == 3000
    within(s.close)


def test_get_batches_respect_daemon_max_batch():
    d = FakeDaemon(max_batch=1024)
    s = within(d.session)
    s.init(b"cfg", 8 << 20)
    ids = [ident(i) for i in range(3000)]
    assert within(lambda: [x for x, _, _ in s.get(ids, window=2048)]) == ids
    assert max(d.get_batches) == 1024
    with pytest.raises(ValueError, match="over the limit of 1024"):
        s.have(ids[:1025])
    within(s.close)


def test_closing_a_get_generator_early_keeps_the_session_usable():
    d = FakeDaemon()
    s = within(d.session)
    s.init(b"cfg", 8 << 20)
    for i in range(100):
        s.put(ident(i), 1, b"%d" % i)
    gen = s.get((ident(i) for i in range(100)), window=16)
    assert [next(gen)[2] for _ in range(5)] == [b"0", b"1", b"2", b"3", b"4"]
    gen.close()
    for _, _, data in s.get([ident(i) for i in range(50, 60)], window=4):
        if data == b"52":
            break          # abandoned again, through a for loop
    assert within(lambda: [data for _, _, data in s.get([ident(7), ident(8)])]) == [b"7", b"8"]
    assert s.stats()["blobs"] == 100
    within(s.close)
    assert d.ids_requested == sum(d.get_batches) >= 2 + 5 + 3


def test_close_is_bye_and_context_manager():
    d = FakeDaemon()
    with within(d.session) as s:
        s.init(b"cfg", 8 << 20)
    d.thread.join(TIMEOUT)
    assert d.rids[-1] == 2 and not d.thread.is_alive()


def test_bad_arguments_are_refused_before_sending():
    d = FakeDaemon()
    s = within(d.session)
    with pytest.raises(ValueError):
        s.put(b"short", 1, b"")
    with pytest.raises(ValueError):
        s.put(ident(1), 256, b"")
    with pytest.raises(ValueError):
        s.put(ident(1), 1, bytes((4 << 20) + (64 << 10) + 1))
    with pytest.raises(ValueError):
        s.have([ident(1), b"x" * 33])
    with pytest.raises(ValueError):
        s.commit(ident(1), bytes((4 << 20) + 1), [])
    with pytest.raises(ValueError):
        s.init(bytes((64 << 10) + 1), 8 << 20)
    with pytest.raises(ValueError):
        s.init(b"cfg", (8 << 20) - 1)
    with pytest.raises(ValueError):
        next(s.get([ident(1)], window=0))
    assert s.stats()["blobs"] == 0 and d.rids == [1]
    within(s.close)


# --- transports -------------------------------------------------------------------

def test_unix_socket_sends_the_qrexec_header(tmp_path):
    path = str(tmp_path / "sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    for source in ("dom0", "other-vm"):
        t = unix_socket(path, "my.repo-1", source=source)
        conn, _ = listener.accept()
        header = conn.recv(256)
        assert header == f"qubes.BackupChunk+my.repo-1 {source}\0".encode()
        t.write(b"ping")
        assert conn.recv(4, socket.MSG_WAITALL) == b"ping"
        conn.sendall(b"pong")
        assert t.read(4) == b"pong"
        t.close_write()
        assert conn.recv(1) == b""
        conn.close()
        assert t.read(4) == b""
        t.close()
    listener.close()


@pytest.mark.parametrize("repo", ["", "-x", ".x", "a..b", "a/b", "a b", "x" * 65, "é", "a\0",
                                  "a+b", "a\n"])
def test_invalid_repository_names_are_refused(tmp_path, repo):
    with pytest.raises(QbackupError, match="invalid repository name"):
        unix_socket(str(tmp_path / "nothing"), repo)


def test_unix_socket_connect_failure_is_one_line(tmp_path):
    with pytest.raises(QbackupError, match="cannot connect to .*nothing"):
        unix_socket(str(tmp_path / "nothing"), "repo")


def test_process_transport_pipes_and_abort():
    t = ProcessTransport(subprocess.Popen(
        ["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0))
    t.write(b"x" * 100_000)
    got = bytearray()
    while len(got) < 100_000:
        got += t.read(100_000 - len(got))
    t.close_write()
    assert bytes(got) == b"x" * 100_000 and t.read(10) == b""
    t.close()
    t = ProcessTransport(subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          bufsize=0))
    reader = threading.Thread(target=t.read, args=(10,), daemon=True)
    reader.start()
    t.abort()                       # wakes the blocked reader
    reader.join(TIMEOUT)
    assert not reader.is_alive()
    t.close()


def test_process_transport_refuses_a_buffered_stdout():
    """A buffered pipe's readinto waits to fill the whole buffer: the session's
    read ahead would then wait for answers the daemon never sends."""
    proc = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        with pytest.raises(ValueError, match="unbuffered stdout"):
            ProcessTransport(proc)
    finally:
        proc.stdin.close()
        proc.wait()
        proc.stdout.close()


def test_process_transport_close_does_not_wait_forever_for_the_process():
    """A backup qube that never ends the qrexec call cannot keep dom0 waiting
    in close() once the session is over."""
    t = ProcessTransport(subprocess.Popen(["sleep", "60"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, bufsize=0))
    t.exit_grace = 0.1
    started = time.monotonic()
    within(t.close)
    assert time.monotonic() - started < 5


def explain(code):
    return None if code == 0 else f"carrier failed with {code}"


def test_process_transport_explains_a_failed_carrier():
    """A process that ends the stream by failing (qrexec-client 125/127) is
    reported by what its exit code means, at a read or at a write."""
    t = ProcessTransport(subprocess.Popen(["sh", "-c", "exit 127"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, bufsize=0), explain)
    with pytest.raises(QbackupError, match="^carrier failed with 127$"):
        t.read(10)
    t.close()
    proc = subprocess.Popen(["sh", "-c", "exec 0<&-; sleep 0.2; exit 125"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    t = ProcessTransport(proc, explain)
    with pytest.raises(QbackupError, match="^carrier failed with 125$"):
        for _ in range(1000):  # until the pipe breaks
            t.write(b"x" * 65536)
    t.close()
    with pytest.raises(QbackupError, match="carrier failed with 125"):
        within(Session, ProcessTransport(subprocess.Popen(
            ["sh", "-c", "exit 125"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            bufsize=0), explain))


def test_process_transport_normal_end_is_not_an_error():
    t = ProcessTransport(subprocess.Popen(["true"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, bufsize=0), explain)
    assert t.read(10) == b""
    t.close()


def test_session_over_a_dead_transport_fails_cleanly():
    a, b = socket.socketpair()
    b.close()
    with pytest.raises(ProtocolError):
        within(Session, SocketTransport(a))
