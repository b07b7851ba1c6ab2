# SPDX-License-Identifier: GPL-2.0-or-later
"""Test helpers for the daemon: a real `qbackupd serve` subprocess on a temp
socket, and a tiny protocol client that speaks to it exactly as qrexec plus
the dom0 client would (qrexec header first, then length-prefixed msgpack).

Everything is handed to tests through fixtures (`daemon`, `new_daemon`,
`qbackupd_cli`, `client_at`), never imported from here, so the module name
`conftest` cannot clash with other test directories."""

from __future__ import annotations

import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import pytest

HEADER = b"qubes.BackupChunk+%s %s\0"
IO_TIMEOUT = 120  # guard against a hung daemon, not a performance assertion
START_TIMEOUT = 30


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run `python -m qbackupd ARGS` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "qbackupd", *args], capture_output=True, text=True, timeout=IO_TIMEOUT
    )


class Client:
    """Minimal synchronous protocol client (tests only)."""

    def __init__(self, path: Path, header: bytes):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.connect(str(path))
        self.rid = 0
        if header:
            self.sock.sendall(header)

    # raw I/O
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, msg: dict) -> None:
        payload = msgpack.packb(msg, use_bin_type=True)
        self.sock.sendall(struct.pack(">I", len(payload)) + payload)

    def _read_exactly(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                if buf:
                    raise AssertionError(f"EOF inside a frame ({len(buf)} of {n} bytes)")
                return None
            buf += chunk
        return bytes(buf)

    def recv(self) -> dict | None:
        """The next frame from the daemon, or None at EOF."""
        head = self._read_exactly(4)
        if head is None:
            return None
        (length,) = struct.unpack(">I", head)
        assert 1 <= length <= 8 << 20, length
        payload = self._read_exactly(length)
        assert payload is not None, "EOF after a frame length"
        msg = msgpack.unpackb(payload, raw=False, strict_map_key=True)
        assert isinstance(msg, dict)
        return msg

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def request(self, op: str, **fields) -> int:
        rid = self.next_rid()
        self.send({"op": op, "rid": rid, **fields})
        return rid

    def call(self, op: str, **fields) -> dict:
        rid = self.request(op, **fields)
        answer = self.recv()
        assert answer is not None, f"EOF instead of an answer to {op}"
        assert answer["rid"] == rid, answer
        return answer

    def hello(self, versions: tuple[int, ...] = (1, 2)) -> dict:
        self.send({"op": "hello", "rid": 0, "versions": list(versions), "client": "test/0"})
        answer = self.recv()
        assert answer is not None and answer["op"] == "hello", answer
        return answer

    def get_all(self, ids: list[bytes]) -> dict[bytes, bytes | None]:
        """One `get` of `ids`: id -> data, or None for "missing"."""
        rid = self.request("get", ids=ids)
        found = {}
        for id_ in ids:
            answer = self.recv()
            assert answer["rid"] == rid and answer["id"] == id_, answer
            found[id_] = answer["data"] if answer["op"] == "blob" else None
        assert self.recv() == {"op": "done", "rid": rid}
        return found

    def expect_error(self, code: str, op: str, **fields) -> dict:
        answer = self.call(op, **fields)
        assert answer["op"] == "error" and answer["code"] == code, answer
        return answer

    def expect_eof(self) -> None:
        msg = self.recv()
        assert msg is None, f"expected EOF, got {msg}"

    def close_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def bye(self) -> None:
        assert self.call("bye") == {"op": "bye", "rid": self.rid, "status": "ok"}
        self.expect_eof()
        self.close()

    def close(self) -> None:
        self.sock.close()


class Daemon:
    """A `python -m qbackupd serve` subprocess with its own socket and storage."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.socket = workdir / "qbackupd.sock"
        self.storage = workdir / "storage"
        self.storage.mkdir(exist_ok=True)
        self.log = workdir / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qbackupd", "serve", "--socket", str(self.socket),
                 "--storage", str(self.storage), "--log-level", "debug"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while b"listening on" not in self.log.read_bytes()[offset:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start:\n{self.log_text()}")
            time.sleep(0.02)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, text: str, count: int = 1) -> None:
        """Wait until `text` appears `count` times in the daemon's log."""
        deadline = time.monotonic() + IO_TIMEOUT
        while self.log_text().count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged {count} times:\n{self.log_text()}")
            time.sleep(0.02)

    def closed_connections(self) -> int:
        """How many connections have ended so far (one log line each)."""
        return self.log_text().count(" result=")

    def wait_connections_closed(self, count: int) -> None:
        """Wait until `count` connections in all have ended."""
        self.wait_for_log(" result=", count)

    def client(
        self, repo: str | None = "repo", source: str = "dom0", hello: bool = True, versions=(1, 2)
    ) -> Client:
        arg = b"" if repo is None else repo.encode()
        client = Client(self.socket, HEADER % (arg, source.encode()))
        if hello:
            client.hello(versions)
        return client

    def raw_client(self, header: bytes) -> Client:
        return Client(self.socket, header)

    def open_repo(self, repo: str = "repo", write: bool = True, create: bool = False, versions=(1, 2)) -> Client:
        client = self.client(repo, versions=versions)
        if create:
            answer = client.call("init", config=b"config-" + repo.encode(), pack_size=8 << 20)
            assert answer["op"] == "ok", answer
        else:
            answer = client.call("open", write=write)
            assert answer["op"] == "opened", answer
        return client

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return run_cli(*args)

    def check(self, repo: str = "repo") -> subprocess.CompletedProcess:
        return run_cli("check", "--read-data", "--storage", str(self.storage), repo)

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=IO_TIMEOUT)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=IO_TIMEOUT)

    def shutdown(self) -> None:
        """Stop the daemon if it runs (SIGTERM, then SIGKILL if it hangs)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=IO_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _short_tempdir() -> Path:
    # AF_UNIX paths are limited to 108 bytes: keep it short, not under tmp_path
    return Path(tempfile.mkdtemp(prefix="qbd-", dir="/tmp"))


@pytest.fixture
def daemon_dir():
    path = _short_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def new_daemon(daemon_dir):
    """A Daemon on a fresh directory, not started yet; stopped at teardown."""
    d = Daemon(daemon_dir)
    yield d
    d.shutdown()


@pytest.fixture
def daemon(new_daemon):
    """A running daemon on a fresh socket and storage directory."""
    new_daemon.start()
    return new_daemon


@pytest.fixture(scope="module")
def shared_daemon():
    """One running daemon for a whole test module (tests must use distinct repo names)."""
    path = _short_tempdir()
    d = Daemon(path)
    d.start()
    yield d
    d.shutdown()
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def qbackupd_cli():
    return run_cli


@pytest.fixture
def client_at():
    """Connect a protocol Client to the socket at `path`, qrexec header first."""

    def connect(path: Path, repo: str = "repo", source: str = "dom0") -> Client:
        return Client(path, HEADER % (repo.encode(), source.encode()))

    return connect
