# SPDX-License-Identifier: GPL-2.0-or-later
"""Pack files: the immutable containers of a repository's blobs.

A pack is a header, a run of blob records (each with its own CRC-32), a
plaintext trailer listing every record (id, type, offset, length, refs) and a
fixed-size footer (trailer position, trailer CRC-32, SHA-256 of everything
before the footer, version, magic).  The trailer lets the index be rebuilt
from packs alone and the SHA-256 lets bit rot be found, both without keys.
Byte layouts: docs/FORMAT.md.

Files on disk are not authenticated: every length read from a pack is
bounds-checked (``Bounds``) before anything is allocated, and every problem is
a ``PackError``.
"""

import hashlib
import os
import struct
import zlib
from dataclasses import dataclass

from .fsdir import Dir

FORMAT_VERSION = 1
ID_SIZE = 32
MAX_ENTRIES = 65536  # records per pack: bounds a writer's and a reader's memory

MAGIC = b"QBKPACK\x00"
END_MAGIC = b"QBKPEND\x00"

_HEADER = struct.Struct(">8sI")  # magic, version
_RECORD = struct.Struct(">32sBI")  # id, type, data length (then crc32, data)
_CRC = struct.Struct(">I")
_COUNT = struct.Struct(">I")  # trailer: entry count
_ENTRY = struct.Struct(">32sBQII")  # id, type, record offset, data length, ref count
_FOOTER = struct.Struct(">QQI32sI8s")  # trailer offset, length, crc32, sha256, version, magic

HEADER_SIZE = _HEADER.size  # 12
RECORD_HEADER_SIZE = _RECORD.size + _CRC.size  # 41
ENTRY_SIZE = _ENTRY.size  # 49
FOOTER_SIZE = _FOOTER.size  # 64


class PackError(Exception):
    """A pack file is malformed, truncated, out of bounds or fails a checksum."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One blob of a pack, as listed in its trailer."""

    id: bytes
    type: int
    offset: int  # of the record (its header) in the pack file
    length: int  # of the blob data
    refs: bytes  # the referenced ids, concatenated (32 bytes each)


@dataclass(frozen=True)
class Bounds:
    """Largest values a reader accepts from a pack file."""

    max_data: int  # blob data length
    max_refs: int  # refs of one blob
    max_file: int  # pack file size


@dataclass(frozen=True)
class Trailer:
    """What a pack's footer and trailer say."""

    entries: list[Entry]
    file_size: int


def _record_header(id: bytes, type: int, data: bytes) -> bytes:
    """The 41-byte header of the record holding ``data``."""
    head = _RECORD.pack(id, type, len(data))
    return head + _CRC.pack(zlib.crc32(data, zlib.crc32(head)))


