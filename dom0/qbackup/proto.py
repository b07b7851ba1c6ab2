# SPDX-License-Identifier: GPL-2.0-or-later
"""Client side of the qbackup wire protocol (docs/PROTOCOL.md, versions 1 to 3).

Written from the protocol document alone; it shares no code with the daemon.
Everything read from the daemon is untrusted: a frame's length is checked
before its payload is read, msgpack is decoded with every limit set (and an
object budget, so a small frame cannot expand into a huge object graph), and
each field is checked for type, length and range before it is used.

Requests are pipelined. Any thread may call: it numbers and encodes its
request and queues the frame, within the in-flight byte budget, and goes on;
one sender thread owns the writing side of the transport, so no caller ever
waits on another's write. One reader thread matches the answers to the
requests in FIFO order (PROTOCOL §3) and resolves their futures. Any protocol
violation kills the session: every pending and later call fails with that
same ProtocolError, and nothing waits forever on a daemon that closed the
connection.
"""

import collections
import itertools
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

import msgpack

from . import threads
from .errors import ProtocolError, QbackupError, RemoteError, sanitize
from .transport import Transport

__all__ = ["ProtocolError", "RemoteError", "Session"]

PROTOCOL_VERSION = 3
# A version-1 daemon serves everything but the later operations; a version-2 one all but locate.
SUPPORTED_VERSIONS = (1, 2, 3)
CLIENT_NAME = "qbackup/0.1.0"
MAX_FRAME = 8 << 20
MAX_BATCH = 4096
# A chunk-map node carries up to 1024 refs: a daemon must take batches that large.
MIN_BATCH = 1024
ID_LEN = 32
MAX_BLOB = (4 << 20) + (64 << 10)
MAX_SNAPSHOT = 4 << 20
MAX_CONFIG = 64 << 10
MAX_COMMIT_REFS = 65536
MIN_PACK_SIZE, MAX_PACK_SIZE = 8 << 20, 512 << 20
# A daemon's max_frame must leave room for the largest blob a put carries.
MIN_FRAME = MAX_BLOB + (64 << 10)
MAX_INT = (1 << 63) - 1
# Arrays, maps and their entries one frame may decode to (the largest
# legitimate answer, a list of 100,000 snapshots, stays below), and map size.
MAX_OBJECTS = 1 << 19
MAX_MAP_LEN = 32
LOCK_RETRY = 0.2   # seconds between open attempts while the repository is locked
# Seconds without any answer, while answers are due, before the session is
# given up. Generous: a backup qube may rebuild a large index on open.
STALL_TIMEOUT = 600.0
READ_SIZE = 1 << 20
READ_AHEAD = 16 << 10  # bytes read at once while small frames come (FrameReader)
WRITE_COALESCE = 256 << 10  # queued frames joined into one write up to this size
SENDER_JOIN = 5.0  # seconds close() waits for the sender thread once the transport is torn down
ABORT_GRACE = 2.0  # seconds abort() lets the sender write the frames already queued
# Bounds of the version-2 answers (PROTOCOL §5): a daemon sending more is broken.
MAX_PROBLEMS, MAX_PROBLEM_CHARS = 100, 300
MAX_DAMAGED = 4096
MAX_AFFECTED, MAX_AFFECTED_ROOTS = 4096, 1024
MAX_SNAPSHOTS = 1 << 17
MAX_PHASE = 32
# Error codes after which the daemon closes the connection (PROTOCOL §6).
CLOSING_CODES = frozenset({"bad_frame", "frame_too_large", "bad_request",
                           "unsupported_version", "forbidden", "internal"})

_HEADER = struct.Struct(">I")


# --- frames -----------------------------------------------------------------

def encode_frame(msg: dict, max_frame: int = MAX_FRAME) -> bytes:
    """One frame: big-endian length, then the msgpack map."""
    payload = msgpack.packb(msg, use_bin_type=True)
    if len(payload) > max_frame:
        raise ValueError(f"{msg.get('op')} request of {len(payload)} bytes exceeds "
                         f"the {max_frame}-byte frame limit")
    return _HEADER.pack(len(payload)) + payload


