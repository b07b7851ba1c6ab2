# SPDX-License-Identifier: GPL-2.0-or-later
"""Writer lock of a repository: ``flock`` on a lock file that names its holder.

``flock`` locks belong to the open file description, so two opens of the lock
file conflict whether they are in one process or two, and the kernel drops
the lock when its holder dies: a crashed writer never blocks the next one.
The holder's description (pid, holder string, time) is written into the lock
file while the lock is held; it is informational only (and, read back by a
waiting opener, untrusted: bounded and type-checked).
"""

import fcntl
import json
import os
import time

from .fsdir import Dir

MAX_HOLDER = 256  # characters of the holder string kept
_MAX_INFO = 4096  # bytes of holder info read back


class LockBusy(Exception):
    """Another writer holds the lock; ``holder`` says who (may be empty)."""

    def __init__(self, holder: dict):
        super().__init__(f"locked by {describe(holder)}")
        self.holder = holder


class WriterLock:
    """A held writer lock; ``release`` (or process death) frees it."""

    def __init__(self, fd: int):
        self._fd = fd

    @classmethod
    def acquire(cls, directory: Dir, name: str, holder: str) -> "WriterLock":
        """Take the lock (file ``name`` of ``directory``) without waiting, or raise ``LockBusy``.

        The lock
        file is opened without following a symlink and must be a regular file
        of one link (``fsdir.UnsafeEntry`` otherwise): it is truncated and
        written, so it must never be another name's file.
        """
        fd = directory.open_file(name, os.O_RDWR | os.O_CREAT)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockBusy(_read_holder(fd)) from None
            info = {"pid": os.getpid(), "holder": holder[:MAX_HOLDER], "time": int(time.time())}
            data = json.dumps(info).encode() + b"\n"
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        except BaseException:
            os.close(fd)
            raise
        return cls(fd)

    def release(self) -> None:
        """Clear the holder info and drop the lock (idempotent)."""
        if self._fd < 0:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass  # the info is advisory; closing still releases the lock
        finally:
            os.close(self._fd)
            self._fd = -1


def describe(holder: dict) -> str:
    """One line naming a lock holder, for error messages."""
    if not holder:
        return "an unknown holder"
    return f"pid {holder['pid']} ({holder['holder']!a}) since {holder['time']}"


def _read_holder(fd: int) -> dict:
    """The holder info in the lock file, or {} if absent or malformed."""
    try:
        untrusted_info = json.loads(os.pread(fd, _MAX_INFO, 0))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(untrusted_info, dict):
        return {}
    pid, holder, when = (untrusted_info.get(k) for k in ("pid", "holder", "time"))
    if type(pid) is not int or type(when) is not int or not isinstance(holder, str):
        return {}
    return {"pid": pid, "holder": holder[:MAX_HOLDER], "time": when}
