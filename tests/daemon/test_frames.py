# SPDX-License-Identifier: GPL-2.0-or-later
"""Unit and property tests of the daemon's frame codec, qrexec header parser
and request validator (qbackupd.frames), with hostile input."""

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackupd import frames
from qbackupd.frames import Decoder, HeaderError, ProtocolError, parse_header, validate_request

ID = bytes(range(32))


def frame(obj) -> bytes:
    payload = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


def raw_frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def decode_one(data: bytes):
    dec = Decoder()
    dec.feed(data)
    return dec.frame()


def code_of(exc_info) -> str:
    return exc_info.value.code


# --- qrexec header -------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, repo",
    [
        (b"qubes.BackupChunk+work dom0", "work"),
        (b"qubes.BackupChunk+a dom0", "a"),
        (b"qubes.BackupChunk+A-b_c.9 dom0", "A-b_c.9"),
        (b"qubes.BackupChunk+" + b"x" * 64 + b" dom0", "x" * 64),
    ],
)
def test_header_good(raw, repo):
    header = parse_header(raw)
    assert header.repo == repo
    assert header.repo_problem is None
    assert header.from_allowed_source


@pytest.mark.parametrize("raw", [b"qubes.BackupChunk dom0", b"qubes.BackupChunk+ dom0"])
def test_header_without_argument(raw):
    header = parse_header(raw)
    assert header.repo is None
    assert "no repository name" in header.repo_problem
    assert header.from_allowed_source


@pytest.mark.parametrize(
    "arg",
    [
        b"../x",
        b"a/b",
        b"x" * 65,
        b"a..b",
        b"..",
        b".hidden",
        b"-x",
        b"_x",
        b"caf\xc3\xa9",
        b"\xff",
        b"a\x00b",
        b"a\nb",
        b"a+b",
        b"a:b",
    ],
)
def test_header_bad_repo_name(arg):
    header = parse_header(b"qubes.BackupChunk+" + arg + b" dom0")
    assert header.repo is None
    assert "invalid repository name" in header.repo_problem
    assert header.from_allowed_source


@pytest.mark.parametrize("source", [b"work", b"dom0x", b"Dom0", b"sys-net", b"dom0\xff", b"@adminvm"])
def test_header_other_source(source):
    header = parse_header(b"qubes.BackupChunk+work " + source)
    assert not header.from_allowed_source


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"qubes.BackupChunk+work",
        b"qubes.BackupChunk+work dom0 extra",
        b"qubes.BackupChunk+work  dom0",
        b"qubes.BackupChunk+work ",
        b"qubes.Other+work dom0",
        b"qubes.BackupChunkX dom0",
        b"+work dom0",
        b"\xff\xfe dom0",
    ],
)
def test_header_malformed(raw):
    with pytest.raises(HeaderError):
        parse_header(raw)


def test_decoder_header_incremental_then_frame():
    dec = Decoder()
    data = b"qubes.BackupChunk+work dom0\0" + frame({"op": "bye", "rid": 1})
    for i, byte in enumerate(data):
        dec.feed(bytes([byte]))
        if i < data.index(b"\0"):
            assert dec.header() is None
    assert dec.header() == b"qubes.BackupChunk+work dom0"
    assert dec.frame() == {"op": "bye", "rid": 1}
    assert dec.pending == 0


def test_decoder_header_size_limit():
    dec = Decoder()
    dec.feed(b"a" * 255 + b"\0")
    assert dec.header() == b"a" * 255
    dec = Decoder()
    dec.feed(b"a" * 255)
    assert dec.header() is None
    dec.feed(b"a")
    with pytest.raises(HeaderError):
        dec.header()
    dec = Decoder()
    dec.feed(b"a" * 256 + b"\0")
    with pytest.raises(HeaderError):
        dec.header()


# --- frames ----------------------------------------------------------------------