class FrameReader:
    """Frames from the daemon, read ahead READ_AHEAD bytes at a time: a run of
    small answers (puts', HAVE's) costs one read, not two per frame. A frame
    longer than what is buffered gets its own buffer, the rest of it read
    straight in (at most READ_AHEAD bytes of it are copied)."""

    def __init__(self, transport: Transport):
        self._transport = transport
        self._buf = bytearray(READ_AHEAD)
        self._start = self._end = 0  # buffered, not yet taken: _buf[_start:_end]

    def _fill(self) -> int:
        """Read what comes (at least one byte) after what is buffered; 0 at EOF."""
        if self._start:
            left = bytes(memoryview(self._buf)[self._start:self._end])
            self._buf[:len(left)] = left
            self._start, self._end = 0, len(left)
        k = self._transport.read_into(memoryview(self._buf)[self._end:])
        self._end += k
        return k

    def frame(self, max_frame: int = MAX_FRAME) -> dict | None:
        """The next frame's message (untrusted, only its shape checked); None at EOF."""
        while self._end - self._start < _HEADER.size:
            if not self._fill():
                if self._end == self._start:
                    return None
                raise ProtocolError(f"connection closed mid-frame "
                                    f"({self._end - self._start} of {_HEADER.size} bytes)")
        (untrusted_length,) = _HEADER.unpack_from(self._buf, self._start)
        if not 1 <= untrusted_length <= max_frame:
            raise ProtocolError(f"frame length {untrusted_length} outside 1..{max_frame}")
        self._start += _HEADER.size
        n, got = untrusted_length, self._end - self._start
        if got >= n:
            payload = bytes(memoryview(self._buf)[self._start:self._start + n])
            self._start += n
            return decode_payload(payload, max_frame)
        big = bytearray(n)
        view = memoryview(big)
        view[:got] = memoryview(self._buf)[self._start:self._end]
        self._start = self._end = 0
        while got < n:
            k = self._transport.read_into(view[got:got + READ_SIZE])
            if not k:
                raise ProtocolError(f"connection closed mid-frame ({got} of {n} bytes)")
            got += k
        return decode_payload(big, max_frame)


def decode_payload(untrusted_payload: bytes | bytearray, max_frame: int = MAX_FRAME) -> dict:
    """Decode one frame's payload: exactly one map with str keys 'op' and 'rid'."""
    budget = [MAX_OBJECTS]

    def spend(n: int) -> None:
        budget[0] -= n
        if budget[0] < 0:
            raise ProtocolError(f"frame holds more than {MAX_OBJECTS} msgpack objects")

    def list_hook(items: list) -> list:
        spend(len(items) + 1)
        return items

    def pairs_hook(pairs: list) -> dict:
        spend(len(pairs) + 1)
        untrusted_map = dict(pairs)
        if len(untrusted_map) != len(pairs):
            raise ProtocolError("msgpack map with a duplicate key")
        return untrusted_map

    try:
        untrusted_msg = msgpack.unpackb(
            untrusted_payload, raw=False, strict_map_key=True, use_list=True,
            max_str_len=max_frame, max_bin_len=max_frame, max_array_len=MAX_OBJECTS,
            max_map_len=MAX_MAP_LEN, max_ext_len=0,
            list_hook=list_hook, object_pairs_hook=pairs_hook)
    except msgpack.ExtraData:
        raise ProtocolError("trailing bytes after the msgpack map in a frame") from None
    except (ValueError, TypeError) as exc:
        detail = sanitize(str(exc), 80) or type(exc).__name__
        raise ProtocolError(f"invalid msgpack in frame: {detail}") from None
    if not isinstance(untrusted_msg, dict):
        raise ProtocolError(f"frame holds a msgpack {type(untrusted_msg).__name__}, not a map")
    if not all(isinstance(k, str) for k in untrusted_msg):
        raise ProtocolError("frame map has a non-string key")
    if not isinstance(untrusted_msg.get("op"), str) or "rid" not in untrusted_msg:
        raise ProtocolError("frame without a string 'op' and a 'rid'")
    return untrusted_msg


# --- field validation ---------------------------------------------------------

Check = Callable[[Any, str], Any]


def _fail(name: str, what: str) -> ProtocolError:
    return ProtocolError(f"field '{name}' {what}")


def _int(lo: int, hi: int) -> Check:
    def check(v: Any, name: str) -> int:
        if type(v) is not int:
            raise _fail(name, f"is {type(v).__name__}, not int")
        if not lo <= v <= hi:
            raise _fail(name, f"value {v} outside {lo}..{hi}")
        return v
    return check


def _bin(max_len: int) -> Check:
    def check(v: Any, name: str) -> bytes:
        if type(v) is not bytes:
            raise _fail(name, f"is {type(v).__name__}, not bin")
        if len(v) > max_len:
            raise _fail(name, f"has {len(v)} bytes, over {max_len}")
        return v
    return check


def _str(max_len: int) -> Check:
    def check(v: Any, name: str) -> str:
        if type(v) is not str:
            raise _fail(name, f"is {type(v).__name__}, not str")
        if len(v) > max_len:
            raise _fail(name, f"has {len(v)} characters, over {max_len}")
        return v
    return check


def _bool(v: Any, name: str) -> bool:
    if type(v) is not bool:
        raise _fail(name, f"is {type(v).__name__}, not bool")
    return v


def _id(v: Any, name: str) -> bytes:
    if type(v) is not bytes or len(v) != ID_LEN:
        raise _fail(name, f"is not a {ID_LEN}-byte id")
    return v


def _ids(max_count: int) -> Check:
    def check(v: Any, name: str) -> list[bytes]:
        if type(v) is not list:
            raise _fail(name, f"is {type(v).__name__}, not array")
        if len(v) > max_count:
            raise _fail(name, f"has {len(v)} ids, over {max_count}")
        return [_id(x, f"{name}[{i}]") for i, x in enumerate(v)]
    return check


