# SPDX-License-Identifier: GPL-2.0-or-later
"""qbackup.proto against a hostile daemon.

Each test scripts a daemon (a thread on a socketpair) that sends malformed,
oversized, unexpected or missing answers. The client must fail with a
precise ProtocolError (or RemoteError), kill the session for every pending
and later call, and never hang: every client action runs under a timeout,
and daemons that must not be waited for keep their socket open and silent.
"""

import concurrent.futures
import socket
import struct
import threading
import time
import tracemalloc

import msgpack
import pytest

from qbackup.errors import ProtocolError, QbackupError, RemoteError
from qbackup.proto import MAX_OBJECTS, READ_AHEAD, FrameReader, Session, decode_payload
from qbackup.transport import SocketTransport
from hangguard import within

TIMEOUT = 20
ID = [bytes([i]) * 32 for i in range(16)]
HELLO = {"op": "hello", "rid": 0, "version": 1, "server": "evil/1", "max_frame": 8 << 20,
         "max_batch": 4096, "repo": "r"}


def raw(payload: bytes, length: int | None = None) -> bytes:
    return struct.pack(">I", len(payload) if length is None else length) + payload


def frame(**msg) -> bytes:
    return raw(msgpack.packb(msg, use_bin_type=True))




class EvilDaemon:
    """Reads the client's hello, sends `hello` (raw bytes), runs `script`, then
    holds the connection open and silent until the test ends."""

    def __init__(self, hello: bytes, script=None):
        self.client, self.sock = socket.socketpair()
        self.stop = threading.Event()
        self.script = script
        self.thread = threading.Thread(target=self.run, args=(hello,), daemon=True)
        self.thread.start()

    def run(self, hello: bytes) -> None:
        try:
            self.recv()
            self.sock.sendall(hello)
            if self.script is not None:
                self.script(self)
            self.stop.wait(TIMEOUT)
        except OSError:
            pass  # the client aborted the connection
        finally:
            self.sock.close()

    def recv(self) -> dict | None:
        head = self.sock.recv(4, socket.MSG_WAITALL)
        if len(head) < 4:
            return None
        (n,) = struct.unpack(">I", head)
        return msgpack.unpackb(self.sock.recv(n, socket.MSG_WAITALL), raw=False)

    def session(self, **kw) -> Session:
        return within(Session, SocketTransport(self.client), **kw)


@pytest.fixture
def evil():
    daemons = []

    def make(hello=frame(**HELLO), script=None) -> EvilDaemon:
        daemons.append(EvilDaemon(hello, script))
        return daemons[-1]
    yield make
    for d in daemons:
        d.stop.set()
        d.client.close()


# --- bad frames and bad hellos: the constructor fails ---------------------------

def dup_key_map() -> bytes:
    return b"\x83\xa2op\xa5hello\xa3rid\x00\xa2op\xa5hello"


BAD_HELLOS = [
    (raw(b"", 9 << 20), "frame length 9437184 outside 1..8388608"),
    (raw(b"", 0xFFFFFFFF), "frame length 4294967295 outside"),
    (raw(b""), "frame length 0 outside"),
    (raw(b"\xc1"), "invalid msgpack"),
    (raw(msgpack.packb([1, 2])), "msgpack list, not a map"),
    (raw(msgpack.packb(HELLO) + b"\x00"), "trailing bytes"),
    (raw(msgpack.packb({1: 2})), "invalid msgpack.*not allowed for map key"),
    (raw(msgpack.packb({b"op": "hello", b"rid": 0}, use_bin_type=True)), "non-string key"),
    (raw(dup_key_map()), "duplicate key"),
    (raw(msgpack.packb({**HELLO, "server": msgpack.ExtType(5, b"x")})), "invalid msgpack.*ext"),
    (raw(msgpack.packb({**HELLO, "server": msgpack.Timestamp(1)})), "invalid msgpack.*ext"),
    (raw(b"\x91" * 100_000 + b"\xc0"), "invalid msgpack"),
    (raw(msgpack.packb({"rid": 0})), "without a string 'op'"),
    (raw(msgpack.packb({"op": 1, "rid": 0})), "without a string 'op'"),
    (raw(msgpack.packb({"op": "hello"})), "without a string 'op' and a 'rid'"),
    (frame(**{**HELLO, "version": 4}), "protocol version 4"),
    (frame(**{**HELLO, "version": 0}), "protocol version 0"),
    (frame(**{**HELLO, "max_frame": 1 << 40}), "max_frame' value 1099511627776 outside"),
    (frame(**{**HELLO, "max_frame": 1024}), "max_frame' value 1024 outside"),
    (frame(**{**HELLO, "max_frame": "8M"}), "max_frame' is str, not int"),
    (frame(**{**HELLO, "max_batch": 0}), "max_batch' value 0 outside"),
    (frame(**{**HELLO, "max_batch": 1023}), "max_batch' value 1023 outside"),
    (frame(**{**HELLO, "max_batch": True}), "max_batch' is bool"),
    (frame(**{**HELLO, "rid": 1}), "rid other than 0"),
    (frame(**{**HELLO, "extra": 1}), "unknown fields: extra"),
    (frame(**{k: v for k, v in HELLO.items() if k != "server"}), "missing .*fields: server"),
    (frame(**{**HELLO, "repo": b"r"}), "repo' is bytes, not str"),
    (frame(op="ok", rid=0), "expected 'hello', got 'ok'"),
    (b"\x00\x00", "connection closed mid-frame"),
    (raw(b"x" * 10, 100), "connection closed mid-frame"),
]


