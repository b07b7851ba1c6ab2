# SPDX-License-Identifier: GPL-2.0-or-later
"""Start, find and stop the sim's backup-qube daemon.

The sim runs the real daemon (`python -m qbackupd serve`) in the background
on `DIR/daemon.sock` with its storage in `DIR/storage`, started on first use
as qrexec would start the backup qube. Its pid is kept in `DIR/daemon.pid`,
its output in `DIR/daemon.log`; `DIR/daemon.lock` serialises start and stop.

The daemon runs on the interpreter named in $QBACKUP_SIM_DAEMON_PYTHON, or
else on the sim's own: `make test` runs dom0's suites on the library floors
of dom0 and the daemon on those of the backup qube, which differ (msgpack),
as the two machines' do.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from qbackup_sim.inventory import SimError

SOCKET = "daemon.sock"
PIDFILE = "daemon.pid"
LOG = "daemon.log"
LOCK = "daemon.lock"
STORAGE = "storage"
DAEMON_PYTHON = "QBACKUP_SIM_DAEMON_PYTHON"
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path minus the NUL

# Daemons this process started, so that stopping one also reaps it.
_children: dict[int, subprocess.Popen] = {}


def daemon_command(*args: str) -> list[str]:
    """The command line that runs `qbackupd ARGS` as the sim's backup qube does."""
    return [os.environ.get(DAEMON_PYTHON) or sys.executable, "-m", "qbackupd", *args]


def socket_path(directory: str | os.PathLike) -> Path:
    """Where the sim daemon listens."""
    return Path(directory).absolute() / SOCKET


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (dead, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _is_our_daemon(pid: int, sock: Path) -> bool:
    """Whether `pid` is a live qbackupd serving `sock`."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return _alive(pid) and b"qbackupd" in argv and os.fsencode(sock) in argv


def daemon_pid(directory: str | os.PathLike) -> int | None:
    """The pid of the sim's running daemon, or None."""
    root = Path(directory).absolute()
    try:
        pid = int((root / PIDFILE).read_text())
    except (OSError, ValueError):
        return None
    return pid if _is_our_daemon(pid, socket_path(root)) else None


def _accepts(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(sock))
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                return False
            raise
    return True


def _log_tail(directory: Path) -> str:
    try:
        lines = (directory / LOG).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "empty log"


def start_daemon(directory: str | os.PathLike, timeout: float = 30.0) -> int:
    """Start the sim daemon unless it runs; wait until it accepts
    connections; return its pid."""
    root = Path(directory).absolute()
    sock = socket_path(root)
    if len(os.fsencode(sock)) > _SUN_PATH_MAX:
        raise SimError(f"sim directory path too long for a Unix socket: {sock}")
    with _locked(root):
        pid = daemon_pid(root)
        if pid is not None:
            return pid
        sock.unlink(missing_ok=True)  # left by a daemon that was killed
        (root / STORAGE).mkdir(exist_ok=True)
        with open(root / LOG, "ab") as log:
            proc = subprocess.Popen(
                daemon_command("serve", "--socket", str(sock), "--storage", str(root / STORAGE)),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        _children[proc.pid] = proc
        (root / PIDFILE).write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + timeout
        while not _accepts(sock):
            if proc.poll() is not None:
                raise SimError(f"sim daemon exited with status {proc.returncode} "
                               f"at start: {_log_tail(root)}")
            if time.monotonic() > deadline:
                _terminate(proc.pid, timeout)
                raise SimError(f"sim daemon did not listen on {sock} within {timeout:g}s")
            time.sleep(0.02)
        return proc.pid


def _gone(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        return child.poll() is not None  # reaps it
    return not _alive(pid)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if _wait_gone(pid, timeout):
            break
    else:
        raise SimError(f"sim daemon (pid {pid}) does not exit")
    _children.pop(pid, None)


def stop_daemon(directory: str | os.PathLike, timeout: float = 10.0) -> bool:
    """Stop the sim daemon and wait for it to exit; False if none ran."""
    root = Path(directory).absolute()
    with _locked(root):
        pid = daemon_pid(root)
        if pid is not None:
            _terminate(pid, timeout)
        (root / PIDFILE).unlink(missing_ok=True)
        socket_path(root).unlink(missing_ok=True)
    return pid is not None