def _int_list(bound: int) -> Check:
    """An array of ints in 0..bound-1 (at most `bound` of them)."""
    index = _int(0, bound - 1)

    def check(v: Any, name: str) -> list[int]:
        if type(v) is not list or len(v) > bound:
            raise _fail(name, f"is not an array of at most {bound} indexes")
        return [index(x, f"{name}[{i}]") for i, x in enumerate(v)]
    return check


def _list(v: Any, name: str) -> list:
    if type(v) is not list:
        raise _fail(name, f"is {type(v).__name__}, not array")
    return v


def _optional(check: Check) -> Check:
    return lambda v, name: None if v is None else check(v, name)


def _check_map(untrusted_map: dict, what: str, checks: dict[str, Check]) -> dict:
    """Check that the map has exactly these fields, each valid; return them."""
    if set(untrusted_map) != set(checks):
        odd = sorted(set(untrusted_map) ^ set(checks))
        raise ProtocolError(f"'{what}' with missing or unknown fields: "
                            f"{sanitize(', '.join(odd), 80)}")
    return {name: check(untrusted_map[name], f"{what}.{name}") for name, check in checks.items()}


def _fields(untrusted_msg: dict, op: str, **checks: Check) -> dict:
    """Check that `untrusted_msg` is exactly `op` with these fields; return them."""
    if untrusted_msg["op"] != op:
        raise ProtocolError(f"expected '{op}', got '{sanitize(untrusted_msg['op'], 32)}'")
    fields = {k: v for k, v in untrusted_msg.items() if k not in ("op", "rid")}
    return _check_map(fields, op, checks)


def _error(untrusted_msg: dict) -> RemoteError:
    """An error frame's content (extra fields, e.g. 'holder', are ignored)."""
    code = _str(64)(untrusted_msg.get("code"), "error.code")
    message = _str(MAX_FRAME)(untrusted_msg.get("message", ""), "error.message")
    return RemoteError(code, message)


def _check_ids(ids: list[bytes], max_count: int, what: str) -> None:
    if len(ids) > max_count:
        raise ValueError(f"{what}: {len(ids)} ids, over the limit of {max_count}")
    for x in ids:
        if not isinstance(x, bytes) or len(x) != ID_LEN:
            raise ValueError(f"{what}: ids must be {ID_LEN} bytes")


# --- calls awaiting answers ---------------------------------------------------

class _Call:
    """A request with a single answer frame, delivered through a Future."""

    def __init__(self, op: str, rid: int, size: int, parse: Callable[[dict], Any]):
        self.op, self.rid, self.size = op, rid, size
        self.future: Future = Future()
        self.future.set_running_or_notify_cancel()  # answers arrive in order: no cancel
        self._parse = parse
        self._result: Any = None

    def feed(self, untrusted_msg: dict) -> bool:
        """Validate one answer frame; True when the request is complete."""
        self._result = self._parse(untrusted_msg)
        return True

    def resolve(self) -> None:
        self.future.set_result(self._result)

    def fail(self, exc: BaseException) -> None:
        self.future.set_exception(exc)


class _StrictCall(_Call):
    """A call that no error frame may answer: one kills the session (raised
    on the reader thread, it ends the read loop) after failing this call."""

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, RemoteError):
            exc = ProtocolError(f"{self.op} (rid {self.rid}) answered by an error: {exc}")
            super().fail(exc)
            raise exc
        super().fail(exc)


class _ProgressCall(_Call):
    """A request answered by any number of 'progress' frames, then one answer
    frame. Progress goes to `progress(phase, done, total)` on the reader
    thread (it must be quick and must not call into the session)."""

    def __init__(self, op: str, rid: int, size: int, parse: Callable[[dict], Any],
                 progress: Callable[[str, int, int], None] | None):
        super().__init__(op, rid, size, parse)
        self._progress = progress

    def feed(self, untrusted_msg: dict) -> bool:
        if untrusted_msg["op"] != "progress":
            return super().feed(untrusted_msg)
        f = _fields(untrusted_msg, "progress", phase=_str(MAX_PHASE), done=_int(0, MAX_INT),
                    total=_int(0, MAX_INT))
        if self._progress is not None:
            try:
                self._progress(sanitize(f["phase"], MAX_PHASE), f["done"], f["total"])
            except Exception:  # noqa: BLE001 - drawing progress must not kill the session
                pass
        return False


class _Stream:
    """Items of one get() generator, filled by the reader thread: answers,
    BATCH_DONE when a batch has been closed by 'done', or the exception that
    ended the stream."""

    BATCH_DONE = object()

    def __init__(self) -> None:
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self.abandoned = False  # generator closed: answers are checked, then dropped

    def push(self, item: Any) -> None:
        if not self.abandoned:
            self.items.put(item)