def test_frame_roundtrip_and_split_feeding():
    msgs = [{"op": "put", "rid": i, "id": ID, "type": 1, "data": bytes(i * 1000)} for i in range(5)]
    data = b"".join(frames.encode_frame(m) for m in msgs)
    dec = Decoder()
    out = []
    for start in range(0, len(data), 777):
        dec.feed(data[start : start + 777])
        while (msg := dec.frame()) is not None:
            out.append(msg)
    assert out == msgs
    assert dec.pending == 0


def receive(dec: Decoder, data: bytes, cut: int) -> None:
    """Deliver ``data`` as the server does, into the decoder's own buffer, at most ``cut`` bytes a time."""
    pos = 0
    while pos < len(data):
        with dec.receive_buffer() as buffer:
            count = min(cut, len(buffer), len(data) - pos)
            buffer[:count] = data[pos : pos + count]
        dec.received(count)
        pos += count


def test_receive_buffer_reuse_keeps_decoded_frames_intact():
    """Frames decoded from the reused buffer own their bytes: later frames
    received over the same space do not change them."""
    msgs = [{"op": "put", "rid": i, "id": ID, "type": 1, "data": bytes([i]) * (300_000 + i)} for i in range(12)]
    data = b"qubes.BackupChunk+work dom0\0" + b"".join(frames.encode_frame(m) for m in msgs)
    dec = Decoder()
    receive(dec, data[:100], 100)
    assert dec.header() == b"qubes.BackupChunk+work dom0"
    out = []
    for start in range(100, len(data), 123_457):
        receive(dec, data[start : start + 123_457], 123_457)
        while (msg := dec.frame()) is not None:
            out.append(msg)
    assert out == msgs
    assert dec.pending == 0 and dec.capacity == frames.RECEIVE_BUFFER


def test_receive_buffer_grows_for_a_large_frame_only_once_its_length_is_bounded():
    dec = Decoder()
    dec.feed(b"qubes.BackupChunk+work dom0\0")
    assert dec.header() is not None
    big = frames.encode_frame({"op": "put", "rid": 1, "id": ID, "type": 1, "data": bytes(frames.MAX_BLOB)})
    receive(dec, big[:10], 10)
    with dec.receive_buffer() as buffer:
        assert len(buffer) >= len(big) - 10  # the rest of the frame fits in one receive
    receive(dec, big[10:], 1 << 30)
    assert dec.frame()["data"] == bytes(frames.MAX_BLOB)
    dec = Decoder()
    dec.feed(b"h dom0\0")
    dec.header()
    receive(dec, struct.pack(">I", frames.MAX_FRAME + 1) + b"x" * 100, 1000)
    with dec.receive_buffer() as buffer:
        assert len(buffer) <= frames.RECEIVE_BUFFER  # a hostile length does not grow the buffer
    with pytest.raises(ProtocolError) as exc:
        dec.frame()
    assert code_of(exc) == "frame_too_large"
    with pytest.raises(ValueError):
        dec.received(dec.capacity + 1)


def test_frame_incomplete_returns_none():
    data = frame({"op": "bye", "rid": 1})
    for cut in range(len(data)):
        assert decode_one(data[:cut]) is None


def test_frame_length_zero():
    with pytest.raises(ProtocolError) as exc:
        decode_one(b"\0\0\0\0")
    assert code_of(exc) == "bad_frame"
    assert exc.value.fatal


@pytest.mark.parametrize("length", [frames.MAX_FRAME + 1, 2**32 - 1])
def test_frame_too_large_before_body(length):
    # only the 4 length bytes are there: rejected without waiting for (or allocating) the body
    with pytest.raises(ProtocolError) as exc:
        decode_one(struct.pack(">I", length))
    assert code_of(exc) == "frame_too_large"
    assert exc.value.fatal


def test_frame_of_max_size_accepted():
    head = msgpack.packb({"op": "put", "rid": 1, "data": b""}, use_bin_type=True)
    data_len = frames.MAX_FRAME - len(head) - 3  # bin32 header: 5 bytes, empty bin8: 2
    msg = {"op": "put", "rid": 1, "data": bytes(data_len)}
    payload = msgpack.packb(msg, use_bin_type=True)
    assert len(payload) == frames.MAX_FRAME
    assert decode_one(raw_frame(payload)) == msg