@pytest.mark.parametrize("hello, match", BAD_HELLOS)
def test_bad_hello_fails_the_constructor(evil, hello, match):
    d = evil(hello, script=lambda d: d.sock.shutdown(socket.SHUT_WR)
             if match.startswith("connection closed") else None)
    with pytest.raises(ProtocolError, match=match):
        d.session()


@pytest.mark.parametrize("length", [(8 << 20) + 1, 0xFFFFFFFF])
def test_oversized_frame_length_is_refused_before_its_body(evil, length):
    """The length is checked before anything else is read (the daemon then
    closes: a client that waited for the body would say so instead)."""
    d = evil(raw(b"", length), script=lambda d: d.sock.shutdown(socket.SHUT_WR))
    with pytest.raises(ProtocolError, match=f"frame length {length} outside 1..8388608"):
        d.session()


def test_eof_before_hello(evil):
    d = evil(b"", script=lambda d: d.sock.shutdown(socket.SHUT_WR))
    with pytest.raises(ProtocolError, match="closed by the daemon before 'hello'"):
        d.session()


@pytest.mark.parametrize("sent", [b"", b"\x00\x00", raw(b"x" * 10, 100)],
                         ids=["nothing", "half-a-header", "half-a-frame"])
def test_silent_hello_is_given_up(evil, sent):
    """A backup qube that never finishes answering hello (it keeps the
    connection open) is given up after the stall timeout, like any other
    answer that does not come."""
    d = evil(sent)
    with pytest.raises(ProtocolError, match="answered nothing for 0.3 s"):
        within(Session, SocketTransport(d.client), stall_timeout=0.3, hang_limit=10)


def test_error_instead_of_hello_is_remote_error(evil):
    d = evil(frame(op="error", rid=None, code="unsupported_version", message="v3 only",
                   versions=[3]))
    with pytest.raises(RemoteError, match="unsupported_version: v3 only"):
        d.session()


