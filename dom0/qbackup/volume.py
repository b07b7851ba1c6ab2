# SPDX-License-Identifier: GPL-2.0-or-later
"""Sparse-aware reader that cuts a volume into fixed-size chunks.

A volume is a regular file (file-reflink pools, sim images) or a block device
(lvm_thin). Chunks are offset-aligned and `chunk_size` long; the last one is
short when the size is not a multiple (never padded). Holes, found with
SEEK_DATA/SEEK_HOLE, are not read at all; a chunk that is entirely hole, or
that reads as all zero bytes, is reported as `None`.
"""

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator

from qbackup.errors import QbackupError

BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t)


def volume_size(path: str) -> int:
    """Size in bytes of a regular file or block device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise QbackupError(f"cannot open volume {path}: {e.strerror}") from None
    try:
        return fd_size(fd, path)
    finally:
        os.close(fd)


def fd_size(fd: int, path: str) -> int:
    """Size in bytes of the regular file or block device open as `fd`."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if not stat.S_ISBLK(st.st_mode):
        raise QbackupError(f"volume {path} is neither a regular file nor a block device")
    try:
        return struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))[0]
    except OSError:
        return os.lseek(fd, 0, os.SEEK_END)


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield the (start, end) data extents of `fd` below `size`, in order."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support: all data
                yield pos, size
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill `buf` from `offset`; a short file is an error (volume changed)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise QbackupError(f"volume ended at offset {offset + done} while being read (did it shrink?)")
        done += n


class ChunkReader:
    """Iterator of (index, data | None) over every chunk of a volume.

    `bytes_read` counts the bytes actually read from the volume (holes are
    never read), for statistics and tests.
    """

    def __init__(self, path: str, size: int, chunk_size: int):
        if chunk_size <= 0 or size < 0:
            raise ValueError("chunk_size must be positive and size non-negative")
        self.path = path
        self.size = size
        self.chunk_size = chunk_size
        self.bytes_read = 0
        self._zero = bytes(chunk_size)
        self._chunks = self._generate()

    def __iter__(self) -> "ChunkReader":
        return self

    def __next__(self) -> tuple[int, bytes | None]:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def _generate(self) -> Iterator[tuple[int, bytes | None]]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise QbackupError(f"cannot open volume {self.path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_size < self.size:
                raise QbackupError(f"volume {self.path} is {st.st_size} bytes, expected {self.size}")
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            try:
                yield from self._chunks_of(fd)
            except OSError as e:
                raise QbackupError(f"cannot read volume {self.path}: {e.strerror}") from None
        finally:
            os.close(fd)

    def _chunks_of(self, fd: int) -> Iterator[tuple[int, bytes | None]]:
        extents = _data_extents(fd, self.size)
        current = next(extents, None)
        for index in range((self.size + self.chunk_size - 1) // self.chunk_size):
            start = index * self.chunk_size
            end = min(start + self.chunk_size, self.size)
            parts = []
            while current is not None and current[0] < end:
                parts.append((max(current[0], start), min(current[1], end)))
                if current[1] > end:
                    break
                current = next(extents, None)
            yield index, self._read(fd, start, end, parts)

    def _read(self, fd: int, start: int, end: int, parts: list[tuple[int, int]]) -> bytes | None:
        """Read the data parts of chunk [start, end); None if it is all zero."""
        if not parts:
            return None
        buf = bytearray(end - start)
        view = memoryview(buf)
        for part_start, part_end in parts:
            _pread_into(fd, view[part_start - start:part_end - start], part_start)
            self.bytes_read += part_end - part_start
        view.release()
        zero = self._zero if len(buf) == self.chunk_size else bytes(len(buf))
        return None if buf == zero else bytes(buf)


def iter_chunks(path: str, size: int, chunk_size: int) -> ChunkReader:
    """(index, data | None) for every chunk of the volume, in order; see ChunkReader."""
    return ChunkReader(path, size, chunk_size)