@pytest.mark.parametrize(
    "payload",
    [
        msgpack.packb([1, 2, 3]),
        msgpack.packb("hello"),
        msgpack.packb(None),
        msgpack.packb({"op": "bye"}) + b"\x00",  # trailing bytes
        msgpack.packb({"op": "bye"}) + msgpack.packb({"op": "bye"}),
        msgpack.packb({"op": "bye"})[:-1],  # truncated inside the payload
        msgpack.packb({b"op": "bye"}, use_bin_type=True),  # bin key
        msgpack.packb({1: "bye"}),  # int key
        b"\x81\x80\x01",  # map as key
        b"\xc1",  # never-used byte
        b"\x81\xa2op\xa1\xff",  # invalid utf-8 string
        b"\x81\xa2op\xc7\x00\x05",  # ext 8, length 0
        b"\x81\xa2op\xd4\x05\x00",  # fixext 1
        b"\x81\xa2op\xd6\xff\x00\x00\x00\x00",  # timestamp ext
        b"\x91" * 5000 + b"\x90",  # deep nesting
        b"\x81\xa2op\xdd\xff\xff\xff\xff",  # array claiming 2^32-1 items
        b"\x81\xa2op\xc6\xff\xff\xff\xff",  # bin claiming 2^32-1 bytes
    ],
)
def test_frame_bad_payload(payload):
    with pytest.raises(ProtocolError) as exc:
        decode_one(raw_frame(payload))
    assert code_of(exc) == "bad_frame"
    assert exc.value.fatal


@pytest.mark.parametrize(
    "payload",
    [
        b"\x81\xa2op" + b"\x91\x91\x90",  # array in array in map: deeper than 2
        b"\x81\xa2op\xdd\x00\x7f\xff\xf0" + b"\x90" * 0x7FFFF0,  # 8M empty arrays: depth
        b"\x81\xa2op\xdd\x00\x7f\xff\xf0" + b"\xc0" * 0x7FFFF0,  # 8M nils: too many objects
        b"\xde\xff\xff" + b"\xa0\xc0" * 0xFFFF,  # map of 65535 entries: 131071 objects
        b"\x82\xa2op\xc0",  # truncated: a value missing
        b"\x81\xa2op\xc4\x05abc",  # truncated bin
        b"\x81\xa2op\xdb\xff\xff\xff\xffabc",  # str claiming 4 GiB
        b"\x81\xa2op\xc9\x00\x00\x00\x01\x05x",  # ext 32
        b"\x81\xa2op\xd8\x05" + bytes(16),  # fixext 16
    ],
)
def test_check_shape_refuses(payload):
    with pytest.raises(ProtocolError) as exc:
        frames.check_shape(payload)
    assert code_of(exc) == "bad_frame"


def test_check_shape_accepts_the_largest_request():
    msg = {"op": "commit", "rid": 1, "id": ID, "data": bytes(frames.MAX_SNAPSHOT), "refs": [ID] * 65536}
    payload = msgpack.packb(msg, use_bin_type=True)
    assert len(payload) <= frames.MAX_FRAME
    frames.check_shape(payload)
    assert validate_request(decode_one(raw_frame(payload))).args["refs"] == [ID] * 65536


def test_encode_frame_oversized_is_internal():
    with pytest.raises(ProtocolError) as exc:
        frames.encode_frame({"op": "blob", "data": bytes(frames.MAX_FRAME)})
    assert code_of(exc) == "internal"


def test_error_message_shape():
    msg = frames.error_message(None, "bad_frame", "boom", extra=1)
    assert msg == {"op": "error", "rid": None, "code": "bad_frame", "message": "boom", "extra": 1}


def test_describe_escapes_and_truncates():
    text = frames.describe(b"\x1b[31m" + b"x" * 100)
    assert "\x1b" not in text and text.endswith("...")
    assert len(text) < 100


# --- request validation ------------------------------------------------------------

