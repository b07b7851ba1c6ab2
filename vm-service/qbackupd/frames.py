# SPDX-License-Identifier: GPL-2.0-or-later
"""Daemon-side wire codec: qrexec header, length-prefixed msgpack frames and
per-operation request validation (docs/PROTOCOL.md, versions 1 and 2).

Everything here parses bytes from the client, which the daemon treats as
hostile. Parsing is sans-IO (the server feeds bytes in) and every failure is
a `ProtocolError` carrying the protocol error code, or a `HeaderError` for the
qrexec header; nothing else escapes.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

PROTOCOL_VERSION = 3
SUPPORTED_VERSIONS = (1, 2, PROTOCOL_VERSION)
SERVICE = "qubes.BackupChunk"
ALLOWED_SOURCE = "dom0"

MAX_HEADER = 256
RECEIVE_BUFFER = 1 << 20  # a connection's receive buffer (it grows to hold the largest frame)
MAX_FRAME = 8 << 20
MAX_BATCH = 4096
MAX_COMMIT_REFS = 65536
MAX_BLOB = (4 << 20) + (64 << 10)
MAX_SNAPSHOT = 4 << 20
MAX_CONFIG = 64 << 10
MIN_PACK_SIZE = 8 << 20
MAX_PACK_SIZE = 512 << 20
ID_LEN = 32
MAX_RID = 1 << 63
# Shape of any valid request: a map whose values are scalars or arrays of
# scalars, with at most a commit's refs and a few fields. Checked before
# decoding, so a small frame cannot expand into millions of Python objects.
MAX_DEPTH = 2
MAX_OBJECTS = MAX_COMMIT_REFS + 64

_LENGTH = struct.Struct(">I")
_REPO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# Codes after which the daemon closes the connection (PROTOCOL.md §6).
FATAL_CODES = frozenset(
    {"bad_frame", "frame_too_large", "bad_request", "unsupported_version", "forbidden", "internal"}
)


class ProtocolError(Exception):
    """A violation of the protocol, reported to the client as an error frame."""

    def __init__(self, code: str, message: str, rid: int | None = None, **extra: Any):
        super().__init__(message)
        self.code = code
        self.message = message
        self.rid = rid
        self.extra = extra

    @property
    def fatal(self) -> bool:
        return self.code in FATAL_CODES


class HeaderError(Exception):
    """The qrexec header is missing, oversized or malformed: close at once."""


def describe(untrusted: bytes | str, limit: int = 64) -> str:
    """Printable, escaped and truncated rendering of untrusted data for messages."""
    text = untrusted[:limit]
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return ascii(text)[1:-1] + ("..." if len(untrusted) > limit else "")


# --- qrexec header ----------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """The qrexec header: calling qube and the (validated) repository name."""

    untrusted_source: bytes  # only ever compared with ALLOWED_SOURCE
    repo: str | None
    repo_problem: str | None  # why there is no usable name (None when repo is set)

    @property
    def from_allowed_source(self) -> bool:
        return self.untrusted_source == ALLOWED_SOURCE.encode()


def valid_repo_name(name: str) -> bool:
    return _REPO_NAME.fullmatch(name) is not None and ".." not in name


def parse_header(untrusted_header: bytes) -> Header:
    """Parse `SERVICE[+ARG] SP SOURCE` (without the NUL).

    A wrong service or an unparsable header raises HeaderError (fatal). A
    missing or invalid repository name is not fatal here: it is recorded and
    reported as `bad_repo_name` when an operation needs the repository.
    """
    parts = untrusted_header.split(b" ")
    if len(parts) != 2 or not parts[1]:
        raise HeaderError(f"malformed qrexec header \"{describe(untrusted_header)}\"")
    untrusted_service, untrusted_source = parts
    untrusted_name, plus, untrusted_arg = untrusted_service.partition(b"+")
    if untrusted_name != SERVICE.encode():
        raise HeaderError(f"unexpected service \"{describe(untrusted_name)}\"")
    if not plus or not untrusted_arg:
        return Header(untrusted_source, None, "no repository name given")
    if untrusted_arg.isascii() and valid_repo_name(untrusted_arg.decode("ascii")):
        return Header(untrusted_source, untrusted_arg.decode("ascii"), None)
    return Header(untrusted_source, None, f"invalid repository name \"{describe(untrusted_arg)}\"")


# --- frames -----------------------------------------------------------------


# msgpack scalar types by first byte: (bytes of length field, fixed size after it)
_SCALARS: dict[int, tuple[int, int]] = {
    0xC0: (0, 0), 0xC2: (0, 0), 0xC3: (0, 0),  # nil, false, true
    0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0),  # bin 8/16/32
    0xCA: (0, 4), 0xCB: (0, 8),  # float 32/64
    0xCC: (0, 1), 0xCD: (0, 2), 0xCE: (0, 4), 0xCF: (0, 8),  # uint 8..64
    0xD0: (0, 1), 0xD1: (0, 2), 0xD2: (0, 4), 0xD3: (0, 8),  # int 8..64
    0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),  # str 8/16/32
}  # fmt: skip
# containers: first byte -> (bytes of count field, objects per counted item)
_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}


def check_shape(untrusted_payload: bytes | memoryview) -> None:
    """Walk the msgpack encoding without building objects: bound nesting and object count.

    Ext types and the never-used byte are refused here too; exactness (one
    object, no trailing bytes, valid UTF-8) is left to the decoder.
    """
    data = untrusted_payload
    pos = objects = 0
    pending = [1]  # objects still to read at each open nesting level
    while pending:
        if pending[-1] == 0:
            pending.pop()
            continue
        pending[-1] -= 1
        objects += 1
        if objects > MAX_OBJECTS or pos >= len(data):
            raise ProtocolError("bad_frame", "frame payload too complex or truncated")
        first = data[pos]
        pos += 1
        count = per_item = 0
        if first <= 0x7F or first >= 0xE0:  # fixint
            continue
        if 0xA0 <= first <= 0xBF:  # fixstr
            pos += first & 0x1F
        elif 0x80 <= first <= 0x9F:  # fixmap, fixarray
            count, per_item = first & 0x0F, 2 if first <= 0x8F else 1
        elif first in _SCALARS:
            length_size, fixed = _SCALARS[first]
            pos += length_size + fixed + int.from_bytes(data[pos : pos + length_size], "big")
        elif first in _CONTAINERS:
            count_size, per_item = _CONTAINERS[first]
            count = int.from_bytes(data[pos : pos + count_size], "big")
            pos += count_size
        else:
            raise ProtocolError("bad_frame", f"msgpack type 0x{first:02x} not allowed")
        if per_item:
            if len(pending) > MAX_DEPTH:
                raise ProtocolError("bad_frame", f"frame payload nested deeper than {MAX_DEPTH}")
            if objects + count * per_item > MAX_OBJECTS:
                raise ProtocolError("bad_frame", "frame payload has too many objects")
            pending.append(count * per_item)
    if pos > len(data):
        raise ProtocolError("bad_frame", "frame payload truncated")


def _no_ext(code: int, data: bytes) -> None:
    raise ValueError(f"ext type {code} not allowed")


def decode_payload(untrusted_payload: bytes | memoryview) -> dict[str, Any]:
    """Decode one frame payload: exactly one msgpack map with string keys."""
    check_shape(untrusted_payload)
    try:
        obj = msgpack.unpackb(
            untrusted_payload,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_FRAME,
            max_str_len=MAX_FRAME,
            max_array_len=MAX_FRAME,
            max_map_len=MAX_FRAME,
            max_ext_len=0,
            ext_hook=_no_ext,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError("bad_frame", f"invalid msgpack payload: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_frame", "frame payload is not a map")
    if not all(type(key) is str for key in obj):
        raise ProtocolError("bad_frame", "frame map has non-string keys")
    return obj


def encode_frame(message: dict[str, Any]) -> bytes:
    """Encode one message as a frame; raises ProtocolError("internal") if oversized."""
    payload = msgpack.packb(message, use_bin_type=True)
    if len(payload) > MAX_FRAME:
        raise ProtocolError("internal", f"response of {len(payload)} bytes exceeds MAX_FRAME")
    return _LENGTH.pack(len(payload)) + payload


def error_message(rid: int | None, code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"op": "error", "rid": rid, "code": code, "message": message, **extra}


class Decoder:
    """Incremental decoder of the byte stream from the client.

    Bytes arrive either through ``feed`` or, without a copy, straight into
    the decoder's own reusable buffer: ``receive_buffer`` gives the free
    space after what is held, ``received`` says how much of it was filled.
    Take the qrexec header once, then frames. A frame's length is checked
    before the buffer grows for its body, so the buffer never holds more
    than the header limit or one frame plus one receive beyond it; each
    payload is shape-checked and decoded in place, then its space reused.
    """

    def __init__(self) -> None:
        self._buf = bytearray(RECEIVE_BUFFER)
        self._start = 0  # first byte not consumed
        self._end = 0  # end of the bytes received
        self._framing = False  # the header has been taken: frames follow
        self.frame_size = 0  # payload bytes of the last frame decoded

    @property
    def pending(self) -> int:
        """Bytes received but not yet consumed."""
        return self._end - self._start

    @property
    def capacity(self) -> int:
        """Size of the receive buffer now."""
        return len(self._buf)

    def _make_room(self, need: int) -> None:
        """At least ``need`` free bytes after what is held: move it to the front, or grow."""
        if len(self._buf) - self._end >= need:
            return
        held = self._end - self._start
        if self._start:
            self._buf[:held] = self._buf[self._start : self._end]
            self._start, self._end = 0, held
        if len(self._buf) - held < need:
            self._buf.extend(bytes(held + need - len(self._buf)))

    def feed(self, data: bytes) -> None:
        self._make_room(len(data))
        self._buf[self._end : self._end + len(data)] = data
        self._end += len(data)

    def receive_buffer(self) -> memoryview:
        """Free space to receive into: at least what the frame begun still
        lacks (once its length is known to be within bounds), or
        RECEIVE_BUFFER / 4 bytes. Release the view (``with``) before calling
        anything else here, then report the bytes written with ``received``."""
        need = RECEIVE_BUFFER // 4
        if self._framing and self.pending >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buf, self._start)
            if 0 < length <= MAX_FRAME:
                need = max(need, _LENGTH.size + length - self.pending)
        self._make_room(need)
        return memoryview(self._buf)[self._end :]

    def received(self, count: int) -> None:
        """``count`` bytes were written at the start of the last ``receive_buffer``."""
        if not 0 <= count <= len(self._buf) - self._end:
            raise ValueError(f"received {count} bytes, more than the buffer had room for")
        self._end += count

    def header(self) -> bytes | None:
        """The raw header (without NUL), or None until the NUL has arrived."""
        end = self._buf.find(b"\0", self._start, min(self._end, self._start + MAX_HEADER))
        if end < 0:
            if self.pending >= MAX_HEADER:
                raise HeaderError(f"qrexec header longer than {MAX_HEADER} bytes")
            return None
        raw = bytes(self._buf[self._start : end])
        self._consume(end + 1)
        self._framing = True
        return raw

    def _consume(self, end: int) -> None:
        self._start = end
        if self._start == self._end:
            self._start = self._end = 0

    def frame(self) -> dict[str, Any] | None:
        """The next decoded frame payload, or None until it is complete."""
        if self.pending < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(self._buf, self._start)
        if length == 0:
            raise ProtocolError("bad_frame", "frame of length 0")
        if length > MAX_FRAME:
            raise ProtocolError("frame_too_large", f"frame of {length} bytes exceeds {MAX_FRAME}")
        start = self._start + _LENGTH.size
        end = start + length
        if self._end < end:
            return None
        self._consume(end)  # whatever the payload holds, it is gone from the stream
        self.frame_size = length
        with memoryview(self._buf) as view, view[start:end] as untrusted_payload:
            return decode_payload(untrusted_payload)


# --- request validation -----------------------------------------------------

# Field kinds and what each must be; bin sizes over a limit are checked last
# (after every type is known to be right) and answer `too_large`.
_SCHEMAS: dict[str, dict[str, str]] = {
    "hello": {"versions": "versions", "client": "str"},
    "init": {"config": "config", "pack_size": "pack_size"},
    "open": {"write": "bool"},
    "set_config": {"config": "config", "expect": "config"},
    "have": {"ids": "ids"},
    "put": {"id": "id", "type": "type", "data": "blob", "refs": "ids"},
    "flush": {},
    "commit": {"id": "id", "data": "snapshot", "refs": "commit_refs"},
    "list": {},
    "get_snapshot": {"id": "id"},
    "get": {"ids": "ids"},
    "delete_snapshot": {"id": "id"},
    "stats": {},
    "bye": {},
    # version 2
    "delete_snapshots": {"ids": "ids"},
    "gc": {"repack_below": "percent", "dry_run": "bool"},
    "check": {"read_data": "bool"},
    "usage": {},
    # version 3
    "locate": {"ids": "ids"},
}
_OPTIONAL = {"put": frozenset({"refs"})}
WRITE_OPS = frozenset({"set_config", "put", "flush", "commit", "delete_snapshot", "delete_snapshots"})
# The version that added each later operation: a session of an older version
# does not have it (answered unknown_op there).
SINCE = {"delete_snapshots": 2, "gc": 2, "check": 2, "usage": 2, "locate": 3}
_SIZE_LIMITS = {"blob": MAX_BLOB, "snapshot": MAX_SNAPSHOT, "config": MAX_CONFIG}
_ID_LIMITS = {"ids": MAX_BATCH, "commit_refs": MAX_COMMIT_REFS}


@dataclass(frozen=True)
class Request:
    """A validated request: every field present has its exact type and bounds."""

    op: str
    rid: int
    args: dict[str, Any]


def _is_id(untrusted: Any) -> bool:
    return type(untrusted) is bytes and len(untrusted) == ID_LEN


def _type_problem(kind: str, untrusted: Any) -> str | None:
    """What is wrong with the type or shape of a field, or None."""
    if kind == "id":
        return None if _is_id(untrusted) else f"must be bin of {ID_LEN} bytes"
    if kind in _ID_LIMITS:
        if type(untrusted) is not list:
            return "must be an array of ids"
        if len(untrusted) > _ID_LIMITS[kind]:
            return f"has {len(untrusted)} ids, limit {_ID_LIMITS[kind]}"
        return None if all(map(_is_id, untrusted)) else f"holds an id that is not {ID_LEN} bytes"
    if kind in _SIZE_LIMITS:
        return None if type(untrusted) is bytes else "must be bin"
    if kind == "type":
        return None if type(untrusted) is int and 0 <= untrusted <= 255 else "must be an int 0..255"
    if kind == "bool":
        return None if type(untrusted) is bool else "must be a bool"
    if kind == "str":
        return None if type(untrusted) is str else "must be a str"
    if kind == "versions":
        ok = type(untrusted) is list and all(type(v) is int for v in untrusted)
        return None if ok else "must be an array of ints"
    if kind == "percent":
        return None if type(untrusted) is int and 0 <= untrusted <= 100 else "must be an int 0..100"
    if kind == "pack_size":
        ok = type(untrusted) is int and MIN_PACK_SIZE <= untrusted <= MAX_PACK_SIZE
        return None if ok else f"must be an int {MIN_PACK_SIZE}..{MAX_PACK_SIZE}"
    raise AssertionError(f"unknown field kind {kind}")


def negotiate(versions: list[int]) -> int | None:
    """The protocol version a session speaks: the highest one both sides support."""
    common = set(versions) & set(SUPPORTED_VERSIONS)
    return max(common) if common else None


def validate_request(untrusted_msg: dict[str, Any], version: int = PROTOCOL_VERSION) -> Request:
    """Check a decoded frame against its operation's schema (exact keys, types, bounds).

    ``version`` is the session's protocol version: an operation it does not
    have is an unknown op, whatever its fields.
    """
    untrusted_rid = untrusted_msg.get("rid")
    if type(untrusted_rid) is not int or not 0 <= untrusted_rid < MAX_RID:
        raise ProtocolError("bad_request", "rid must be an int 0 <= rid < 2^63")
    rid = untrusted_rid
    untrusted_op = untrusted_msg.get("op")
    if type(untrusted_op) is not str:
        raise ProtocolError("bad_request", "op must be a str", rid)
    schema = _SCHEMAS.get(untrusted_op)
    if schema is None or SINCE.get(untrusted_op, 1) > version:
        raise ProtocolError("unknown_op", f"unknown op \"{describe(untrusted_op)}\"", rid)
    op = untrusted_op
    fields = set(untrusted_msg) - {"op", "rid"}
    unknown = fields - schema.keys()
    if unknown:
        raise ProtocolError("bad_request", f"{op}: unknown field \"{describe(min(unknown))}\"", rid)
    missing = schema.keys() - fields - _OPTIONAL.get(op, frozenset())
    if missing:
        raise ProtocolError("bad_request", f"{op}: missing field {min(missing)}", rid)
    for name in sorted(fields):
        problem = _type_problem(schema[name], untrusted_msg[name])
        if problem:
            raise ProtocolError("bad_request", f"{op}: {name} {problem}", rid)
    for name in sorted(fields):
        limit = _SIZE_LIMITS.get(schema[name])
        if limit is not None and len(untrusted_msg[name]) > limit:
            size = len(untrusted_msg[name])
            raise ProtocolError("too_large", f"{op}: {name} of {size} bytes exceeds {limit}", rid)
    return Request(op, rid, {name: untrusted_msg[name] for name in fields})