class PackWriter:
    """Appends records to a new pack file, then seals it (trailer, footer, fsync).

    Nothing is renamed or indexed here; the caller does that after ``seal``.
    A failed append leaves the writer as it was (later writes overwrite the
    partial bytes and ``seal`` truncates to the exact length).
    """

    def __init__(self, directory: Dir, name: str):
        self.directory = directory
        self.name = name
        self._fd = directory.open_file(name, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        self._hash = hashlib.sha256()
        self._entries: dict[bytes, Entry] = {}
        self._end = 0
        self._trailer_size = _COUNT.size
        try:
            self._append(_HEADER.pack(MAGIC, FORMAT_VERSION))
        except BaseException:
            self.abort()
            raise

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """Size of the pack file if it were sealed now."""
        return self._end + self._trailer_size + FOOTER_SIZE

    def _append(self, *parts: bytes) -> None:
        """Write ``parts`` one after the other at the end, with one system call."""
        _pwritev_all(self._fd, parts, self._end)
        for part in parts:
            self._hash.update(part)
            self._end += len(part)

    def add(self, id: bytes, type: int, data: bytes, refs: bytes) -> None:
        """Append one blob (the caller has validated and deduplicated it)."""
        entry = Entry(id, type, self._end, len(data), refs)
        self._append(_record_header(id, type, data), data)
        self._entries[id] = entry
        self._trailer_size += ENTRY_SIZE + len(refs)

    def find(self, id: bytes) -> Entry | None:
        return self._entries.get(id)

    def read(self, entry: Entry) -> bytes:
        """Read back (and check) a blob of this not yet sealed pack."""
        return read_blob(self._fd, entry.id, entry.type, entry.offset, entry.length)

    def seal(self) -> Trailer:
        """Write trailer and footer, fsync and close the file."""
        entries = list(self._entries.values())
        trailer = bytearray(_COUNT.pack(len(entries)))
        for e in entries:
            trailer += _ENTRY.pack(e.id, e.type, e.offset, e.length, len(e.refs) // ID_SIZE)
            trailer += e.refs
        data_end = self._end
        self._append(bytes(trailer))
        footer = _FOOTER.pack(
            data_end, len(trailer), zlib.crc32(trailer), self._hash.digest(), FORMAT_VERSION, END_MAGIC
        )
        _pwrite_all(self._fd, footer, self._end)
        file_size = self._end + FOOTER_SIZE
        os.ftruncate(self._fd, file_size)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        return Trailer(entries, file_size)

    def abort(self) -> None:
        """Close and remove the unfinished file (best effort)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            self.directory.unlink(self.name)
        except OSError:
            pass


def read_blob(fd: int, id: bytes, type: int, offset: int, length: int) -> bytes:
    """Read one record with a single pread and check its id, type, length and CRC.

    ``length`` must already be bounded by the caller (it comes from the index).
    """
    buf = _pread_exact(fd, RECORD_HEADER_SIZE + length, offset)
    _check_record(buf, id, type, length)
    return buf[RECORD_HEADER_SIZE:]


def read_trailer(fd: int, bounds: Bounds) -> Trailer:
    """Read and validate header, footer and trailer (not the records)."""
    return _load(fd, bounds)[0]


@dataclass(frozen=True)
class Scan:
    """What reading every byte of a pack found."""

    trailer: Trailer
    bad: list[tuple[Entry, str]]  # records that fail their CRC-32 (or header), with the reason
    digest_ok: bool  # the SHA-256 of the whole pack matches its footer


_SCAN_READ = 1 << 20  # bytes read at a time when scanning records


def scan_pack(fd: int, bounds: Bounds) -> Scan:
    """Read the whole pack: every record's CRC-32, then the SHA-256.

    A pack whose footer or trailer is unusable raises ``PackError`` (its
    records cannot be told apart); otherwise every damaged record is listed,
    so a caller knows exactly which blobs are lost.  Records are read in
    order, about a MiB at a time (memory: that, or one record).
    """
    trailer, raw_trailer, digest = _load(fd, bounds)
    hasher = hashlib.sha256(_pread_exact(fd, HEADER_SIZE, 0))
    bad = []
    last = trailer.entries[-1] if trailer.entries else None
    records_end = last.offset + RECORD_HEADER_SIZE + last.length if last else 0
    buf, buf_at = memoryview(b""), 0
    for e in trailer.entries:
        size = RECORD_HEADER_SIZE + e.length
        if e.offset + size > buf_at + len(buf):
            buf_at = e.offset
            buf = memoryview(_pread_exact(fd, max(size, min(_SCAN_READ, records_end - e.offset)), e.offset))
        record = buf[e.offset - buf_at : e.offset - buf_at + size]
        try:
            _check_record(record, e.id, e.type, e.length)
        except PackError as err:
            bad.append((e, str(err)))
        hasher.update(record)
    hasher.update(raw_trailer)
    return Scan(trailer, bad, hasher.digest() == digest)


def verify_pack(fd: int, bounds: Bounds) -> Trailer:
    """Read the whole pack: trailer, every record's CRC and the SHA-256; PackError on the first problem."""
    scan = scan_pack(fd, bounds)
    if scan.bad:
        raise PackError(scan.bad[0][1])
    if not scan.digest_ok:
        raise PackError("pack checksum mismatch (SHA-256)")
    return scan.trailer


def _load(fd: int, bounds: Bounds) -> tuple[Trailer, bytes, bytes]:
    size = os.fstat(fd).st_size
    if size < HEADER_SIZE + _COUNT.size + FOOTER_SIZE:
        raise PackError(f"truncated pack ({size} bytes)")
    if size > bounds.max_file:
        raise PackError(f"pack of {size} bytes is over the limit of {bounds.max_file}")
    magic, version = _HEADER.unpack(_pread_exact(fd, HEADER_SIZE, 0))
    if magic != MAGIC:
        raise PackError("bad pack header magic")
    if version != FORMAT_VERSION:
        raise PackError(f"unsupported pack version {version}")
    data_end, trailer_len, trailer_crc, digest, version, magic = _FOOTER.unpack(
        _pread_exact(fd, FOOTER_SIZE, size - FOOTER_SIZE)
    )
    if magic != END_MAGIC:
        raise PackError("bad pack footer magic (truncated or not a pack)")
    if version != FORMAT_VERSION:
        raise PackError(f"unsupported pack footer version {version}")
    if data_end < HEADER_SIZE or trailer_len < _COUNT.size or data_end + trailer_len != size - FOOTER_SIZE:
        raise PackError(f"bad trailer position {data_end}+{trailer_len} in a pack of {size} bytes")
    raw = _pread_exact(fd, trailer_len, data_end)
    if zlib.crc32(raw) != trailer_crc:
        raise PackError("trailer checksum mismatch (CRC-32)")
    entries = _parse_trailer(raw, data_end, bounds)
    return Trailer(entries, size), raw, digest


def _parse_trailer(raw: bytes, data_end: int, bounds: Bounds) -> list[Entry]:
    (count,) = _COUNT.unpack_from(raw, 0)
    if count > MAX_ENTRIES:
        raise PackError(f"trailer lists {count} entries, over the limit of {MAX_ENTRIES}")
    pos = _COUNT.size
    expected = HEADER_SIZE
    seen: set[bytes] = set()
    entries = []
    for _ in range(count):
        if pos + ENTRY_SIZE > len(raw):
            raise PackError("trailer truncated")
        id, type, offset, length, nrefs = _ENTRY.unpack_from(raw, pos)
        pos += ENTRY_SIZE
        if offset != expected:
            raise PackError(f"record offset {offset} does not follow the previous record ({expected})")
        if length > bounds.max_data:
            raise PackError(f"record length {length} is over the limit of {bounds.max_data}")
        expected = offset + RECORD_HEADER_SIZE + length
        if expected > data_end:
            raise PackError(f"record at {offset} runs past the trailer at {data_end}")
        if nrefs > bounds.max_refs:
            raise PackError(f"record at {offset} has {nrefs} refs, over the limit of {bounds.max_refs}")
        refs_end = pos + nrefs * ID_SIZE
        if refs_end > len(raw):
            raise PackError("trailer truncated in a ref list")
        if id in seen:
            raise PackError(f"id {id.hex()} listed twice")
        seen.add(id)
        entries.append(Entry(id, type, offset, length, raw[pos:refs_end]))
        pos = refs_end
    if pos != len(raw):
        raise PackError(f"{len(raw) - pos} stray bytes after the trailer entries")
    if expected != data_end:
        raise PackError(f"records end at {expected}, the trailer starts at {data_end}")
    return entries


def _check_record(buf: bytes, id: bytes, type: int, length: int) -> None:
    head = buf[: _RECORD.size]
    got_id, got_type, got_length = _RECORD.unpack(head)
    (crc,) = _CRC.unpack_from(buf, _RECORD.size)
    if got_id != id or got_type != type or got_length != length:
        raise PackError(f"record at the indexed place is not blob {id.hex()} (type {type}, {length} bytes)")
    if zlib.crc32(memoryview(buf)[RECORD_HEADER_SIZE:], zlib.crc32(head)) != crc:
        raise PackError(f"blob {id.hex()} fails its CRC-32")


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    while len(data) < n:
        more = os.pread(fd, n - len(data), offset + len(data))
        if not more:
            raise PackError(f"truncated pack: {n} bytes wanted at offset {offset}, {len(data)} present")
        data += more
    return data


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _pwritev_all(fd: int, parts: tuple[bytes, ...], offset: int) -> None:
    """Write ``parts`` contiguously at ``offset``: one pwritev, and more only after a short write."""
    written = os.pwritev(fd, parts, offset)
    for part in parts:
        if written < len(part):
            _pwrite_all(fd, memoryview(part)[written:], offset + written)
        offset += len(part)
        written = max(0, written - len(part))