GOOD = [
    {"op": "hello", "rid": 0, "versions": [1], "client": "qbackup/0.1.0"},
    {"op": "init", "rid": 1, "config": b"cfg", "pack_size": 64 << 20},
    {"op": "init", "rid": 1, "config": bytes(frames.MAX_CONFIG), "pack_size": 8 << 20},
    {"op": "init", "rid": 1, "config": b"", "pack_size": 512 << 20},
    {"op": "open", "rid": 1, "write": True},
    {"op": "set_config", "rid": 2, "config": b"new", "expect": b"old"},
    {"op": "have", "rid": 3, "ids": [ID] * frames.MAX_BATCH},
    {"op": "have", "rid": 3, "ids": []},
    {"op": "put", "rid": 4, "id": ID, "type": 0, "data": b""},
    {"op": "put", "rid": 4, "id": ID, "type": 255, "data": bytes(frames.MAX_BLOB), "refs": [ID]},
    {"op": "flush", "rid": 5},
    {"op": "commit", "rid": 6, "id": ID, "data": bytes(frames.MAX_SNAPSHOT), "refs": [ID] * 5000},
    {"op": "list", "rid": 7},
    {"op": "get_snapshot", "rid": 8, "id": ID},
    {"op": "get", "rid": 9, "ids": [ID, ID]},
    {"op": "delete_snapshot", "rid": 10, "id": ID},
    {"op": "stats", "rid": 11},
    {"op": "bye", "rid": 2**63 - 1},
]


@pytest.mark.parametrize("msg", GOOD, ids=lambda m: m["op"])
def test_validate_good(msg):
    request = validate_request(decode_one(frame(msg)))
    assert request.op == msg["op"]
    assert request.rid == msg["rid"]
    assert request.args == {k: v for k, v in msg.items() if k not in ("op", "rid")}


BAD_REQUEST = [
    ({"op": "bye"}, None),
    ({"op": "bye", "rid": -1}, None),
    ({"op": "bye", "rid": 2**63}, None),
    ({"op": "bye", "rid": True}, None),
    ({"op": "bye", "rid": "1"}, None),
    ({"op": "bye", "rid": 1.0}, None),
    ({"rid": 1}, 1),
    ({"op": b"bye", "rid": 1}, 1),
    ({"op": "bye", "rid": 1, "extra": 1}, 1),
    ({"op": "open", "rid": 1}, 1),
    ({"op": "open", "rid": 1, "write": 1}, 1),
    ({"op": "open", "rid": 1, "write": None}, 1),
    ({"op": "hello", "rid": 0, "versions": 1, "client": "x"}, 0),
    ({"op": "hello", "rid": 0, "versions": [1, "2"], "client": "x"}, 0),
    ({"op": "hello", "rid": 0, "versions": [True], "client": "x"}, 0),
    ({"op": "hello", "rid": 0, "versions": [1], "client": b"x"}, 0),
    ({"op": "init", "rid": 1, "config": "cfg", "pack_size": 64 << 20}, 1),
    ({"op": "init", "rid": 1, "config": b"cfg", "pack_size": (8 << 20) - 1}, 1),
    ({"op": "init", "rid": 1, "config": b"cfg", "pack_size": (512 << 20) + 1}, 1),
    ({"op": "init", "rid": 1, "config": b"cfg", "pack_size": True}, 1),
    ({"op": "have", "rid": 3, "ids": [ID[:31]]}, 3),
    ({"op": "have", "rid": 3, "ids": [ID + b"x"]}, 3),
    ({"op": "have", "rid": 3, "ids": [ID] * (frames.MAX_BATCH + 1)}, 3),
    ({"op": "have", "rid": 3, "ids": ID}, 3),
    ({"op": "have", "rid": 3, "ids": [ID.hex()]}, 3),
    ({"op": "get", "rid": 3, "ids": {"a": ID}}, 3),
    ({"op": "put", "rid": 4, "id": ID[:31], "type": 1, "data": b""}, 4),
    ({"op": "put", "rid": 4, "id": ID, "type": 256, "data": b""}, 4),
    ({"op": "put", "rid": 4, "id": ID, "type": -1, "data": b""}, 4),
    ({"op": "put", "rid": 4, "id": ID, "type": False, "data": b""}, 4),
    ({"op": "put", "rid": 4, "id": ID, "type": 1, "data": "text"}, 4),
    ({"op": "put", "rid": 4, "id": ID, "type": 1, "data": b"", "refs": None}, 4),
    ({"op": "put", "rid": 4, "id": ID, "type": 1, "data": b"", "refs": [ID] * 4097}, 4),
    ({"op": "put", "rid": 4, "id": ID, "type": 1}, 4),
    ({"op": "commit", "rid": 6, "id": ID, "data": b""}, 6),
    ({"op": "commit", "rid": 6, "id": ID, "data": b"", "refs": [ID] * 65537}, 6),
    ({"op": "flush", "rid": 5, "ids": []}, 5),
    # a too-large field does not hide a type error elsewhere in the same request
    ({"op": "put", "rid": 4, "id": ID[:5], "type": 1, "data": bytes(frames.MAX_BLOB + 1)}, 4),
]