def test_object_budget_bounds_decoding_memory():
    # 8M empty maps in 8 MiB: without a budget they would take over 500 MB.
    payload = msgpack.packb({"op": "list", "rid": 1, "snapshots": [[{}] * 100_000] * 80})
    assert len(payload) < 8 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=f"more than {MAX_OBJECTS} msgpack objects"):
            decode_payload(payload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 120 << 20


def test_object_budget_counts_every_array_item():
    """Just over the budget, cheap to decode even without one: refused."""
    decode_payload(msgpack.packb({"op": "list", "rid": 1, "snapshots": [None] * (MAX_OBJECTS - 10)}))
    with pytest.raises(ProtocolError, match=f"more than {MAX_OBJECTS} msgpack objects"):
        decode_payload(msgpack.packb({"op": "list", "rid": 1, "snapshots": [None] * MAX_OBJECTS}))


def test_clamped_max_frame_still_refuses_bigger_frames(evil):
    d = evil(frame(**{**HELLO, "max_frame": 16 << 20}),
             script=lambda d: (d.recv(), d.sock.sendall(raw(b"", 9 << 20))))
    s = d.session()
    assert s.max_frame == 8 << 20
    with pytest.raises(ProtocolError, match="frame length 9437184 outside 1..8388608"):
        within(s.stats)


# --- bad answers: the call fails and the session is dead -----------------------

def answer(**msg):
    """An answer echoing the request's rid."""
    return lambda req: frame(rid=req["rid"], **msg)


STATS = {"packs": 1, "blobs": 2, "bytes": 3, "snapshots": 4, "pack_bytes": 5, "fs_size": 7,
         "fs_free": 6}


def stream(*frames):
    return lambda req: b"".join(f(req) for f in frames)


def blob(i, **over):
    return answer(**{"op": "blob", "id": ID[i], "type": 1, "data": b"d", **over})


def stats(s):
    return s.stats()


def have4(s):
    return s.have(ID[:4]).result(TIMEOUT)


def get3(s):
    return list(s.get(ID[:3]))


BAD_ANSWERS = [
    (stats, lambda req: frame(op="stats", rid=7, **STATS), "rid 7 while awaiting stats \\(rid 1\\)"),
    (stats, lambda req: frame(op="stats", rid="1", **STATS), "rid str while awaiting stats"),
    (stats, lambda req: frame(op="stats", rid=None, **STATS), "rid NoneType while"),
    (stats, answer(op="list", snapshots=[]), "bad answer to stats \\(rid 1\\): expected 'stats', "
     "got 'list'"),
    (stats, answer(op="stats", **{**STATS, "blobs": True}), "'stats.blobs' is bool, not int"),
    (stats, answer(op="stats", **{**STATS, "blobs": -1}), "'stats.blobs' value -1 outside"),
    (stats, answer(op="stats", **{**STATS, "blobs": 1.0}), "'stats.blobs' is float"),
    (stats, answer(op="stats", **STATS, more=1), "unknown fields: more"),
    (stats, answer(op="stats", packs=1), "missing or unknown fields"),
    (stats, answer(op="\x1b[2J" * 20, **STATS), "got '\\?\\[2J"),
    (lambda s: s.open(True), answer(op="opened", config="c", pack_size=8 << 20, format=1),
     "'opened.config' is str, not bin"),
    (lambda s: s.open(True), answer(op="opened", config=b"c" * 70000, pack_size=8 << 20,
                                    format=1), "has 70000 bytes, over 65536"),
    (lambda s: s.open(True), answer(op="opened", config=b"c", pack_size=1, format=1),
     "'opened.pack_size' value 1 outside"),
    (lambda s: s.open(True), answer(op="opened", config=b"c", pack_size=8 << 20, format=2),
     "'opened.format' value 2 outside"),
    (lambda s: s.put(ID[1], 1, b"x").result(TIMEOUT), answer(op="ok"), "missing .*: stored"),
    (lambda s: s.put(ID[1], 1, b"x").result(TIMEOUT), answer(op="ok", stored=1),
     "'ok.stored' is int, not bool"),
    (lambda s: s.flush(), answer(op="ok", stored=True), "unknown fields: stored"),
    (have4, answer(op="have", missing=[4]), "'have.missing\\[0\\]' value 4 outside 0..3"),
    (have4, answer(op="have", missing=[-1]), "value -1 outside 0..3"),
    (have4, answer(op="have", missing=[2, 1]), "not strictly ascending"),
    (have4, answer(op="have", missing=[1, 1]), "not strictly ascending"),
    (have4, answer(op="have", missing=[0, 1, 2, 3, 3]), "at most 4 indexes"),
    (have4, answer(op="have", missing={}), "not an array"),
    (lambda s: s.list(), answer(op="list", snapshots={}), "'list.snapshots' is dict, not array"),
    (lambda s: s.list(), answer(op="list", snapshots=[1]), "snapshots\\[0\\] is not a map"),
    (lambda s: s.list(), answer(op="list", snapshots=[{"id": ID[1][:31], "size": 1, "time": 0}]),
     "'list.snapshots\\[0\\].id' is not a 32-byte id"),
    (lambda s: s.list(), answer(op="list", snapshots=[{"id": ID[1], "size": -1, "time": 0}]),
     "size' value -1 outside"),
    (lambda s: s.list(), answer(op="list", snapshots=[{"id": ID[1], "size": 1, "time": 0,
                                                       "x": 0}]), "unknown fields: x"),
    (lambda s: s.list(), answer(op="list", snapshots=[{"id": ID[1], "size": 1, "time": 0}] * 2),
     "names a snapshot twice"),
    (lambda s: s.get_snapshot(ID[1]), answer(op="snapshot", id=ID[2], data=b"", refs=[]),
     "snapshot answer for another id"),
    (lambda s: s.get_snapshot(ID[1]), answer(op="snapshot", id=ID[1], data=b"", refs=[b"x"]),
     "'snapshot.refs\\[0\\]' is not a 32-byte id"),
    (lambda s: s.get_snapshot(ID[1]), answer(op="snapshot", id=ID[1],
                                             data=bytes((4 << 20) + 1), refs=[]),
     "has 4194305 bytes, over 4194304"),
    (get3, stream(blob(0), blob(2), blob(1), answer(op="done")),
     "answer 1 is for id 0202020202020202, not the id asked"),
    (get3, stream(blob(5)), "answer 0 is for id 05050505"),
    (get3, stream(blob(0), blob(1), blob(2), blob(3), answer(op="done")),
     "more answers than the 3 ids asked"),
    (get3, stream(blob(0), blob(1), answer(op="done")), "'done' after 2 of 3 ids"),
    (get3, stream(blob(0, id=ID[0][:31])), "'blob.id' is not a 32-byte id"),
    (get3, stream(blob(0, type=256)), "'blob.type' value 256 outside 0..255"),
    (get3, stream(blob(0, data="str")), "'blob.data' is str, not bin"),
    (get3, stream(blob(0, data=bytes((4 << 20) + (64 << 10) + 1))), "over 4259840"),
    (lambda s: list(s.get(ID[:3], max_size=100)), stream(blob(0, data=bytes(101))),
     "'blob.data' has 101 bytes, over 100"),
    (get3, stream(answer(op="missing", id=ID[0], type=1)), "unknown fields: type"),
    (get3, stream(answer(op="ok")), "unexpected 'ok' frame"),
    (get3, stream(answer(op="done", extra=1)), "unknown fields: extra"),
]


HELLO2 = {**HELLO, "version": 2}
GC = {"dry_run": False, "snapshots": 1, "live_blobs": 2, "packs_deleted": 0, "packs_repacked": 0,
      "packs_written": 0, "packs_kept": 1, "bytes_copied": 0, "bytes_freed": -5}
CHECK = {"problems": [], "problems_total": 0, "damaged": [], "damaged_total": 0,
         "bad_snapshots": [], "affected": [], "affected_total": 0, "complete": True}
USAGE = {"snapshots": [[ID[1], 2, 300]], "shared_blobs": 0, "shared_bytes": 0,
         "unreferenced_blobs": 0, "unreferenced_bytes": 0, "missing": 0, "unreadable": 0}


def progress(**over):
    return answer(**{"op": "progress", "phase": "mark", "done": 1, "total": 0, **over})


def gc(s):
    return s.gc()


def check(s):
    return s.check(read_data=True)


def usage(s):
    return s.usage()


BAD_V2_ANSWERS = [
    (lambda s: s.delete_snapshots(ID[:2]), answer(op="ok", stored=True), "unknown fields: stored"),
    (lambda s: s.delete_snapshots(ID[:2]), answer(op="gc", **GC), "expected 'ok', got 'gc'"),
    (gc, answer(op="gc", **{**GC, "packs_deleted": -1}), "'gc.packs_deleted' value -1 outside"),
    (gc, answer(op="gc", **{**GC, "dry_run": 0}), "'gc.dry_run' is int, not bool"),
    (gc, answer(op="gc", **{**GC, "bytes_freed": -(1 << 63)}), "'gc.bytes_freed' value -9223372036854775808 outside"),
    (gc, answer(op="gc", **GC, extra=1), "unknown fields: extra"),
    (gc, stream(progress(phase="x" * 33)), "'progress.phase' has 33 characters, over 32"),
    (gc, stream(progress(done=-1)), "'progress.done' value -1 outside"),
    (gc, stream(progress(total="all")), "'progress.total' is str, not int"),
    (gc, lambda req: frame(op="progress", rid=9, phase="mark", done=1, total=0), "rid 9 while awaiting gc"),
    (gc, stream(progress(extra=True)), "unknown fields: extra"),
    (gc, stream(progress(), answer(op="usage", **USAGE)), "expected 'gc', got 'usage'"),
    (usage, stream(progress(), progress(), answer(op="usage", **{**USAGE, "snapshots": [[ID[1], 2]]})),
     "usage.snapshots\\[0\\] is not \\[id, blobs, bytes\\]"),
    (usage, answer(op="usage", **{**USAGE, "snapshots": [{"id": ID[1]}]}), "is not \\[id, blobs"),
    (usage, answer(op="usage", **{**USAGE, "snapshots": [[ID[1][:31], 2, 3]]}),
     "'usage.snapshots\\[0\\].id' is not a 32-byte id"),
    (usage, answer(op="usage", **{**USAGE, "snapshots": [[ID[1], -2, 3]]}),
     "'usage.snapshots\\[0\\].blobs' value -2 outside"),
    (usage, answer(op="usage", **{**USAGE, "snapshots": [[ID[1], 2, 3]] * 2}), "names a snapshot twice"),
    (usage, answer(op="usage", **{**USAGE, "snapshots": {}}), "'usage.snapshots' is dict, not array"),
    (usage, answer(op="usage", **{**USAGE, "missing": True}), "'usage.missing' is bool"),
    (check, answer(op="check", **{**CHECK, "problems": ["x"] * 101, "problems_total": 101}),
     "check answer lists more than it may"),
    (check, answer(op="check", **{**CHECK, "problems": ["x" * 301], "problems_total": 1}),
     "'check.problems\\[0\\]' has 301 characters, over 300"),
    (check, answer(op="check", **{**CHECK, "problems": [b"x"], "problems_total": 1}),
     "'check.problems\\[0\\]' is bytes, not str"),
    (check, answer(op="check", **{**CHECK, "problems": ["x"]}), "counts fewer than it lists"),
    (check, answer(op="check", **{**CHECK, "damaged": [ID[1]]}), "counts fewer than it lists"),
    (check, answer(op="check", **{**CHECK, "damaged": [ID[1]] * 4097, "damaged_total": 4097}),
     "'check.damaged' has 4097 ids, over 4096"),
    (check, answer(op="check", **{**CHECK, "damaged": [b"short"], "damaged_total": 1}),
     "'check.damaged\\[0\\]' is not a 32-byte id"),
    (check, answer(op="check", **{**CHECK, "bad_snapshots": [1]}),
     "'check.bad_snapshots\\[0\\]' is not a 32-byte id"),
    (check, answer(op="check", **{**CHECK, "affected": [[ID[1], []]], "affected_total": 1}),
     "check.affected\\[0\\] is not a map"),
    (check, answer(op="check", **{**CHECK, "affected": [{"id": ID[1]}], "affected_total": 1}),
     "'check.affected\\[0\\]' with missing or unknown fields: roots"),
    (check, answer(op="check", **{**CHECK, "affected": [{"id": ID[1], "roots": [ID[2]] * 1025}],
                                  "affected_total": 1}), "'check.affected\\[0\\].roots' has 1025 ids"),
    (check, answer(op="check", **{**CHECK, "affected": [{"id": ID[1], "roots": []}]}),
     "counts fewer than it lists"),
    (check, answer(op="check", **{**CHECK, "complete": 1}), "'check.complete' is int, not bool"),
]


HELLO3 = {**HELLO, "version": 3}


def locate2(s):
    return s.locate(ID[:2]).result(TIMEOUT)


BAD_V3_ANSWERS = [
    (locate2, answer(op="locate", keys=[1]), "locate answer has 1 keys for 2 ids"),
    (locate2, answer(op="locate", keys=[1, 2, 3]), "locate answer has 3 keys for 2 ids"),
    (locate2, answer(op="locate", keys=[]), "locate answer has 0 keys for 2 ids"),
    (locate2, answer(op="locate", keys={"0": 2}), "'locate.keys' is dict, not array"),
    (locate2, answer(op="locate", keys=b"\x01\x02"), "'locate.keys' is bytes, not array"),
    (locate2, answer(op="locate", keys=[1, "2"]), "'locate.keys\\[1\\]' is str, not int"),
    (locate2, answer(op="locate", keys=[True, 1]), "'locate.keys\\[0\\]' is bool, not int"),
    (locate2, answer(op="locate", keys=[1.0, 1]), "'locate.keys\\[0\\]' is float, not int"),
    (locate2, answer(op="locate", keys=[None, 1]), "'locate.keys\\[0\\]' is NoneType, not int"),
    (locate2, answer(op="locate", keys=[ID[0], 1]), "'locate.keys\\[0\\]' is bytes, not int"),
    (locate2, answer(op="locate", keys=[[1], 1]), "'locate.keys\\[0\\]' is list, not int"),
    (locate2, answer(op="locate", keys=[0, -1]), "'locate.keys\\[1\\]' value -1 outside 0..9223372036854775807"),
    (locate2, answer(op="locate", keys=[1 << 63, 0]), "value 9223372036854775808 outside"),
    (locate2, answer(op="locate", keys=[1, 2], extra=0), "unknown fields: extra"),
    (locate2, answer(op="locate"), "missing or unknown fields: keys"),
    (locate2, answer(op="have", missing=[]), "expected 'locate', got 'have'"),
    (locate2, lambda req: frame(op="locate", rid=req["rid"] + 1, keys=[1, 2]),
     "'locate' frame with rid 2 while awaiting locate \\(rid 1\\)"),
    (locate2, answer(op="error", code="io", message="disk"),
     "locate \\(rid 1\\) answered by an error: backup qube error io: disk"),
    (locate2, answer(op="error", code="not_found", message="x"), "locate \\(rid 1\\) answered by an error"),
    (locate2, answer(op="error", code=5, message="x"), "'error.code' is int, not str"),
]


@pytest.mark.parametrize("hello, call, bad, match",
                         [(HELLO, *case) for case in BAD_ANSWERS] + [(HELLO2, *case) for case in BAD_V2_ANSWERS]
                         + [(HELLO3, *case) for case in BAD_V3_ANSWERS])
def test_bad_answer_kills_the_session(evil, hello, call, bad, match):
    """Version 1's answers, then version 2's (gc, check, usage, delete_snapshots,
    progress frames) and version 3's (locate: its keys decide only an order,
    but a wrong count or a key out of range is a broken daemon) from a
    daemon that negotiated them."""
    d = evil(hello=frame(**hello), script=lambda d: d.sock.sendall(bad(d.recv())))
    s = d.session()
    with pytest.raises(ProtocolError, match=match) as first:
        within(call, s)
    with pytest.raises(ProtocolError) as later:
        within(s.stats)
    assert later.value is first.value


def test_get_refuses_a_blob_over_the_callers_bound(evil):
    """verify and restore pass the largest blob a chunk can be sealed into:
    a bigger one is refused as it arrives, so a window of them cannot fill
    dom0's memory."""
    d = evil(script=lambda d: d.sock.sendall(
        stream(blob(0, data=bytes(101)), answer(op="done"))(d.recv())))
    s = d.session()
    with pytest.raises(ProtocolError, match="'blob.data' has 101 bytes, over 100"):
        within(lambda: list(s.get(ID[:1], max_size=100)))


def test_get_yields_valid_answers_before_the_violation(evil):
    bad = stream(blob(0), answer(op="missing", id=ID[1]), blob(9))
    d = evil(script=lambda d: d.sock.sendall(bad(d.recv())))
    s = d.session()
    gen = s.get(ID[:3])
    assert within(next, gen) == (ID[0], 1, b"d")
    assert within(next, gen) == (ID[1], None, None)
    with pytest.raises(ProtocolError, match="answer 2 is for id 0909"):
        within(next, gen)


def test_unsolicited_frame_kills_the_session(evil):
    aborted = threading.Event()

    def script(d):
        d.sock.sendall(frame(op="ok", rid=5))
        d.recv()           # returns when the client aborts the connection
        aborted.set()
    d = evil(script=script)
    s = d.session()
    assert aborted.wait(TIMEOUT)
    with pytest.raises(ProtocolError, match="unexpected 'ok' frame: no request outstanding"):
        within(s.stats)


# --- EOF and silence --------------------------------------------------------------

def test_eof_mid_stream_fails_everything_pending(evil):
    def script(d):
        get = d.recv()
        d.sock.sendall(blob(0)(get))
        d.recv()           # the have
        d.sock.sendall(blob(1)(get))
        d.sock.close()
    d = evil(script=script)
    s = d.session()
    gen = s.get(ID[:5])
    assert within(next, gen)[0] == ID[0]       # the get request is on the wire
    pending = s.have(ID[:2])
    assert within(next, gen)[0] == ID[1]
    with pytest.raises(ProtocolError, match="closed by the daemon before answering get"):
        within(next, gen)
    with pytest.raises(ProtocolError, match="closed by the daemon before answering get"):
        pending.result(TIMEOUT)


def test_daemon_that_reads_everything_then_closes(evil):
    def script(d):
        for _ in range(4):
            d.recv()
        d.sock.close()
    d = evil(script=script)
    s = d.session()
    put, have = s.put(ID[1], 1, b"x"), s.have([ID[1]])
    gen = s.get(ID[:8], window=4)
    pool = concurrent.futures.ThreadPoolExecutor(2)
    sync = pool.submit(s.stats)
    got = pool.submit(list, gen)
    for f in (put, have, sync, got):
        with pytest.raises(ProtocolError, match="connection closed by the daemon"):
            f.result(TIMEOUT)
    pool.shutdown()


def test_daemon_that_stalls_is_given_up(evil):
    stalled = threading.Event()

    def script(d):
        d.recv()            # reads the request, never answers, keeps the connection open
        stalled.wait(TIMEOUT)
    d = evil(script=script)
    s = d.session(stall_timeout=0.3)
    time.sleep(0.5)         # idle with nothing due: no timeout
    with pytest.raises(ProtocolError, match="answered nothing for 0.3 s"):
        within(s.stats, hang_limit=10)
    stalled.set()


def test_writer_blocked_on_a_daemon_that_stopped_reading_is_woken(evil):
    def script(d):
        d.sock.recv(4, socket.MSG_WAITALL)   # a put is pending; then stop reading
        d.sock.sendall(frame(op="ok", rid=1, stored="no"))
    d = evil(script=script)
    s = d.session(max_in_flight_bytes=1 << 30)

    def writer():
        for i in range(64):      # 256 MiB: far beyond any socket buffer
            s.put(ID[i % 16], 1, bytes(4 << 20))
    pool = concurrent.futures.ThreadPoolExecutor(1)
    blocked = pool.submit(writer)
    with pytest.raises(ProtocolError, match="'ok.stored' is str, not bool"):
        blocked.result(TIMEOUT)
    pool.shutdown()


def test_close_when_bye_is_not_answered(evil):
    d = evil(script=lambda d: (d.recv(), d.sock.close()))
    s = d.session()
    with pytest.raises(ProtocolError, match="before answering bye"):
        within(s.close)


def test_close_with_a_bad_final_status(evil):
    d = evil(script=lambda d: d.sock.sendall(answer(op="bye", status="disk\nfull")(d.recv())))
    s = d.session()
    with pytest.raises(RemoteError, match="session ended with status disk\\?full"):
        within(s.close)


# --- error frames -----------------------------------------------------------------

def test_error_message_is_sanitized_and_truncated(evil):
    msg = "\x1b[31mred\nsecond line " + "A" * 500
    d = evil(script=lambda d: d.sock.sendall(answer(op="error", code="not_found\x07",
                                                    message=msg)(d.recv())))
    s = d.session()
    with pytest.raises(RemoteError) as err:
        within(s.get_snapshot, ID[1])
    assert err.value.code == "not_found?"
    assert err.value.message.startswith("?[31mred?second line AAA")
    assert len(err.value.message) == 203 and err.value.message.endswith("...")
    assert str(err.value).isprintable()


@pytest.mark.parametrize("bad, match", [
    (answer(op="error", code=5, message="x"), "'error.code' is int, not str"),
    (answer(op="error", code="io", message=b"x"), "'error.message' is bytes, not str"),
    (answer(op="error", message="x"), "'error.code' is NoneType"),
])
def test_malformed_error_frame_is_protocol_error(evil, bad, match):
    d = evil(script=lambda d: d.sock.sendall(bad(d.recv())))
    s = d.session()
    with pytest.raises(ProtocolError, match=match):
        within(s.stats)


def test_error_mid_get_stream_stays_open(evil):
    def script(d):
        get = d.recv()
        d.sock.sendall(blob(0)(get) + answer(op="error", code="io", message="disk")(get))
        d.sock.sendall(answer(op="stats", **STATS)(d.recv()))
    d = evil(script=script)
    s = d.session()
    gen = s.get(ID[:3])
    assert within(next, gen)[0] == ID[0]
    with pytest.raises(RemoteError, match="io: disk"):
        within(next, gen)
    assert within(s.stats) == STATS


@pytest.mark.parametrize("rid", [None, "same"])
def test_closing_or_connection_level_error_kills_the_session(evil, rid):
    def script(d):
        first, _ = d.recv(), d.recv()
        d.sock.sendall(frame(op="error", rid=first["rid"] if rid else None,
                             code="internal" if rid else "forbidden", message="bye"))
    d = evil(script=script)
    s = d.session()
    a, b = s.have([ID[1]]), s.have([ID[2]])
    for f in (a, b):
        with pytest.raises(RemoteError, match="internal: bye" if rid else "forbidden: bye"):
            f.result(TIMEOUT)
    with pytest.raises(RemoteError):
        within(s.stats)


# --- version 2: delete_snapshots, gc, check, usage and their progress frames ----------

def test_version_2_answers_and_progress_pass_checked_and_sanitised(evil):
    answers = iter([stream(progress(phase="m\x1bark", done=5, total=9), answer(op="gc", **GC)),
                    answer(op="check", **{**CHECK, "problems": ["bad\ncrc"], "problems_total": 3,
                                          "affected": [{"id": ID[1], "roots": [ID[2]]}],
                                          "affected_total": 1}),
                    answer(op="usage", **USAGE), answer(op="ok")])

    def script(d):
        for reply in answers:
            d.sock.sendall(reply(d.recv()))
    d = evil(hello=frame(**HELLO2), script=script)
    s = d.session()
    seen = []
    assert within(s.gc, progress=lambda *a: seen.append(a)) == GC
    assert seen == [("m?ark", 5, 9)]
    report = within(s.check)
    assert report["problems"] == ["bad?crc"] and report["affected"] == [(ID[1], [ID[2]])]
    assert within(s.usage)["snapshots"] == [(ID[1], 2, 300)]
    within(s.delete_snapshots, ID[:3])


def test_a_progress_callback_that_fails_does_not_kill_the_session(evil):
    d = evil(hello=frame(**HELLO2), script=lambda d: d.sock.sendall(
        stream(progress(), answer(op="usage", **USAGE))(d.recv())))
    s = d.session()
    assert within(s.usage, progress=lambda *a: 1 / 0)["missing"] == 0


def test_a_version_1_daemon_is_not_asked_version_2_operations(evil):
    """dom0 offers 1 and 2; a daemon answering 1 is never sent delete_snapshots,
    gc, check or usage (it would answer unknown_op): one clear error, no frame."""
    sent = []
    d = evil(script=lambda d: (sent.append(d.recv()), d.sock.sendall(answer(op="stats", **STATS)(sent[0]))))
    s = d.session()
    assert s.version == 1
    for call in (lambda s: s.delete_snapshots(ID[:1]), gc, check, usage, locate2):
        with pytest.raises(QbackupError, match="speaks protocol version 1; '.*' needs version [23]"):
            within(call, s)
    assert within(s.stats) == STATS
    assert sent == [{"op": "stats", "rid": 1}]     # the first request that reached it


def test_locate_unanswered_kills_the_session(evil):
    d = evil(hello=frame(**HELLO3), script=lambda d: (d.recv(), d.sock.shutdown(socket.SHUT_WR)))
    s = d.session()
    with pytest.raises(ProtocolError, match="connection closed by the daemon before answering locate"):
        within(locate2, s)


def test_locate_answers_pass_checked_and_pipelined(evil):
    def script(d):
        first, second = d.recv(), d.recv()
        d.sock.sendall(answer(op="locate", keys=[(1 << 63) - 1, 0])(first) + answer(op="locate", keys=[7])(second))
    d = evil(hello=frame(**HELLO3), script=script)
    s = d.session()
    a, b = s.locate(ID[:2]), s.locate(ID[2:3])
    assert (a.result(TIMEOUT), b.result(TIMEOUT)) == ([(1 << 63) - 1, 0], [7])
    with pytest.raises(ValueError, match="locate: 4097 ids, over the limit of 4096"):
        s.locate([ID[0]] * 4097)


def test_a_version_2_daemon_is_not_asked_to_locate(evil):
    """dom0 offers 1 to 3; a daemon answering 2 is never sent locate: verify
    asks for the chunks in first-seen order, with no frame but its gets."""
    from qbackup.restore import _read_order
    sent = []
    d = evil(hello=frame(**HELLO2), script=lambda d: (sent.append(d.recv()),
                                                      d.sock.sendall(answer(op="stats", **STATS)(sent[0]))))
    s = d.session()
    assert s.version == 2
    with pytest.raises(QbackupError, match="speaks protocol version 2; 'locate' needs version 3"):
        within(s.locate, ID[:1])
    assert within(_read_order, s, ID[5:1:-1]) == ID[5:1:-1]
    assert within(s.stats) == STATS
    assert sent == [{"op": "stats", "rid": 1}]     # the first request that reached it


@pytest.mark.parametrize("ids", [[], [ID[1], ID[1]]])
def test_delete_snapshots_refuses_an_empty_or_repeated_batch(evil, ids):
    d = evil(hello=frame(**HELLO2))
    with pytest.raises(ValueError, match="at least one id, none twice"):
        d.session().delete_snapshots(ids)


class Pieces:
    """A transport that hands out `data` in reads of the sizes `cut` gives
    (cycled), never more than asked: frames split at every possible place."""

    def __init__(self, data: bytes, cut):
        self.data, self.cut, self.reads = memoryview(data), cut, 0

    def read_into(self, view: memoryview) -> int:
        n = min(len(view), len(self.data), self.cut(self.reads))
        view[:n] = self.data[:n]
        self.data = self.data[n:]
        self.reads += 1
        return n


def test_frame_reader_splits_and_joins_frames_wherever_the_reads_fall():
    """Small frames many to a read, frames cut one byte at a time, frames
    around and across the read-ahead size: each comes out whole, in order."""
    msgs = [{"op": "ok", "rid": n, "stored": True} for n in range(300)]
    for size in (1, READ_AHEAD - 40, READ_AHEAD - 20, READ_AHEAD, 3 * READ_AHEAD + 7):
        msgs.append({"op": "blob", "rid": 9, "id": ID[1], "type": 1, "data": b"d" * size})
    msgs += [{"op": "ok", "rid": n, "stored": False} for n in range(50)]
    data = b"".join(frame(**m) for m in msgs)
    for cut in (lambda k: 1 << 30, lambda k: 1, lambda k: (7, 4093, 3, 65536, 5)[k % 5]):
        reader = FrameReader(Pieces(data, cut))
        assert [reader.frame() for _ in msgs] == msgs
        assert reader.frame() is None and reader.frame() is None


@pytest.mark.parametrize("data, error", [
    (b"\x00", "connection closed mid-frame \\(1 of 4 bytes\\)"),
    (frame(op="ok", rid=1) + b"\x00\x00\x00", "connection closed mid-frame \\(3 of 4 bytes\\)"),
    (raw(b"x" * 10, 100), "connection closed mid-frame \\(10 of 100 bytes\\)"),
    (raw(b"x" * 40000, 50000), "connection closed mid-frame \\(40000 of 50000 bytes\\)"),
    (frame(op="ok", rid=1) + raw(b"", 0), "frame length 0 outside"),
    (raw(b"x" * 20, 1 << 31), "frame length 2147483648 outside"),
])
def test_frame_reader_refuses_truncated_and_out_of_bounds_frames(data, error):
    for cut in (lambda k: 1 << 30, lambda k: 1):
        reader = FrameReader(Pieces(data, cut))
        with pytest.raises(ProtocolError, match=error):
            while reader.frame() is not None:
                pass
