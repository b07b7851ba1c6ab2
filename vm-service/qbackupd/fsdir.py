# SPDX-License-Identifier: GPL-2.0-or-later
"""The daemon's storage tree, opened without following symbolic links.

Whoever can write into the storage directory (a sync tool, a cloud mount,
another user of the backup qube) could plant a symbolic link, a FIFO or a
hard link where the daemon expects its own files, and have the daemon read,
truncate, write or delete something outside its tree, or block forever on a
FIFO.  So every file and directory below a repository is reached through
``Dir``: a directory held open by file descriptor, whose entries are opened
relative to it (``dir_fd``) with ``O_NOFOLLOW``, never by a path a symlink
could redirect.  An entry that is a symbolic link, not a regular file (FIFO,
socket, device) where a file is expected, not a directory where one is
expected, or a file with more than one hard link, is refused with
``UnsafeEntry``, a one-line ``OSError``.

Only the storage root itself, given on the command line by the
administrator, may be reached through a symbolic link.
"""

from __future__ import annotations

import errno
import os
import stat

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must not block (it is refused right after); O_NOCTTY: a
# terminal device must never become the daemon's controlling terminal.
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


class UnsafeEntry(OSError):
    """An entry of the storage tree is a symlink, a special file or a hard link."""


def _refusal(path: str, mode: int) -> str:
    if stat.S_ISLNK(mode):
        return f"{path} is a symbolic link; refusing to follow it out of the storage tree"
    kind = "directory" if stat.S_ISDIR(mode) else "FIFO, socket or device"
    return f"{path} is a {kind}, not a regular file; refusing it"


class Dir:
    """A directory of the storage tree, held open; entries are reached relative to it."""

    def __init__(self, fd: int, path: str):
        self.fd = fd
        self.path = path  # for messages (and SQLite, which opens files by name)

    @classmethod
    def open_root(cls, path: str | os.PathLike) -> "Dir":
        """Open the storage root (the administrator's path: it may be a symlink)."""
        path = os.path.abspath(path)
        return cls(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), path)

    def __enter__(self) -> "Dir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def join(self, name: str) -> str:
        return f"{self.path}/{name}"

    def _lstat_refusal(self, name: str) -> UnsafeEntry:
        """Why opening ``name`` failed with ELOOP/ENOTDIR/ENXIO, as an UnsafeEntry."""
        try:
            mode = os.lstat(name, dir_fd=self.fd).st_mode
        except OSError:
            return UnsafeEntry(f"{self.join(name)} is not what the storage tree holds there; refusing it")
        if stat.S_ISREG(mode):
            return UnsafeEntry(f"{self.join(name)} is a regular file, not a directory; refusing it")
        return UnsafeEntry(_refusal(self.join(name), mode))

    def sub(self, name: str) -> "Dir":
        """Open the subdirectory ``name`` (a symlink or non-directory is refused)."""
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise self._lstat_refusal(name) from None
            raise
        return Dir(fd, self.join(name))

    def mkdir(self, name: str, mode: int = 0o700) -> None:
        os.mkdir(name, mode, dir_fd=self.fd)

    def open_file(self, name: str, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
        """Open a regular file of this directory: an fd in blocking mode.

        A symlink, FIFO, socket, device or directory is refused, and so is a
        file with more than one hard link (writing or truncating it would
        change another name's content).  A file unlinked meanwhile (no link
        left) is fine: it is still the file that was there.
        """
        try:
            fd = os.open(name, flags | _FILE_FLAGS, mode, dir_fd=self.fd)
        except OSError as e:
            # ELOOP: a symlink; ENXIO: a FIFO or socket opened for writing; EISDIR
            if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENOTDIR):
                raise self._lstat_refusal(name) from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeEntry(_refusal(self.join(name), st.st_mode))
            if st.st_nlink > 1:
                raise UnsafeEntry(
                    f"{self.join(name)} has {st.st_nlink} hard links; refusing a file another name shares"
                )
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def check_file(self, name: str) -> bool:
        """Whether ``name`` exists; if it does it must be a regular file of one link.

        For files a library opens by name (SQLite's index files): checked
        right before it opens them.
        """
        try:
            st = os.lstat(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeEntry(_refusal(self.join(name), st.st_mode))
        if st.st_nlink > 1:
            raise UnsafeEntry(
                f"{self.join(name)} has {st.st_nlink} hard links; refusing a file another name shares"
            )
        return True

    def exists(self, name: str) -> bool:
        try:
            os.lstat(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def read_bounded(self, name: str, limit: int) -> tuple[bytes, int]:
        """(content, size at open) of a file of at most ``limit`` bytes; longer reads stop at limit + 1."""
        fd = self.open_file(name)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                return b"", size
            chunks = []
            got = 0
            while got <= limit:
                chunk = os.read(fd, limit + 1 - got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks), size
        finally:
            os.close(fd)

    def write_new(self, name: str, data: bytes) -> None:
        """Create ``name`` (it must not exist), write ``data``, fsync."""
        fd = self.open_file(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def unlink(self, name: str) -> None:
        os.unlink(name, dir_fd=self.fd)

    def rename(self, name: str, dest: "Dir", dest_name: str) -> None:
        """Rename an entry (never follows a link: a planted one is moved, not its target)."""
        os.rename(name, dest_name, src_dir_fd=self.fd, dst_dir_fd=dest.fd)

    def replace(self, name: str, dest: "Dir", dest_name: str) -> None:
        os.replace(name, dest_name, src_dir_fd=self.fd, dst_dir_fd=dest.fd)

    def names(self) -> list[tuple[str, bool]]:
        """(name, is a real directory) of every entry; symlinks count as not directories."""
        with os.scandir(self.fd) as entries:
            return [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]

    def fsync(self) -> None:
        os.fsync(self.fd)