@pytest.mark.parametrize("msg, rid", BAD_REQUEST)
def test_validate_bad_request(msg, rid):
    with pytest.raises(ProtocolError) as exc:
        validate_request(msg)
    assert code_of(exc) == "bad_request"
    assert exc.value.rid == rid
    assert exc.value.fatal


@pytest.mark.parametrize(
    "msg",
    [
        {"op": "put", "rid": 4, "id": ID, "type": 1, "data": bytes(frames.MAX_BLOB + 1)},
        {"op": "commit", "rid": 4, "id": ID, "data": bytes(frames.MAX_SNAPSHOT + 1), "refs": []},
        {"op": "init", "rid": 4, "config": bytes(frames.MAX_CONFIG + 1), "pack_size": 8 << 20},
        {"op": "set_config", "rid": 4, "config": b"", "expect": bytes(frames.MAX_CONFIG + 1)},
    ],
)
def test_validate_too_large(msg):
    with pytest.raises(ProtocolError) as exc:
        validate_request(msg)
    assert code_of(exc) == "too_large"
    assert exc.value.rid == 4
    assert not exc.value.fatal


@pytest.mark.parametrize("op", ["", "HELLO", "compact", "get ", "x" * 1000])
def test_validate_unknown_op(op):
    with pytest.raises(ProtocolError) as exc:
        validate_request({"op": op, "rid": 7})
    assert code_of(exc) == "unknown_op"
    assert exc.value.rid == 7
    assert not exc.value.fatal
    assert len(exc.value.message) < 200


# --- property tests ----------------------------------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=40)
    | st.sampled_from([ID, ID[:31], ID + b"\0"]),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=10) | st.sampled_from(list(frames._SCHEMAS)), children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64), st.booleans())
def test_receive_buffer_and_feed_decode_alike(data, cut, with_header):
    """The same hostile bytes, fed or received into the decoder's buffer in
    pieces, give the same frames and the same error."""

    def run(deliver):
        dec = Decoder()
        out = []
        try:
            if with_header:
                deliver(dec, b"qubes.BackupChunk+w dom0\0")
                dec.header()
            for start in range(0, len(data), cut):
                deliver(dec, data[start : start + cut])
                while (msg := dec.frame()) is not None:
                    out.append(msg)
        except (ProtocolError, HeaderError) as exc:
            out.append((type(exc), getattr(exc, "code", None)))
        assert dec.capacity <= frames.RECEIVE_BUFFER + len(data) + 4
        return out

    assert run(lambda dec, chunk: receive(dec, chunk, cut)) == run(Decoder.feed)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(min_value=1, max_value=64), max_size=20))
def test_decoder_arbitrary_bytes_only_codec_errors(data, cuts):
    dec = Decoder()
    pos = 0
    try:
        for cut in cuts + [len(data)]:
            dec.feed(data[pos : pos + cut])
            pos += cut
            if dec.header() is not None:
                break
        dec.feed(data[pos:])
        while (msg := dec.frame()) is not None:
            validate_request(msg)
    except (ProtocolError, HeaderError):
        pass


