# SPDX-License-Identifier: GPL-2.0-or-later
"""Reflink copies (FICLONE) and what changed between two of them (FIEMAP).

Both are ioctls on file descriptors (`fcntl`), no subprocess. `clone` makes
a copy that shares every extent of its source. `changed_ranges(base, new)`
compares the extent maps of two copies of one image on the same file system
and returns the byte ranges of `new` whose content may differ from `base`:

- a range mapped in both files to the same physical bytes (a shared extent,
  reached at the same offset) holds the same data: unchanged;
- a range that reads as zeros in both (a hole, or an unwritten =
  preallocated extent) is unchanged;
- everything else is changed: different physical bytes, data on one side
  and zeros on the other, and every extent whose physical address does not
  name its bytes one to one: inline data, delayed allocation (unknown
  address), compressed or encrypted extents (btrfs reports the start of the
  compressed extent, not which part of it a file uses), extents not aligned
  to blocks, and any flag this code does not know.

The maps are read with FIEMAP_FLAG_SYNC (dirty data is written first, so
no delayed allocation is left), and the base's map is read again after the
comparison: if it moved in between (btrfs balance, defragmentation), the
comparison is refused rather than trusted. Two maps that are the very same
list of extents, none opaque, are equal without walking them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Iterator
from typing import NamedTuple

from qbackup.errors import QbackupError

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FICLONE = 0x40049409        # _IOW(0x94, 9, int)
FIEMAP_FLAG_SYNC = 0x1

EXTENT_LAST = 0x1
EXTENT_UNKNOWN = 0x2
EXTENT_DELALLOC = 0x4
EXTENT_ENCODED = 0x8
EXTENT_DATA_ENCRYPTED = 0x80
EXTENT_NOT_ALIGNED = 0x100
EXTENT_DATA_INLINE = 0x200
EXTENT_DATA_TAIL = 0x400
EXTENT_UNWRITTEN = 0x800
EXTENT_MERGED = 0x1000
EXTENT_SHARED = 0x2000
# Flags that leave fe_physical naming the extent's bytes one to one.
PLAIN_FLAGS = EXTENT_LAST | EXTENT_MERGED | EXTENT_SHARED | EXTENT_UNWRITTEN

_HEADER = struct.Struct("=QQIIII")       # struct fiemap
_EXTENT = struct.Struct("=QQQQQIIII")    # struct fiemap_extent
_FLAGS_WORD = 10                         # fe_flags: the 11th 32-bit word of a record
BATCH = 512                              # extents per ioctl

# What a byte range of one file is, for the comparison.
ZERO, DATA, OPAQUE = "zero", "data", "opaque"


class NoReflink(QbackupError):
    """The file system cannot make reflink copies."""


class Untrackable(QbackupError):
    """The extent maps cannot be compared (why is the message)."""


class Extent(NamedTuple):
    logical: int
    physical: int
    length: int
    flags: int


def clone(src_fd: int, dst_fd: int) -> None:
    """Make `dst_fd` a reflink copy of `src_fd` (NoReflink if not supported)."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY,
                       errno.EBADF, errno.ENOSYS):
            raise NoReflink(f"the file system cannot make reflink copies ({e.strerror})") from None
        raise


