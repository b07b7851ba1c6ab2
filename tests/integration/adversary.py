# SPDX-License-Identifier: GPL-2.0-or-later
"""A malicious backup qube, for tests: a tampering proxy in front of the real daemon.

The dom0 client connects to the proxy's Unix socket exactly as it would to the
daemon (qrexec header first). The proxy forwards the header and every frame to
the real ``qbackupd`` and hands each frame, in either direction, to a
``Tamper`` object that may rewrite, drop, reorder or invent frames. It speaks
the wire format of docs/PROTOCOL.md itself, so it needs nothing from either
side's code.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import msgpack

from qbackup_sim.daemon import daemon_command

HEADER_MAX = 256


def read_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            return None
        buf += part
    return bytes(buf)


def read_frame(sock: socket.socket) -> dict | None:
    head = read_exact(sock, 4)
    if head is None:
        return None
    (length,) = struct.unpack(">I", head)
    payload = read_exact(sock, length)
    if payload is None:
        return None
    return msgpack.unpackb(payload, raw=False)


def frame(msg: dict) -> bytes:
    payload = msgpack.packb(msg, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


class Tamper:
    """Default: an honest relay. Subclasses override the two hooks.

    Each hook gets one decoded message and returns the list of raw frames to
    pass on in its place (``[frame(msg)]`` to relay it unchanged).
    """

    def to_daemon(self, msg: dict) -> list[bytes]:
        return [frame(msg)]

    def to_client(self, msg: dict) -> list[bytes]:
        return [frame(msg)]


class Proxy:
    """Listens on ``path``; each connection is relayed to ``daemon_sock``."""

    def __init__(self, path: Path, daemon_sock: Path, tamper: Tamper) -> None:
        self.path = str(path)
        self.daemon_sock = str(daemon_sock)
        self.tamper = tamper
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(8)
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(client,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, client: socket.socket) -> None:
        daemon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        daemon.connect(self.daemon_sock)
        header = bytearray()
        while not header.endswith(b"\0") and len(header) < HEADER_MAX:
            b = client.recv(1)
            if not b:
                break
            header += b
        daemon.sendall(bytes(header))
        up = threading.Thread(
            target=self._pump, args=(client, daemon, self.tamper.to_daemon), daemon=True
        )
        up.start()
        self._pump(daemon, client, self.tamper.to_client)
        up.join(timeout=5)
        client.close()
        daemon.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, hook) -> None:
        try:
            while True:
                msg = read_frame(src)
                if msg is None:
                    break
                for raw in hook(msg):
                    dst.sendall(raw)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class Daemon:
    """The real qbackupd, as a subprocess on a temporary socket."""

    def __init__(self, tmp: Path) -> None:
        self.sock = tmp / "daemon.sock"
        self.storage = tmp / "storage"
        self.storage.mkdir()
        self.log = open(tmp / "daemon.log", "wb")
        self.proc = subprocess.Popen(
            daemon_command("serve", "--socket", str(self.sock), "--storage", str(self.storage)),
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while not self._accepts():  # the socket file exists a moment before it listens
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qbackupd did not start (see {tmp / 'daemon.log'})")
            time.sleep(0.02)

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.sock))
            except OSError:
                return False
        return True

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
