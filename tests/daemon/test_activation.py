# SPDX-License-Identifier: GPL-2.0-or-later
"""How the daemon gets its socket and whom it lets in.

- `serve --systemd-socket`: the listening socket inherited from systemd
  socket activation (sd_listen_fds(3): fd 3, LISTEN_PID, LISTEN_FDS), served
  like a bound one, left in place at exit (systemd owns it); every way of
  passing a wrong socket is refused with one line.
- Peer credentials (SO_PEERCRED): a process that is neither root nor the
  daemon's own user is refused with a log line and an in-band `forbidden`,
  before the qrexec header is even read.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio

from frameio import decode_frames, read_until_closed
from qbackupd import server
from qbackupd.storage import Storage

START_TIMEOUT = 30
IO_TIMEOUT = 60


@pytest.fixture
def workdir():
    path = Path(tempfile.mkdtemp(prefix="qbd-act-", dir="/tmp"))  # short: AF_UNIX path limit
    (path / "storage").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def listening_socket(path: Path) -> socket.socket:
    """What systemd does for qbackupd.socket: bind, chmod 0600, listen."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def start_activated(workdir: Path, fd: int | None, listen_pid: str = "$$", listen_fds: str = "1",
                    extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, Path]:
    """Start `qbackupd serve --systemd-socket` with `fd` as its fd 3 and the
    LISTEN_* variables set as systemd sets them (bash: dash cannot redirect fds
    above 9; LISTEN_PID=$$ is the pid the
    shell keeps through `exec`)."""
    log = workdir / f"daemon-{time.monotonic_ns()}.log"
    script = ""
    if fd is not None and fd != 3:
        script += f"exec 3<&{fd} {fd}<&-; "
    script += f'LISTEN_PID={listen_pid} LISTEN_FDS={listen_fds} exec "$@"'
    cmd = ["bash", "-c", script, "bash", sys.executable, "-m", "qbackupd", "serve", "--systemd-socket",
           "--storage", str(workdir / "storage"), "--log-level", "debug", *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                pass_fds=() if fd is None else (fd,))
    return proc, log
# fmt: skip


def wait_listening(proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while b"listening on" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"daemon did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.02)


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=IO_TIMEOUT)


def test_serves_an_inherited_socket_and_leaves_it_to_systemd(workdir, client_at):
    path = workdir / "qubes.BackupChunk"
    sock = listening_socket(path)
    try:
        # The connection that makes systemd start the service waits in the backlog.
        first = client_at(path, "act")
        proc, log = start_activated(workdir, sock.fileno())
        try:
            first.hello()
            assert first.call("init", config=b"c", pack_size=8 << 20)["op"] == "ok"
            assert first.call("put", id=bytes(32), type=1, data=b"x")["stored"] is True
            first.bye()
            wait_listening(proc, log)
            assert f"listening on {path} (socket from systemd)" in log.read_text()
        finally:
            assert stop(proc) == 0
        assert "stopped" in log.read_text()
        # Not ours to remove: the path and systemd's listening socket stay.
        assert path.is_socket()

        # Stopped, the service is started again by the next connection, on the same socket.
        second = client_at(path, "act")
        proc, log = start_activated(workdir, sock.fileno())
        try:
            second.hello()
            assert second.call("open", write=False)["op"] == "opened"
            assert second.call("have", ids=[bytes(32)])["missing"] == []
            second.bye()
        finally:
            assert stop(proc) == 0
    finally:
        sock.close()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unset", "no socket passed (LISTEN_PID/LISTEN_FDS unset)"),
        ("other-pid", "LISTEN_PID='1' names another process"),
        ("two-fds", "expected exactly one socket, LISTEN_FDS='2'"),
        ("regular-file", "fd 3 is not a usable socket"),
        ("connected-socket", "fd 3 is not a listening Unix stream socket"),
        ("tcp-socket", "fd 3 is not a listening Unix stream socket"),
        ("both-options", "not allowed with argument"),
    ],
)
def test_refuses_a_wrong_inherited_socket(workdir, case, expected):
    keep: list = []
    fd: int | None = None
    listen_pid, extra = "$$", ()
    if case == "other-pid":
        listen_pid = "1"
    if case in ("other-pid", "two-fds", "both-options"):
        keep.append(listening_socket(workdir / "s"))
        fd = keep[-1].fileno()
    if case == "both-options":
        extra = ("--socket", str(workdir / "t"))
    if case == "regular-file":
        keep.append(open(workdir / "file", "wb"))
        fd = keep[-1].fileno()
    if case == "connected-socket":
        keep.extend(socket.socketpair())
        fd = keep[0].fileno()
    if case == "tcp-socket":
        keep.append(socket.create_server(("127.0.0.1", 0)))
        fd = keep[-1].fileno()
    try:
        if case == "unset":
            proc = subprocess.Popen(
                [sys.executable, "-m", "qbackupd", "serve", "--systemd-socket", "--storage", str(workdir / "storage")],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env={k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")},
            )  # fmt: skip
            _, err = proc.communicate(timeout=IO_TIMEOUT)
            err = err.decode()
        else:
            proc, log = start_activated(workdir, fd, listen_pid, "2" if case == "two-fds" else "1", extra)
            proc.wait(timeout=IO_TIMEOUT)
            err = log.read_text()
    finally:
        for item in keep:
            item.close()
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 or case == "both-options", err
    assert expected in err, err


# --- peer credentials ------------------------------------------------------------


def test_refuses_a_peer_that_is_neither_root_nor_the_daemon(workdir, caplog):
    """In-process, with an allowed set that excludes us: what any other user
    of the backup qube would get if the socket were reachable."""
    path = workdir / "sock"
    outsider = os.geteuid() + 4242
    answers: list = []

    def connect_as_client() -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not path.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(IO_TIMEOUT)
            s.connect(str(path))
            try:
                s.sendall(b"qubes.BackupChunk+repo dom0\0")
            except BrokenPipeError:
                pass  # refused and closed before we wrote: the answer still waits
            answers.extend(decode_frames(read_until_closed(s)))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: server.serve(Storage(workdir / "storage"), path, allowed_uids=frozenset({0, outsider} - {os.geteuid()}))
            )  # fmt: skip
            await trio.to_thread.run_sync(connect_as_client)
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.INFO, logger="qbackupd"):
        trio.run(main)
    assert len(answers) == 1 and answers[0]["op"] == "error" and answers[0]["code"] == "forbidden", answers
    assert f"connection from uid {os.geteuid()} refused" in answers[0]["message"]
    refused = [r.getMessage() for r in caplog.records if "refused peer" in r.getMessage()]
    assert len(refused) == 1, caplog.text
    assert f"uid={os.geteuid()} " in refused[0] and f"pid={os.getpid()} " in refused[0]
    assert "dom0 must call qubes.BackupChunk as user root" in refused[0]
    assert "source=- repo=- ops=0" in caplog.text  # the header was never read
    assert os.listdir(workdir / "storage") == []