def _raw_map(fd: int, size: int) -> bytes:
    """The file's extent records below `size` (struct fiemap_extent, in
    order), as the kernel gives them (FIEMAP, synced first)."""
    parts: list[bytes] = []
    pos = 0
    while pos < size:
        buf = bytearray(_HEADER.size + BATCH * _EXTENT.size)
        _HEADER.pack_into(buf, 0, pos, size - pos, FIEMAP_FLAG_SYNC, 0, BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError as e:
            raise Untrackable(f"FIEMAP is not available ({e.strerror})") from None
        mapped = _HEADER.unpack_from(buf)[3]
        if mapped == 0 or mapped > BATCH:
            break
        raw = bytes(buf[_HEADER.size:_HEADER.size + mapped * _EXTENT.size])
        logical, _, length, _, _, flags, _, _, _ = _EXTENT.unpack_from(raw, len(raw) - _EXTENT.size)
        if logical + length <= pos:
            raise Untrackable(f"FIEMAP returned an extent that does not advance "
                              f"(at {logical}, {length} bytes)")
        parts.append(raw)
        pos = logical + length
        if flags & EXTENT_LAST:
            break
    return b"".join(parts)


def _parse(raw: bytes) -> list[Extent]:
    found, pos = [], 0
    for logical, physical, length, _, _, flags, _, _, _ in _EXTENT.iter_unpack(raw):
        if length == 0 or logical + length <= pos:
            raise Untrackable(f"FIEMAP returned an extent that does not advance "
                              f"(at {logical}, {length} bytes)")
        found.append(Extent(logical, physical, length, flags))
        pos = logical + length
    return found


def extents(fd: int, size: int) -> list[Extent]:
    """The file's extents below `size`, in order (FIEMAP, synced first)."""
    return _parse(_raw_map(fd, size))


def _opaque(raw: bytes) -> bool:
    """Whether any extent record has a flag outside PLAIN_FLAGS."""
    flags = memoryview(raw).cast("I")[_FLAGS_WORD::_EXTENT.size // 4]
    return any(f & ~PLAIN_FLAGS for f in set(flags))


def _segments(found: list[Extent], size: int) -> Iterator[tuple[int, int, str, int]]:
    """(start, end, kind, physical address at start) covering [0, size)."""
    pos = 0
    for e in found:
        start, end = max(e.logical, pos), min(e.logical + e.length, size)
        if start < pos:
            raise Untrackable("FIEMAP returned overlapping extents")
        if start > pos:
            yield pos, start, ZERO, 0  # a hole reads as zeros
        if start < end:
            if e.flags & ~PLAIN_FLAGS:
                kind = OPAQUE
            elif e.flags & EXTENT_UNWRITTEN:
                kind = ZERO
            else:
                kind = DATA
            yield start, end, kind, e.physical + (start - e.logical)
        pos = max(pos, end)
        if pos >= size:
            return
    if pos < size:
        yield pos, size, ZERO, 0


def changed_ranges(base_fd: int, base_size: int, new_fd: int, new_size: int
                   ) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of the new copy that may differ from the base,
    sorted and coalesced; bytes past the base's end are changed. Untrackable
    if the two are on different file systems or the base's map moves while
    it is compared."""
    if os.fstat(base_fd).st_dev != os.fstat(new_fd).st_dev:
        raise Untrackable("the base copy is on another file system")
    common = min(base_size, new_size)
    base, new = _raw_map(base_fd, common), _raw_map(new_fd, common)
    changed: list[tuple[int, int]] = []

    def mark(start: int, end: int) -> None:
        if changed and changed[-1][1] >= start:
            changed[-1] = (changed[-1][0], max(changed[-1][1], end))
        else:
            changed.append((start, end))

    if base != new or _opaque(new):
        _compare(_parse(base), _parse(new), common, mark)
    # else: the very same extent records, none opaque: nothing changed (the common case)
    if new_size > common:
        mark(common, new_size)
    if _raw_map(base_fd, common) != base:
        raise Untrackable("the base copy's extents moved while they were compared "
                          "(balance or defragmentation?)")
    return changed


def _compare(base: list[Extent], new: list[Extent], size: int, mark) -> None:
    """mark(start, end) for every range of [0, size) that is not the same in both."""
    a_iter, b_iter = _segments(base, size), _segments(new, size)
    a, b = next(a_iter, None), next(b_iter, None)
    pos = 0
    while a is not None and b is not None:
        end = min(a[1], b[1])
        same = (a[2] == ZERO and b[2] == ZERO) or (
            a[2] == DATA and b[2] == DATA and a[3] + (pos - a[0]) == b[3] + (pos - b[0]))
        if not same:
            mark(pos, end)
        pos = end
        if a[1] == end:
            a = next(a_iter, None)
        if b[1] == end:
            b = next(b_iter, None)
    if pos < size:  # cannot happen: both cover [0, size)
        raise Untrackable("the extent maps do not cover the volume")
