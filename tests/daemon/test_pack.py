# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests of the pack file writer and reader (qbackupd.pack): round trip, the
byte layout of docs/FORMAT.md (packs are built here independently of the
writer), and hostile packs: truncated, bad magic, bad checksums, absurd
lengths, shuffled records."""

import hashlib
import os
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qbackupd import pack
from qbackupd.fsdir import Dir
from qbackupd.pack import Bounds, PackError, PackWriter, read_blob, read_trailer, verify_pack

BOUNDS = Bounds(max_data=1 << 20, max_refs=16, max_file=16 << 20)


def ident(n: int) -> bytes:
    return hashlib.sha256(n.to_bytes(4, "big")).digest()


BLOBS = [
    (ident(1), 1, b"first blob", []),
    (ident(2), 0, b"", []),
    (ident(3), 255, os.urandom(70000), [ident(1), ident(2)]),
    (ident(4), 2, b"x" * 33, [ident(3)]),
]


# --- an independent encoder of the documented layout ---------------------------


def record(id: bytes, type: int, data: bytes) -> bytes:
    head = id + bytes([type]) + struct.pack(">I", len(data))
    return head + struct.pack(">I", zlib.crc32(head + data)) + data


def entry(id: bytes, type: int, offset: int, length: int, refs: list[bytes]) -> bytes:
    return id + bytes([type]) + struct.pack(">QII", offset, length, len(refs)) + b"".join(refs)


def build(blobs, *, trailer: bytes | None = None, version: int = 1) -> bytes:
    """A pack as FORMAT.md describes it; ``trailer`` replaces the computed one."""
    body = b"QBKPACK\x00" + struct.pack(">I", version)
    entries = []
    for id, type, data, refs in blobs:
        entries.append(entry(id, type, len(body), len(data), refs))
        body += record(id, type, data)
    if trailer is None:
        trailer = struct.pack(">I", len(entries)) + b"".join(entries)
    data_end = len(body)
    body += trailer
    footer = struct.pack(">QQI", data_end, len(trailer), zlib.crc32(trailer))
    footer += hashlib.sha256(body).digest() + struct.pack(">I", version) + b"QBKPEND\x00"
    return body + footer


@pytest.fixture
def opened(tmp_path):
    """Write bytes to a new file and return it opened for reading."""
    fds = []

    def _open(raw: bytes) -> int:
        path = tmp_path / f"p{len(fds)}.pack"
        path.write_bytes(raw)
        fds.append(os.open(path, os.O_RDONLY))
        return fds[-1]

    yield _open
    for fd in fds:
        os.close(fd)


def new_writer(tmp_path: Path, name: str) -> PackWriter:
    return PackWriter(Dir.open_root(tmp_path), name)


def written_by_writer(tmp_path: Path, blobs=BLOBS) -> tuple[Path, pack.Trailer]:
    w = new_writer(tmp_path, "w.tmp")
    for id, type, data, refs in blobs:
        w.add(id, type, data, b"".join(refs))
    return tmp_path / "w.tmp", w.seal()


# --- round trip ----------------------------------------------------------------


def test_writer_matches_documented_layout(tmp_path):
    path, trailer = written_by_writer(tmp_path)
    assert path.read_bytes() == build(BLOBS)
    assert trailer.file_size == path.stat().st_size


def test_round_trip(tmp_path):
    path, sealed = written_by_writer(tmp_path)
    fd = os.open(path, os.O_RDONLY)
    try:
        for got in (read_trailer(fd, BOUNDS), verify_pack(fd, BOUNDS)):
            assert got == sealed
            assert [(e.id, e.type, e.length, e.refs) for e in got.entries] == [
                (id, type, len(data), b"".join(refs)) for id, type, data, refs in BLOBS
            ]
        for e, (_, _, data, _) in zip(sealed.entries, BLOBS):
            assert read_blob(fd, e.id, e.type, e.offset, e.length) == data
    finally:
        os.close(fd)


def test_writer_reads_back_before_seal(tmp_path):
    w = new_writer(tmp_path, "w.tmp")
    try:
        for id, type, data, refs in BLOBS:
            w.add(id, type, data, b"".join(refs))
        assert len(w) == len(BLOBS)
        for id, _, data, _ in BLOBS:
            assert w.read(w.find(id)) == data
        assert w.find(ident(99)) is None
        assert w.size == len(build(BLOBS))
    finally:
        w.abort()
    assert not (tmp_path / "w.tmp").exists()


def test_empty_pack_is_valid(tmp_path, opened):
    w = new_writer(tmp_path, "e.tmp")
    assert w.seal().entries == []
    assert verify_pack(opened((tmp_path / "e.tmp").read_bytes()), BOUNDS).entries == []


def test_failed_append_leaves_writer_consistent(tmp_path, monkeypatch, opened):
    """A write that fails half way (disk full) stores nothing; later blobs are fine."""
    w = new_writer(tmp_path, "w.tmp")
    w.add(*BLOBS[0][:3], b"")
    real_pwritev = os.pwritev

    def half_then_fail(fd, parts, offset):
        record = b"".join(parts)
        os.pwrite(fd, record[: len(record) // 2], offset)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwritev", half_then_fail)
    with pytest.raises(OSError):
        w.add(*BLOBS[2][:3], b"")
    monkeypatch.setattr(os, "pwritev", real_pwritev)
    assert w.find(BLOBS[2][0]) is None
    w.add(*BLOBS[1][:3], b"")
    w.seal()
    trailer = verify_pack(opened((tmp_path / "w.tmp").read_bytes()), BOUNDS)
    assert [e.id for e in trailer.entries] == [BLOBS[0][0], BLOBS[1][0]]


@pytest.mark.parametrize("short", [0, 1, 40, 41, 42, 300])
def test_short_pwritev_is_completed(tmp_path, monkeypatch, opened, short):
    """A record's header and data go out in one pwritev; when the kernel
    writes only part (``short`` bytes), the rest still lands in place."""
    real_pwritev = os.pwritev
    calls = []

    def write_short(fd, parts, offset):
        calls.append(len(parts))
        record = b"".join(parts)
        return real_pwritev(fd, [record[:short]], offset) if short else 0

    w = new_writer(tmp_path, "s.tmp")
    monkeypatch.setattr(os, "pwritev", write_short)
    for id, type, data, _ in BLOBS[:2]:
        w.add(id, type, data, b"")
    monkeypatch.setattr(os, "pwritev", real_pwritev)
    assert calls == [2, 2]
    w.seal()
    trailer = verify_pack(opened((tmp_path / "s.tmp").read_bytes()), BOUNDS)
    assert [e.id for e in trailer.entries] == [BLOBS[0][0], BLOBS[1][0]]


# --- hostile packs -------------------------------------------------------------


def flip(raw: bytes, pos: int) -> bytes:
    return raw[:pos] + bytes([raw[pos] ^ 0x01]) + raw[pos + 1 :]


GOOD = build(BLOBS)
TRAILER_AT = struct.unpack(">Q", GOOD[-64:-56])[0]


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"", "truncated"),
        (GOOD[:40], "truncated"),
        (GOOD[:-1], "footer magic"),
        (GOOD[: TRAILER_AT + 10], "footer magic"),
        (GOOD[:100] + GOOD[-64:], "trailer position"),
        (GOOD + b"\0", "footer magic"),
        (b"XBKPACK\x00" + GOOD[8:], "header magic"),
        (GOOD[:-8] + b"QBKPEND\x01", "footer magic"),
        (build(BLOBS, version=2), "unsupported pack version"),
        (GOOD[:8] + struct.pack(">I", 1) + GOOD[12:-12] + struct.pack(">I", 7) + GOOD[-8:], "footer version"),
        (flip(GOOD, TRAILER_AT + 6), "trailer checksum"),
        (flip(GOOD, len(GOOD) - 64 + 17), "trailer checksum"),
        (GOOD[:-64] + struct.pack(">QQ", 2**63, 2**63) + GOOD[-48:], "trailer position"),
        (GOOD[:-64] + struct.pack(">QQ", 0, TRAILER_AT + 4) + GOOD[-48:], "trailer position"),
        (GOOD[:-64] + struct.pack(">QQ", len(GOOD) - 64, 0) + GOOD[-48:], "trailer position"),
        (b"\0" * 200, "header magic"),
    ],
)
def test_hostile_footer_and_header(opened, raw, message):
    fd = opened(raw)
    for reader in (read_trailer, verify_pack):
        with pytest.raises(PackError, match=message):
            reader(fd, BOUNDS)


def trailer_of(*entries: bytes, count: int | None = None) -> bytes:
    return struct.pack(">I", len(entries) if count is None else count) + b"".join(entries)


A, B = ident(1), ident(2)
REC_A = 12 + 41 + 3  # offset after a 3-byte record of A


@pytest.mark.parametrize(
    "blobs, trailer, message",
    [
        ([], trailer_of(count=2**32 - 1), "over the limit"),
        ([], trailer_of(count=1), "trailer truncated"),
        ([], trailer_of() + b"\0", "stray bytes"),
        ([(A, 1, b"abc", [])], trailer_of(), "records end at 12"),
        ([(A, 1, b"abc", [])], trailer_of(entry(A, 1, 13, 3, [])), "does not follow"),
        ([(A, 1, b"abc", [])], trailer_of(entry(A, 1, 12, 2**32 - 1, [])), "record length"),
        ([(A, 1, b"abc", [])], trailer_of(entry(A, 1, 12, 4, [])), "runs past the trailer"),
        ([(A, 1, b"abc", [])], trailer_of(entry(A, 1, 12, 3, [B] * 17)), "17 refs"),
        ([(A, 1, b"abc", [])], trailer_of(entry(A, 1, 12, 3, [B])[:-5]), "ref list"),
        ([(A, 1, b"abc", [])], trailer_of(entry(A, 1, 12, 3, []))[:-1], "trailer truncated"),
        (
            [(A, 1, b"abc", []), (A, 1, b"abc", [])],
            trailer_of(entry(A, 1, 12, 3, []), entry(A, 1, REC_A, 3, [])),
            "listed twice",
        ),
        (
            [(A, 1, b"abc", []), (B, 1, b"abc", [])],
            trailer_of(entry(B, 1, REC_A, 3, []), entry(A, 1, 12, 3, [])),
            "does not follow",
        ),
    ],
)
def test_hostile_trailer(opened, blobs, trailer, message):
    """Trailers with valid checksums but absurd or inconsistent contents."""
    fd = opened(build(blobs, trailer=trailer))
    with pytest.raises(PackError, match=message):
        read_trailer(fd, BOUNDS)


def test_pack_over_size_limit(tmp_path):
    path = tmp_path / "huge.pack"
    with open(path, "wb") as f:
        f.truncate(64 << 30)  # sparse: nothing may be read or allocated
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(PackError, match="over the limit"):
            read_trailer(fd, BOUNDS)
    finally:
        os.close(fd)


def test_flipped_digest_found_by_verify_only(opened):
    fd = opened(flip(GOOD, len(GOOD) - 64 + 20))
    assert read_trailer(fd, BOUNDS).entries
    with pytest.raises(PackError, match="SHA-256"):
        verify_pack(fd, BOUNDS)


def test_bit_rot_in_data_found_by_verify_and_get(opened):
    """A flipped data bit passes the trailer read but not verify_pack or read_blob."""
    first = 12 + 41
    fd = opened(flip(GOOD, first + 2))
    trailer = read_trailer(fd, BOUNDS)
    with pytest.raises(PackError, match="CRC-32"):
        verify_pack(fd, BOUNDS)
    e = trailer.entries[0]
    with pytest.raises(PackError, match="CRC-32"):
        read_blob(fd, e.id, e.type, e.offset, e.length)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(id=ident(7)), "is not blob"),
        (dict(type=9), "is not blob"),
        (dict(length=4), "is not blob"),
        (dict(offset=13), "is not blob"),
        (dict(offset=len(GOOD) - 20), "truncated pack"),
    ],
)
def test_read_blob_checks_the_record(opened, change, message):
    fd = opened(GOOD)
    e = read_trailer(fd, BOUNDS).entries[3]
    args = dict(id=e.id, type=e.type, offset=e.offset, length=e.length) | change
    with pytest.raises(PackError, match=message):
        read_blob(fd, **args)


def test_verify_catches_swapped_records(opened):
    """Two records swapped under an intact trailer are found."""
    one, two = record(A, 1, b"abc"), record(B, 1, b"xyz")
    raw = build([(A, 1, b"abc", []), (B, 1, b"xyz", [])])
    swapped = raw.replace(one + two, two + one)
    with pytest.raises(PackError):
        verify_pack(opened(swapped), BOUNDS)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(0, len(GOOD) - 1), value=st.integers(1, 255))
def test_any_changed_byte_is_detected(opened, pos, value):
    raw = GOOD[:pos] + bytes([GOOD[pos] ^ value]) + GOOD[pos + 1 :]
    with pytest.raises(PackError):
        verify_pack(opened(raw), BOUNDS)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=400), st.integers(0, len(GOOD) - 1).map(lambda n: GOOD[:n])))
def test_garbage_only_raises_pack_error(opened, raw):
    fd = opened(raw)
    for reader in (read_trailer, verify_pack):
        with pytest.raises(PackError):
            reader(fd, BOUNDS)
