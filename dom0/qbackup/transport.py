# SPDX-License-Identifier: GPL-2.0-or-later
"""Byte streams from dom0 to the qubes.BackupChunk service (PROTOCOL §1).

A Transport is a plain bidirectional byte stream; proto.Session speaks the
protocol over it. Two kinds exist:

- ProcessTransport: the stdin/stdout pipes of a process that carries the
  qrexec call: the qrexec-client that qubesadmin's `run_service(...,
  user='root', filter_esc=False)` starts (qbackup.qubes). When the stream
  ends or breaks, the process's exit code says why (qrexec-client: 125, the
  service's socket could not be reached; 127, no such service), through an
  `explain` function the caller gives. This module never imports qubesadmin.
- SocketTransport: a Unix socket, used by the simulation and the tests.
  `unix_socket()` connects to the daemon's socket and writes the qrexec
  header itself, as qrexec-agent would.
"""

import abc
import io
import re
import socket
import subprocess
from typing import Callable

from .errors import QbackupError

SERVICE = "qubes.BackupChunk"
REPO_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Qubes qube names (qubes/vm/__init__.py validate_name), at most 31 characters.
QUBE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")
MAX_HEADER = 256


def check_repo_name(repo: str) -> str:
    """Return `repo` if it is a valid repository name (PROTOCOL §1), else raise."""
    if not REPO_NAME_RE.fullmatch(repo) or ".." in repo:
        raise QbackupError(f"invalid repository name {repo!r}: use letters, digits, "
                           "'_', '.', '-' (at most 64, no '..')")
    return repo


class Transport(abc.ABC):
    """A bidirectional byte stream to the backup qube's service."""

    @abc.abstractmethod
    def read(self, n: int) -> bytes:
        """Up to `n` bytes (at least one), b"" at end of stream."""

    def read_into(self, view: memoryview) -> int:
        """Read up to len(view) bytes (at least one) into `view`: how many;
        0 at end of stream. Transports that can, fill it without a copy."""
        data = self.read(len(view))
        view[:len(data)] = data
        return len(data)

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Write all of `data`."""

    @abc.abstractmethod
    def close_write(self) -> None:
        """Signal end of input to the service (half-close)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Tear the stream down now, waking any thread blocked in read/write."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the stream (waits for a carrying process to exit)."""


class SocketTransport(Transport):
    """A connected stream socket."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def read(self, n: int) -> bytes:
        return self._sock.recv(n)

    def read_into(self, view: memoryview) -> int:
        return self._sock.recv_into(view)

    def write(self, data: bytes) -> None:
        self._sock.sendall(data)

    def close_write(self) -> None:
        self._sock.shutdown(socket.SHUT_WR)

    def abort(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already shut down or never connected: nothing to wake

    def close(self) -> None:
        self.abort()
        self._sock.close()


class ProcessTransport(Transport):
    """The stdin/stdout pipes (binary) of a process carrying the call.

    `explain(exit_code)` turns the exit code of a process that ended the
    stream into a one-line error (None: a normal end); it is asked when a
    read finds the end of the stream or a write finds the pipe broken."""

    # Seconds the process may take to exit once its pipes are closed. qrexec-client
    # waits for the backup qube to end the call, which a hostile one never does.
    exit_grace = 10.0
    # Seconds to wait, at the end of the stream, for the process's exit code.
    exit_wait = 2.0

    def __init__(self, popen: subprocess.Popen,
                 explain: Callable[[int], str | None] | None = None):
        if popen.stdin is None or popen.stdout is None:
            raise ValueError("ProcessTransport needs a Popen with stdin and stdout pipes")
        if isinstance(popen.stdout, io.BufferedIOBase):
            # a buffered pipe's readinto waits until the whole buffer is full:
            # a read ahead (proto.FrameReader) would wait for answers never sent
            raise ValueError("ProcessTransport needs an unbuffered stdout (Popen bufsize=0)")
        self._proc = popen
        self._explain = explain

    def read(self, n: int) -> bytes:
        data = self._proc.stdout.read(n)
        if not data:
            self._check_exit()
        return data

    def read_into(self, view: memoryview) -> int:
        n = self._proc.stdout.readinto(view)
        if not n:
            self._check_exit()
        return n or 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while len(view):
                view = view[self._proc.stdin.write(view):]
            self._proc.stdin.flush()
        except BrokenPipeError:
            self._check_exit()
            raise

    def _check_exit(self) -> None:
        """Raise the explained error if the process ended the stream by failing."""
        if self._explain is None:
            return
        try:
            code = self._proc.wait(self.exit_wait)
        except subprocess.TimeoutExpired:
            return  # still running: the stream just ended
        reason = self._explain(code)
        if reason:
            raise QbackupError(reason)

    def close_write(self) -> None:
        self._proc.stdin.close()

    def abort(self) -> None:
        self._proc.kill()

    def close(self) -> None:
        for pipe in (self._proc.stdin, self._proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass  # unflushed data to a dead process: nothing more to do
        try:
            self._proc.wait(self.exit_grace)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def unix_socket(path: str, repo: str, source: str = "dom0") -> Transport:
    """Connect to the daemon's socket and send the qrexec header (simulation)."""
    header = f"{SERVICE}+{check_repo_name(repo)} {source}\0".encode()
    if not source.isprintable() or " " in source or len(header) > MAX_HEADER:
        raise ValueError(f"invalid source name {source!r}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        sock.sendall(header)
    except OSError as exc:
        sock.close()
        raise QbackupError(f"cannot connect to {path}: {exc.strerror or exc}") from exc
    return SocketTransport(sock)
