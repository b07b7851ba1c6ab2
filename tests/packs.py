# SPDX-License-Identifier: GPL-2.0-or-later
"""What a malicious backup qube can do to a pack file, for tests: change a
byte of a stored blob and give its record a matching CRC-32, so the daemon
serves the forged blob as sound (docs/FORMAT.md: record, trailer, footer).
Only dom0's authentication can catch it."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

TYPE_DATA = 1


def forge_middle_chunk(pack: Path) -> None:
    """Flip a bit in the data chunk in the middle of `pack`'s data chunks."""
    raw = bytearray(pack.read_bytes())
    trailer, _length = struct.unpack(">QQ", raw[-64:-48])
    count, = struct.unpack(">I", raw[trailer:trailer + 4])
    pos, records = trailer + 4, []
    for _ in range(count):
        kind, offset, size, refs = struct.unpack(">BQII", raw[pos + 32:pos + 49])
        if kind == TYPE_DATA:
            records.append((offset, size))
        pos += 49 + 32 * refs
    offset, size = records[len(records) // 2]
    raw[offset + 41 + size // 2] ^= 0x20
    raw[offset + 37:offset + 41] = struct.pack(">I", zlib.crc32(
        raw[offset:offset + 37] + raw[offset + 41:offset + 41 + size]))
    pack.write_bytes(raw)