class _GetCall:
    """One `get` batch: a blob/missing frame per id, in order, then `done`."""

    op = "get"

    def __init__(self, rid: int, size: int, ids: list[bytes], stream: _Stream, max_size: int):
        self.rid, self.size = rid, size
        self._ids, self._next, self._stream = ids, 0, stream
        self._data = _bin(max_size)

    def feed(self, untrusted_msg: dict) -> bool:
        op, n = untrusted_msg["op"], len(self._ids)
        if op == "done":
            _fields(untrusted_msg, "done")
            if self._next != n:
                raise ProtocolError(f"'done' after {self._next} of {n} ids")
            return True
        if self._next == n:
            raise ProtocolError(f"more answers than the {n} ids asked")
        if op == "blob":
            f = _fields(untrusted_msg, "blob", id=_id, type=_int(0, 255), data=self._data)
            item = (f["id"], f["type"], f["data"])
        elif op == "missing":
            f = _fields(untrusted_msg, "missing", id=_id)
            item = (f["id"], None, None)
        else:
            raise ProtocolError(f"unexpected '{sanitize(op, 32)}' frame")
        if f["id"] != self._ids[self._next]:
            raise ProtocolError(f"answer {self._next} is for id "
                                f"{f['id'].hex()[:16]}, not the id asked")
        self._next += 1
        self._stream.push(item)
        return False

    def resolve(self) -> None:
        self._stream.push(_Stream.BATCH_DONE)

    def fail(self, exc: BaseException) -> None:
        self._stream.push(exc)


# --- session --------------------------------------------------------------------