stream_payloads = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.builds(lambda m: msgpack.packb(m, use_bin_type=True), st.dictionaries(
        st.sampled_from(["op", "rid", "id", "ids", "type", "data", "refs", "write", "config",
                         "pack_size", "versions", "client", "expect", "x"]),
        msgpack_values, max_size=6)),
    st.builds(lambda op, rid, rest: msgpack.packb({"op": op, "rid": rid, **rest}, use_bin_type=True),
              st.sampled_from(sorted(frames._SCHEMAS)), st.integers(-1, 2**63),
              st.dictionaries(st.sampled_from(["id", "ids", "type", "data", "refs", "write"]),
                              msgpack_values, max_size=3)),
)


@settings(max_examples=150, deadline=None)
@given(
    header=st.one_of(st.sampled_from([b"qubes.BackupChunk+work dom0", b"qubes.BackupChunk dom0",
                                      b"qubes.BackupChunk+work sys-net"]),
                     st.binary(max_size=60).filter(lambda b: b"\0" not in b)),
    payloads=st.lists(stream_payloads, min_size=1, max_size=4),
    tail=st.binary(max_size=40),
    cut=st.integers(min_value=1, max_value=97),
)
def test_stream_after_a_header_reaches_decoding_and_validation(header, payloads, tail, cut):
    """Header, then well-framed payloads (arbitrary bytes or msgpack maps),
    then garbage, fed in pieces: past a valid header every frame reaches
    decode_payload, every map reaches validate_request, and nothing but a
    codec error comes out."""
    data = header + b"\0" + b"".join(raw_frame(p) for p in payloads) + tail
    dec = Decoder()
    decoded = validated = 0
    try:
        for start in range(0, len(data), cut):
            dec.feed(data[start:start + cut])
            if dec.header() is not None:
                break
        parse_header(header)
        dec.feed(data[start + cut:])
        for payload in payloads:
            try:
                msg = dec.frame()
            except ProtocolError as exc:
                assert exc.code == "bad_frame"
                decoded += 1
                continue
            assert msg == frames.decode_payload(payload)
            decoded += 1
            try:
                validate_request(msg)
            except ProtocolError as exc:
                assert exc.code in ("bad_request", "unknown_op", "too_large")
            validated += 1
    except HeaderError:
        return
    assert decoded == len(payloads) and validated <= decoded


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_frame_arbitrary_payload_only_codec_errors(payload):
    try:
        msg = decode_one(raw_frame(payload))
        assert isinstance(msg, dict)
        validate_request(msg)
    except ProtocolError as exc:
        assert exc.code in ("bad_frame", "bad_request", "unknown_op", "too_large")


def depth(value) -> int:
    if isinstance(value, (list, dict)):
        children = list(value.values()) + list(value) if isinstance(value, dict) else value
        return 1 + max(map(depth, children), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(msgpack_values)
def test_check_shape_agrees_with_msgpack(value):
    """The shape walk accepts exactly the well-formed payloads within the nesting limit."""
    payload = msgpack.packb(value, use_bin_type=True)
    if depth(value) <= frames.MAX_DEPTH:
        frames.check_shape(payload)
    else:
        with pytest.raises(ProtocolError):
            frames.check_shape(payload)
    for cut in (1, len(payload) // 2):
        if cut < len(payload):
            try:
                frames.check_shape(payload[:-cut])
            except ProtocolError:
                pass
            else:  # a prefix that passes the walk must still fail to decode
                with pytest.raises(ProtocolError):
                    frames.decode_payload(payload[:-cut])


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["op", "rid", "id", "ids", "type", "data", "refs", "write", "config"]),
        msgpack_values,
    ),
    st.sampled_from(list(frames._SCHEMAS)),
)
def test_validator_arbitrary_objects_only_codec_errors(fields, op):
    msg = {"op": op, "rid": 1, **fields}
    try:
        request = validate_request(decode_one(frame(msg)))
    except ProtocolError as exc:
        assert exc.code in ("bad_frame", "bad_request", "unknown_op", "too_large")
    else:
        assert request.op == msg["op"] and request.rid == msg["rid"]


