# SPDX-License-Identifier: GPL-2.0-or-later
"""Frames on a raw socket, for tests that talk to the daemon without a
client library: encode one, read everything until the daemon closes, split
what was read into frames. Standard library and msgpack only: the booted
container of tests/packaging/test_systemd_boot.py runs it too."""

from __future__ import annotations

import socket
import struct

import msgpack


def frame(message: dict) -> bytes:
    payload = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything until EOF, or until the reset that a close with our data
    still unread causes (the daemon reads nothing from a refused peer)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def decode_frames(data: bytes) -> list[dict]:
    """The frames in `data` (small answers only)."""
    frames = []
    while data:
        (length,) = struct.unpack(">I", data[:4])
        frames.append(msgpack.unpackb(data[4 : 4 + length], raw=False))
        data = data[4 + length :]
    return frames