class Session:
    """One protocol session over a transport; all methods are thread-safe.

    Futures are resolved on the reader thread: their callbacks must not call
    back into the session.
    """

    def __init__(self, transport: Transport, *, max_in_flight_bytes: int = 64 << 20,
                 stall_timeout: float = STALL_TIMEOUT):
        if max_in_flight_bytes < 1 or stall_timeout <= 0:
            raise ValueError("max_in_flight_bytes and stall_timeout must be positive")
        self._transport = transport
        self._frames = FrameReader(transport)
        self._stall_timeout = stall_timeout
        self._heard = time.monotonic()           # last answer, or start of the wait for one
        self._max_in_flight = max_in_flight_bytes
        self._send_lock = threading.Lock()       # rid order == queue order == write order
        # Frames for the sender thread, in rid order; None wakes it to end. A
        # SimpleQueue: putting never blocks (the budget below bounds it), and
        # it holds no lock a Ctrl-C in the main thread could leave taken.
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._cond = threading.Condition()       # guards everything below
        self._pending: collections.deque = collections.deque()
        self._in_flight = 0
        self._error: QbackupError | None = None
        self._closed = False
        self._next_rid = 1
        self.max_frame, self.max_batch = MAX_FRAME, MAX_BATCH
        self.version = PROTOCOL_VERSION
        # The watchdog covers the hello exchange too: a backup qube that
        # never answers it cannot keep dom0 waiting.
        self._in_hello = True
        threads.start(self._watch, "qbackup-proto-watchdog")
        try:
            self._hello()
        except BaseException as exc:
            with self._cond:
                stalled = self._error
            self._fail(QbackupError("hello failed"))  # stops the watchdog
            transport.close()
            if stalled is not None:
                raise stalled from None
            if isinstance(exc, OSError):
                raise ProtocolError(f"cannot talk to the daemon: {exc}") from None
            raise
        with self._cond:
            self._in_hello = False
            self._heard = time.monotonic()
        self._reader = threads.start(self._read_loop, "qbackup-proto-reader")
        self._sender = threads.start(self._send_loop, "qbackup-proto-sender")

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _hello(self) -> None:
        try:
            self._transport.write(encode_frame(
                {"op": "hello", "rid": 0, "versions": list(SUPPORTED_VERSIONS), "client": CLIENT_NAME}))
            unsent = None
        except OSError as exc:  # the daemon may have refused the call already: read why
            unsent = exc
        untrusted_msg = self._frames.frame()
        if untrusted_msg is None:
            if unsent is not None:
                raise unsent
            raise ProtocolError("connection closed by the daemon before 'hello'")
        if untrusted_msg["op"] == "error":
            raise _error(untrusted_msg)
        f = _fields(untrusted_msg, "hello", version=_int(0, MAX_INT), server=_str(64),
                    max_frame=_int(MIN_FRAME, 0xFFFFFFFF), max_batch=_int(MIN_BATCH, MAX_INT),
                    repo=_optional(_str(64)))
        if untrusted_msg["rid"] != 0:
            raise ProtocolError("'hello' answer with a rid other than 0")
        if f["version"] not in SUPPORTED_VERSIONS:
            raise ProtocolError(f"daemon chose protocol version {f['version']}, "
                                f"not one offered {SUPPORTED_VERSIONS}")
        self.version = f["version"]
        self.max_frame = min(MAX_FRAME, f["max_frame"])
        self.max_batch = min(MAX_BATCH, f["max_batch"])

    # -- plumbing

    def _fail(self, exc: QbackupError) -> None:
        """Kill the session: every pending and later call fails with `exc`."""
        with self._cond:
            if self._error is None:
                self._error = exc
            calls = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        self._outbox.put(None)
        for call in calls:
            call.fail(self._error)
        self._transport.abort()

    def _send(self, msg: dict, make_call: Callable[[int, int], Any]) -> Any:
        """Number and encode a request, wait for room in the in-flight budget,
        and queue its frame for the sender thread; its call."""
        with self._send_lock:
            with self._cond:
                if self._error is not None:
                    raise self._error
            rid = self._next_rid
            frame = encode_frame({**msg, "rid": rid}, self.max_frame)
            call = make_call(rid, len(frame))
            with self._cond:
                while (self._error is None and self._in_flight
                       and self._in_flight + len(frame) > self._max_in_flight):
                    self._cond.wait()
                if self._error is not None:
                    raise self._error
                self._in_flight += len(frame)
                if not self._pending:
                    self._heard = time.monotonic()  # the wait for an answer starts now
                self._pending.append(call)
            self._next_rid += 1
            self._outbox.put(frame)
        return call

    def _send_loop(self) -> None:
        """The sender thread: write the queued frames in order, until the
        session ends (a None in the queue). Frames already queued are joined
        into one write while they fit in WRITE_COALESCE bytes (a larger frame
        is written alone, never copied). A failed write kills the session."""
        outbox, empty = self._outbox, object()
        head = outbox.get()
        while head is not None:
            batch, size, head = [head], len(head), empty
            while size < WRITE_COALESCE:  # join what is queued, up to WRITE_COALESCE
                try:
                    frame = outbox.get_nowait()
                except queue.Empty:
                    break
                if frame is None or size + len(frame) > WRITE_COALESCE:
                    head = frame  # the next batch's first frame, or the end
                    break
                batch.append(frame)
                size += len(frame)
            try:
                self._transport.write(batch[0] if len(batch) == 1 else b"".join(batch))
            except QbackupError as exc:  # the transport knows why (qrexec exit code)
                self._fail(exc)
                return
            except (OSError, ValueError) as exc:
                self._fail(ProtocolError(f"cannot send to the daemon: {exc}"))
                return
            if head is empty:
                head = outbox.get()

    def _call(self, op: str, parse: Callable[[dict], Any], **fields: Any) -> Future:
        call = self._send({"op": op, **fields},
                          lambda rid, size: _Call(op, rid, size, parse))
        return call.future

    def _watch(self) -> None:
        """Kill the session if the daemon answers nothing for stall_timeout
        seconds while answers are due (noticed within twice that time): a
        stalled backup qube ends in an error, not in a dom0 that waits forever."""
        with self._cond:
            while self._error is None:
                waited = time.monotonic() - self._heard
                due = self._pending or self._in_hello
                if due and waited >= self._stall_timeout:
                    break
                self._cond.wait(self._stall_timeout - waited if due else self._stall_timeout)
            else:
                return
        self._fail(ProtocolError(f"the backup qube answered nothing for "
                                 f"{self._stall_timeout:g} s"))

    def _read_loop(self) -> None:
        try:
            while self._dispatch(self._frames.frame(self.max_frame)):
                pass
        except QbackupError as exc:
            self._fail(exc)
        except Exception as exc:  # noqa: BLE001 - whatever broke, the session must die
            self._fail(ProtocolError(f"cannot read from the daemon: {sanitize(str(exc), 100)}"))

    def _dispatch(self, untrusted_msg: dict | None) -> bool:
        """Handle one frame; False once the final 'bye' has been answered."""
        with self._cond:
            self._heard = time.monotonic()
            call = self._pending[0] if self._pending else None
        if untrusted_msg is None:
            if call is None:
                raise ProtocolError("connection closed by the daemon")
            raise ProtocolError(f"connection closed by the daemon before answering "
                                f"{call.op} (rid {call.rid})")
        op = sanitize(untrusted_msg["op"], 32)
        untrusted_rid = untrusted_msg["rid"]
        remote = _error(untrusted_msg) if op == "error" else None
        if remote is not None and untrusted_rid is None:
            raise remote  # connection-level error
        if call is None:
            raise ProtocolError(f"unexpected '{op}' frame: no request outstanding")
        if type(untrusted_rid) is not int or untrusted_rid != call.rid:
            shown = untrusted_rid if type(untrusted_rid) is int else type(untrusted_rid).__name__
            raise ProtocolError(f"'{op}' frame with rid {shown} while awaiting "
                                f"{call.op} (rid {call.rid})")
        if remote is None:
            try:
                if not call.feed(untrusted_msg):
                    return True
            except ProtocolError as exc:
                raise ProtocolError(f"bad answer to {call.op} (rid {call.rid}): {exc}") from None
        with self._cond:
            if self._error is not None:
                return False  # killed meanwhile: _fail has failed this call
            self._pending.popleft()
            self._in_flight -= call.size
            self._cond.notify_all()
        if remote is None:
            call.resolve()
        else:
            call.fail(remote)
            if remote.code in CLOSING_CODES:
                raise remote
        return call.op != "bye"

    # -- operations (PROTOCOL §5)

    def init(self, config: bytes, pack_size: int) -> None:
        if len(config) > MAX_CONFIG or not MIN_PACK_SIZE <= pack_size <= MAX_PACK_SIZE:
            raise ValueError(f"init: config over {MAX_CONFIG} bytes or pack size outside "
                             f"{MIN_PACK_SIZE}..{MAX_PACK_SIZE}")
        self._call("init", lambda m: _fields(m, "ok"), config=config,
                   pack_size=pack_size).result()

    def open(self, write: bool, *, lock_wait: float = 0.0) -> tuple[bytes, int]:
        """Open the repository: (untrusted_config, pack_size). While another
        writer holds the repository, retry for up to `lock_wait` seconds (an
        interrupted run's connection may still be finishing its last requests)."""
        deadline = time.monotonic() + lock_wait
        while True:
            try:
                f = self._call("open", lambda m: _fields(
                    m, "opened", config=_bin(MAX_CONFIG),
                    pack_size=_int(MIN_PACK_SIZE, MAX_PACK_SIZE),
                    format=_int(1, 1)), write=bool(write)).result()
                return f["config"], f["pack_size"]
            except RemoteError as e:
                if e.code != "locked" or time.monotonic() >= deadline:
                    raise
            time.sleep(LOCK_RETRY)

    def set_config(self, config: bytes, expect: bytes) -> None:
        if len(config) > MAX_CONFIG:
            raise ValueError(f"config of {len(config)} bytes exceeds {MAX_CONFIG}")
        self._call("set_config", lambda m: _fields(m, "ok"), config=config,
                   expect=expect).result()

    def have(self, ids: list[bytes]) -> Future:
        """Future of the (ascending) indexes into `ids` the repository lacks."""
        ids = list(ids)
        _check_ids(ids, self.max_batch, "have")

        def parse(untrusted_msg: dict) -> list[int]:
            missing = _fields(untrusted_msg, "have", missing=_int_list(len(ids)))["missing"]
            if any(a >= b for a, b in itertools.pairwise(missing)):
                raise ProtocolError("have.missing is not strictly ascending")
            return missing
        return self._call("have", parse, ids=ids)

    def put(self, id: bytes, type: int, data: bytes, refs: list[bytes] | None = None) -> Future:
        """Future of True if stored, False if the repository already held `id`."""
        _check_ids([id], 1, "put")
        if not 0 <= type <= 255 or len(data) > MAX_BLOB:
            raise ValueError("put: type must be 0..255 and data at most "
                             f"{MAX_BLOB} bytes, got {type}, {len(data)}")
        fields: dict[str, Any] = {"id": id, "type": type, "data": data}
        if refs is not None:
            refs = list(refs)
            _check_ids(refs, self.max_batch, "put refs")
            fields["refs"] = refs
        return self._call("put", lambda m: _fields(m, "ok", stored=_bool)["stored"], **fields)

    def flush(self) -> None:
        self._call("flush", lambda m: _fields(m, "ok")).result()

    def commit(self, id: bytes, data: bytes, refs: list[bytes]) -> None:
        refs = list(refs)
        _check_ids([id], 1, "commit")
        _check_ids(refs, MAX_COMMIT_REFS, "commit refs")
        if len(data) > MAX_SNAPSHOT:
            raise ValueError(f"snapshot of {len(data)} bytes exceeds {MAX_SNAPSHOT}")
        self._call("commit", lambda m: _fields(m, "ok"), id=id, data=data, refs=refs).result()

    def get_snapshot(self, id: bytes) -> bytes:
        """The snapshot's untrusted (still sealed) data."""
        _check_ids([id], 1, "get_snapshot")

        def parse(untrusted_msg: dict) -> bytes:
            f = _fields(untrusted_msg, "snapshot", id=_id, data=_bin(MAX_SNAPSHOT),
                        refs=_ids(MAX_COMMIT_REFS))
            if f["id"] != id:
                raise ProtocolError("snapshot answer for another id")
            return f["data"]
        return self._call("get_snapshot", parse, id=id).result()

    def get(self, ids: Iterable[bytes], *, window: int = 64, max_size: int = MAX_BLOB
            ) -> Iterator[tuple[bytes, int | None, bytes | None]]:
        """Stream (id, untrusted_type, untrusted_data), or (id, None, None) if missing.

        At most `window` ids are requested but not yet yielded, and a blob
        over `max_size` bytes kills the session, so at most `window` blobs of
        `max_size` wait in memory. The generator ends only once every batch
        has been closed by the daemon's 'done'. Closing it early is safe.
        """
        if window < 1 or not 0 <= max_size <= MAX_BLOB:
            raise ValueError(f"window must be at least 1 and max_size at most {MAX_BLOB}")
        source, stream = iter(ids), _Stream()
        outstanding = batches = 0     # ids asked but not yielded; batches not done
        exhausted = False
        try:
            while True:
                if outstanding <= window // 2:
                    while not exhausted and outstanding < window:
                        want = min(window - outstanding, self.max_batch)
                        batch = list(itertools.islice(source, want))
                        if batch:
                            self._send_get(batch, stream, max_size)
                            outstanding, batches = outstanding + len(batch), batches + 1
                        exhausted = len(batch) < want
                if outstanding == 0 and batches == 0:
                    return
                item = stream.items.get()
                if isinstance(item, BaseException):
                    raise item
                if item is _Stream.BATCH_DONE:
                    batches -= 1
                    continue
                outstanding -= 1
                yield item
        finally:
            stream.abandoned = True

    def _send_get(self, ids: list[bytes], stream: _Stream, max_size: int) -> None:
        _check_ids(ids, self.max_batch, "get")
        self._send({"op": "get", "ids": ids},
                   lambda rid, size: _GetCall(rid, size, ids, stream, max_size))

    def delete_snapshot(self, id: bytes) -> None:
        _check_ids([id], 1, "delete_snapshot")
        self._call("delete_snapshot", lambda m: _fields(m, "ok"), id=id).result()

    # -- version 2: several deletions at once, garbage collection, check, usage

    def _require(self, op: str, since: int = 2) -> None:
        if self.version < since:
            raise QbackupError(f"the backup qube's qbackupd speaks protocol version {self.version}; "
                               f"'{op}' needs version {since}: update qbackupd in the backup qube")

    def _long_call(self, op: str, parse: Callable[[dict], Any],
                   progress: Callable[[str, int, int], None] | None, **fields: Any) -> Any:
        self._require(op)
        call = self._send({"op": op, **fields},
                          lambda rid, size: _ProgressCall(op, rid, size, parse, progress))
        return call.future.result()

    def delete_snapshots(self, ids: Iterable[bytes]) -> None:
        """Delete several snapshots: all of them, or none (RemoteError not_found)."""
        self._require("delete_snapshots")
        ids = list(ids)
        _check_ids(ids, self.max_batch, "delete_snapshots")
        if not ids or len(set(ids)) != len(ids):
            raise ValueError("delete_snapshots: at least one id, none twice")
        self._call("delete_snapshots", lambda m: _fields(m, "ok"), ids=ids).result()

    def gc(self, *, repack_below: int = 70, dry_run: bool = False,
           progress: Callable[[str, int, int], None] | None = None) -> dict:
        """Garbage collection in the backup qube (the repository must be open
        read-only): the daemon's untrusted summary, every field bounds-checked."""
        if type(repack_below) is not int or not 0 <= repack_below <= 100:
            raise ValueError("repack_below must be an integer percentage 0..100")
        count = _int(0, MAX_INT)
        return self._long_call("gc", lambda m: _fields(
            m, "gc", dry_run=_bool, snapshots=count, live_blobs=count, packs_deleted=count,
            packs_repacked=count, packs_written=count, packs_kept=count, bytes_copied=count,
            bytes_freed=_int(-MAX_INT, MAX_INT)), progress,
            repack_below=repack_below, dry_run=bool(dry_run))

    def check(self, *, read_data: bool = False,
              progress: Callable[[str, int, int], None] | None = None) -> dict:
        """The backup qube's keyless check: untrusted problem lines (sanitised),
        damaged blob ids, damaged snapshot files, and the snapshots reaching
        damage with the refs (volume roots) they reach it through."""
        count = _int(0, MAX_INT)

        def parse(untrusted_msg: dict) -> dict:
            f = _fields(untrusted_msg, "check", problems=_list, problems_total=count,
                        damaged=_ids(MAX_DAMAGED), damaged_total=count,
                        bad_snapshots=_ids(MAX_AFFECTED), affected=_list, affected_total=count,
                        complete=_bool)
            if len(f["problems"]) > MAX_PROBLEMS or len(f["affected"]) > MAX_AFFECTED:
                raise ProtocolError("check answer lists more than it may")
            if (f["problems_total"] < len(f["problems"]) or f["damaged_total"] < len(f["damaged"])
                    or f["affected_total"] < len(f["affected"])):
                raise ProtocolError("check answer counts fewer than it lists")
            f["problems"] = [sanitize(_str(MAX_PROBLEM_CHARS)(p, f"check.problems[{i}]"),
                                      MAX_PROBLEM_CHARS) for i, p in enumerate(f["problems"])]
            affected = []
            for i, untrusted_entry in enumerate(f["affected"]):
                if type(untrusted_entry) is not dict:
                    raise ProtocolError(f"check.affected[{i}] is not a map")
                entry = _check_map(untrusted_entry, f"check.affected[{i}]",
                                   {"id": _id, "roots": _ids(MAX_AFFECTED_ROOTS)})
                affected.append((entry["id"], entry["roots"]))
            f["affected"] = affected
            return f
        return self._long_call("check", parse, progress, read_data=bool(read_data))

    def usage(self, *, progress: Callable[[str, int, int], None] | None = None) -> dict:
        """Stored bytes per snapshot (only it reaches), shared, unreferenced: untrusted, checked."""
        count = _int(0, MAX_INT)

        def parse(untrusted_msg: dict) -> dict:
            f = _fields(untrusted_msg, "usage", snapshots=_list, shared_blobs=count,
                        shared_bytes=count, unreferenced_blobs=_int(-MAX_INT, MAX_INT),
                        unreferenced_bytes=_int(-MAX_INT, MAX_INT), missing=count, unreadable=count)
            if len(f["snapshots"]) > MAX_SNAPSHOTS:
                raise ProtocolError("usage answer lists more snapshots than it may")
            rows = []
            for i, untrusted_row in enumerate(f["snapshots"]):
                if type(untrusted_row) is not list or len(untrusted_row) != 3:
                    raise ProtocolError(f"usage.snapshots[{i}] is not [id, blobs, bytes]")
                rows.append((_id(untrusted_row[0], f"usage.snapshots[{i}].id"),
                             count(untrusted_row[1], f"usage.snapshots[{i}].blobs"),
                             count(untrusted_row[2], f"usage.snapshots[{i}].bytes")))
            if len({row[0] for row in rows}) != len(rows):
                raise ProtocolError("usage.snapshots names a snapshot twice")
            f["snapshots"] = rows
            return f
        return self._long_call("usage", parse, progress)

    # -- version 3: where the blobs are, to read them in the daemon's order

    def locate(self, ids: list[bytes]) -> Future:
        """Future of one untrusted sort key per id, each an int 0..MAX_INT:
        fit to order gets by, never to decide which ids are fetched. A daemon
        answering anything else, an error frame included, is broken or
        hostile: the session dies."""
        self._require("locate", 3)
        ids = list(ids)
        _check_ids(ids, self.max_batch, "locate")
        key = _int(0, MAX_INT)

        def parse(untrusted_msg: dict) -> list[int]:
            untrusted_keys = _fields(untrusted_msg, "locate", keys=_list)["keys"]
            if len(untrusted_keys) != len(ids):
                raise ProtocolError(f"locate answer has {len(untrusted_keys)} keys for {len(ids)} ids")
            return [key(k, f"locate.keys[{i}]") for i, k in enumerate(untrusted_keys)]
        return self._send({"op": "locate", "ids": ids},
                          lambda rid, size: _StrictCall("locate", rid, size, parse)).future

    def stats(self) -> dict:
        """The repository's figures as the daemon reports them (untrusted:
        for display and estimates only)."""
        count = _int(0, MAX_INT)
        return self._call("stats", lambda m: _fields(
            m, "stats", packs=count, blobs=count, bytes=count, snapshots=count,
            pack_bytes=count, fs_size=count, fs_free=count)).result()

    def abort(self, reason: str = "session aborted") -> None:
        """Kill the session (an error or an interrupt elsewhere): every blocked
        or later call fails at once. The frames already queued are still
        written, for at most ABORT_GRACE seconds, so that what the caller
        handed over reaches the daemon (an interrupted backup's re-run reuses
        it); then the daemon sees the connection drop."""
        error = QbackupError(reason)
        with self._cond:
            if self._error is None:
                self._error = error  # from now on nothing is queued, no call waits
            self._cond.notify_all()
        self._outbox.put(None)  # the sender writes what is queued before it, then ends
        if threading.current_thread() is not self._sender:
            self._sender.join(ABORT_GRACE)
        self._fail(error)

    def close(self) -> None:
        """Say bye and wait for the daemon's final status; then release the transport.

        On a session that already failed, this only releases the transport.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            failed = self._error is not None
        try:
            if not failed:
                status = self._call("bye", lambda m: _fields(m, "bye", status=_str(64))["status"]
                                    ).result()
                if status != "ok":
                    raise RemoteError("bye", f"session ended with status {status}")
        finally:
            with self._cond:
                if self._error is None:
                    self._error = QbackupError("session is closed")
                self._cond.notify_all()
            # Every frame is written once bye is answered; after a failure the
            # transport is torn down, which wakes a write in progress.
            self._outbox.put(None)
            self._sender.join(SENDER_JOIN)
            self._transport.close()

    # Defined last: in the class body, the name 'list' shadows the builtin.
    def list(self) -> list[tuple[bytes, int, int]]:
        """Snapshots as (id, size, untrusted store time)."""
        def parse(untrusted_msg: dict) -> list[tuple[bytes, int, int]]:
            entries = _fields(untrusted_msg, "list", snapshots=_list)["snapshots"]
            out = []
            for i, untrusted_entry in enumerate(entries):
                if type(untrusted_entry) is not dict:
                    raise ProtocolError(f"list.snapshots[{i}] is not a map")
                f = _check_map(untrusted_entry, f"list.snapshots[{i}]", {
                    "id": _id, "size": _int(0, MAX_SNAPSHOT), "time": _int(0, MAX_INT)})
                out.append((f["id"], f["size"], f["time"]))
            if len({entry[0] for entry in out}) != len(out):
                raise ProtocolError("list.snapshots names a snapshot twice")
            return out
        return self._call("list", parse).result()