ids = st.binary(min_size=32, max_size=32)
rids = st.integers(min_value=0, max_value=2**63 - 1)
valid_requests = st.one_of(
    st.fixed_dictionaries({"op": st.just("have"), "rid": rids, "ids": st.lists(ids, max_size=20)}),
    st.fixed_dictionaries(
        {"op": st.just("put"), "rid": rids, "id": ids, "type": st.integers(0, 255), "data": st.binary()},
        optional={"refs": st.lists(ids, max_size=5)},
    ),
    st.fixed_dictionaries(
        {"op": st.just("commit"), "rid": rids, "id": ids, "data": st.binary(), "refs": st.lists(ids, max_size=5)}
    ),
    st.fixed_dictionaries({"op": st.just("open"), "rid": rids, "write": st.booleans()}),
    st.fixed_dictionaries(
        {"op": st.just("hello"), "rid": rids, "versions": st.lists(st.integers(0, 2**32)), "client": st.text()}
    ),
    st.fixed_dictionaries({"op": st.sampled_from(["flush", "list", "stats", "bye"]), "rid": rids}),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(valid_requests, min_size=1, max_size=5), st.integers(min_value=1, max_value=50))
def test_valid_requests_roundtrip(msgs, chunk):
    data = b"".join(frames.encode_frame(m) for m in msgs)
    dec = Decoder()
    out = []
    for start in range(0, len(data), chunk):
        dec.feed(data[start : start + chunk])
        while (msg := dec.frame()) is not None:
            out.append(validate_request(msg))
    assert [(r.op, r.rid, r.args) for r in out] == [
        (m["op"], m["rid"], {k: v for k, v in m.items() if k not in ("op", "rid")}) for m in msgs
    ]


@pytest.mark.parametrize("op, since", sorted(frames.SINCE.items()))
def test_later_ops_are_unknown_in_an_older_session(op, since):
    with pytest.raises(ProtocolError) as exc:
        validate_request({"op": op, "rid": 3, "junk": object()}, version=since - 1)
    assert code_of(exc) == "unknown_op" and not exc.value.fatal


@pytest.mark.parametrize(
    "msg",
    [
        {"op": "gc", "rid": 1, "repack_below": 101, "dry_run": False},
        {"op": "gc", "rid": 1, "repack_below": -1, "dry_run": False},
        {"op": "gc", "rid": 1, "repack_below": True, "dry_run": False},
        {"op": "gc", "rid": 1, "repack_below": 50, "dry_run": 0},
        {"op": "gc", "rid": 1, "repack_below": 50},
        {"op": "check", "rid": 1, "read_data": "yes"},
        {"op": "check", "rid": 1, "read_data": True, "extra": 1},
        {"op": "usage", "rid": 1, "snapshot": ID},
        {"op": "delete_snapshots", "rid": 1, "ids": [ID] * (frames.MAX_BATCH + 1)},
        {"op": "delete_snapshots", "rid": 1, "ids": [b"short"]},
        {"op": "delete_snapshots", "rid": 1, "ids": ID},
        {"op": "locate", "rid": 1, "ids": [ID] * (frames.MAX_BATCH + 1)},
        {"op": "locate", "rid": 1, "ids": [ID, ID[:31]]},
        {"op": "locate", "rid": 1, "ids": [ID + b"x"]},
        {"op": "locate", "rid": 1, "ids": ID},
        {"op": "locate", "rid": 1},
        {"op": "locate", "rid": 1, "ids": [], "keys": []},
    ],
)
def test_later_ops_validate_their_fields(msg):
    with pytest.raises(ProtocolError) as exc:
        validate_request(msg, version=3)
    assert code_of(exc) == "bad_request" and exc.value.rid == 1


def test_later_ops_accepted():
    assert validate_request({"op": "gc", "rid": 1, "repack_below": 0, "dry_run": True}).args == {
        "repack_below": 0,
        "dry_run": True,
    }
    assert validate_request({"op": "delete_snapshots", "rid": 1, "ids": [ID, ID]}).args == {"ids": [ID, ID]}
    assert validate_request({"op": "locate", "rid": 1, "ids": [ID] * frames.MAX_BATCH}).args == {"ids": [ID] * 4096}
