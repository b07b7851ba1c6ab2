# SPDX-License-Identifier: GPL-2.0-or-later
"""Sparse-aware reader that cuts a volume into fixed-size chunks.

A volume is a regular file (file-reflink pools, sim images) or a block device
(lvm_thin). `VolumeFile` opens it once and sizes it on that same descriptor
(`fstat`, or BLKGETSIZE64 for a block device), so a rename of the path
between sizing and reading cannot make it read another file; everything is
read through that descriptor. Chunks are offset-aligned and `chunk_size`
long; the last one is short when the size is not a multiple (never padded).
Holes, found with SEEK_DATA/SEEK_HOLE, are not read at all; a chunk that is
entirely hole, or that reads as all zero bytes, is reported as `None`.
"""

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterable, Iterator

from qbackup.errors import QbackupError

BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t)


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


def volume_size(path: str) -> int:
    """Size in bytes of a regular file or block device."""
    with VolumeFile(path) as vf:
        return vf.size


def _data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Yield the (start, end) data extents of `fd` within [start, end), in order."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support: all data
                yield pos, end
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        pos = hole


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill `buf` from `offset`; a short file is an error (volume changed)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise QbackupError(f"volume ended at offset {offset + done} while being read (did it shrink?)")
        done += n


class VolumeFile:
    """A volume opened once for reading: its size, a stamp of its inode,
    and its chunks. `bytes_read` counts the bytes actually read (holes are
    never read)."""

    def __init__(self, path: str, fd: int | None = None, *, nofollow: bool = False):
        """Open `path`, or adopt `fd` (already open on it; closed with this)."""
        self.path = path
        if fd is None:
            flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
            try:
                fd = os.open(path, flags)
            except OSError as e:
                raise QbackupError(f"cannot open volume {path}: {e.strerror}") from None
        self.fd = fd
        try:
            st = os.fstat(self.fd)
            self.size = fd_size(self.fd, path)
        except BaseException:
            os.close(self.fd)
            raise
        self.regular = stat.S_ISREG(st.st_mode)
        self.stamp = self._stamp(st)
        self.bytes_read = 0

    @staticmethod
    def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def changed_since_open(self) -> bool:
        """Whether the file was written, truncated or had holes punched
        since it was opened (regular files: size, mtime or ctime moved)."""
        return self.regular and self._stamp(os.fstat(self.fd)) != self.stamp

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "VolumeFile":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def chunks(self, chunk_size: int, runs: Iterable[tuple[int, int]] | None = None,
               size: int | None = None) -> Iterator[tuple[int, bytes | None]]:
        """(index, data | None) for the chunks of `runs` ([first, end) index
        ranges, ascending; default: every chunk), in order. `size` (default:
        the size found at open) is how much of the volume to cut."""
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        size = self.size if size is None else size
        count = (size + chunk_size - 1) // chunk_size
        if self.regular and os.fstat(self.fd).st_size < size:
            raise QbackupError(f"volume {self.path} is {os.fstat(self.fd).st_size} bytes, "
                               f"expected {size}")
        if runs is None:
            runs = [(0, count)]
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        zero = bytes(chunk_size)
        try:
            for first, end in runs:
                yield from self._run(chunk_size, size, first, min(end, count), zero)
        except OSError as e:
            raise QbackupError(f"cannot read volume {self.path}: {e.strerror}") from None

    def _run(self, chunk_size: int, size: int, first: int, end_chunk: int, zero: bytes
             ) -> Iterator[tuple[int, bytes | None]]:
        if first >= end_chunk:
            return
        extents = _data_extents(self.fd, first * chunk_size, min(end_chunk * chunk_size, size))
        current = next(extents, None)
        for index in range(first, end_chunk):
            start = index * chunk_size
            end = min(start + chunk_size, size)
            parts = []
            while current is not None and current[0] < end:
                parts.append((max(current[0], start), min(current[1], end)))
                if current[1] > end:
                    break
                current = next(extents, None)
            yield index, self._read(start, end, parts, zero)

    def _read(self, start: int, end: int, parts: list[tuple[int, int]], zero: bytes) -> bytes | None:
        """Read the data parts of chunk [start, end); None if it is all zero."""
        if not parts:
            return None
        data: bytes | bytearray
        if parts == [(start, end)]:  # all data (the common case): read straight into bytes
            data = os.pread(self.fd, end - start, start)
            if len(data) < end - start:  # short: the rest as parts are read (fails if it ended)
                rest = bytearray(end - start - len(data))
                _pread_into(self.fd, memoryview(rest), start + len(data))
                data += rest
        else:
            data = bytearray(end - start)
            view = memoryview(data)
            for part_start, part_end in parts:
                _pread_into(self.fd, view[part_start - start:part_end - start], part_start)
            view.release()
        self.bytes_read += sum(part_end - part_start for part_start, part_end in parts)
        expected = zero if len(data) == len(zero) else bytes(len(data))
        return None if data == expected else bytes(data)  # bytes of bytes: the same object


class ChunkReader:
    """Iterator of (index, data | None) over every chunk of a volume at `path`
    (opened when iteration starts); see VolumeFile."""

    def __init__(self, path: str, size: int, chunk_size: int):
        if chunk_size <= 0 or size < 0:
            raise ValueError("chunk_size must be positive and size non-negative")
        self.path = path
        self.size = size
        self.chunk_size = chunk_size
        self.bytes_read = 0
        self._chunks = self._generate()

    def __iter__(self) -> "ChunkReader":
        return self

    def __next__(self) -> tuple[int, bytes | None]:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def _generate(self) -> Iterator[tuple[int, bytes | None]]:
        with VolumeFile(self.path) as vf:
            try:
                yield from vf.chunks(self.chunk_size, size=self.size)
            finally:
                self.bytes_read = vf.bytes_read


def iter_chunks(path: str, size: int, chunk_size: int) -> ChunkReader:
    """(index, data | None) for every chunk of the volume, in order; see ChunkReader."""
    return ChunkReader(path, size, chunk_size)