def test_root_and_own_user_are_allowed():
    assert server.default_allowed_uids() == {0, os.geteuid()}


def _need_root() -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("needs root (to connect as another user): this CI machine must provide it", pytrace=False)
    pytest.skip("needs root (to connect as another user)")


def test_real_daemon_refuses_another_user(daemon):
    """The real `serve` subprocess, socket opened to everyone on purpose: a
    process running as `nobody` connects and is refused."""
    _need_root()
    os.chmod(daemon.workdir, 0o755)
    os.chmod(daemon.socket, 0o666)
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.settimeout(60)\n"
        "s.connect(sys.argv[1])\n"
        "try:\n"
        "    s.sendall(b'qubes.BackupChunk+repo dom0\\0')\n"
        "except BrokenPipeError:\n"
        "    pass  # refused and closed before we wrote: the answer still waits\n"
        "try:\n"
        "    while d := s.recv(65536): sys.stdout.buffer.write(d)\n"
        "except ConnectionResetError:\n"
        "    pass\n"
    )
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    result = subprocess.run([python, "-c", code, str(daemon.socket)], user=65534, group=65534, extra_groups=[],
                            capture_output=True, timeout=IO_TIMEOUT)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    answers = decode_frames(result.stdout)
    assert len(answers) == 1 and answers[0]["op"] == "error" and answers[0]["code"] == "forbidden", answers
    daemon.wait_for_log("refused peer pid=")
    assert "uid=65534 gid=65534: only uid 0 may connect" in daemon.log_text()
    daemon.client().bye()  # root still gets in


# --- the storage directory belongs to the daemon ----------------------------------


def test_cli_refuses_storage_of_another_user(workdir, qbackupd_cli):
    """root running `qbackupd reindex` on the daemon's storage would leave
    files the daemon cannot write: refused, naming the owner."""
    _need_root()
    storage = workdir / "storage"
    os.chown(storage, 65534, 65534)
    for args in (("check", "--storage", str(storage), "repo"), ("reindex", "--storage", str(storage), "repo"),
                 ("serve", "--socket", str(workdir / "s"), "--storage", str(storage))):  # fmt: skip
        result = qbackupd_cli(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1
        assert "belongs to uid 65534, not to this process (uid 0)" in result.stderr
        assert "sudo -u qbackupd qbackupd" in result.stderr
    assert not (workdir / "s").exists() and os.listdir(storage) == []


def test_serve_refuses_storage_it_cannot_write(workdir):
    """A storage directory outside the unit's ReadWritePaths= is read-only
    under ProtectSystem=strict: a read-only bind mount is the same thing."""
    _need_root()
    storage = workdir / "storage"
    subprocess.run(["mount", "--bind", str(storage), str(storage)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(storage)], check=True)
        result = subprocess.run(
            [sys.executable, "-m", "qbackupd", "serve", "--socket", str(workdir / "s"), "--storage", str(storage)],
            capture_output=True, text=True, timeout=IO_TIMEOUT,
        )  # fmt: skip
    finally:
        subprocess.run(["umount", str(storage)], check=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1
    assert f"storage directory {storage} is not writable" in result.stderr
    assert "ReadWritePaths=" in result.stderr
    assert not (workdir / "s").exists()
