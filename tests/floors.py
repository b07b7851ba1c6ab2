# SPDX-License-Identifier: GPL-2.0-or-later
"""requirements-floor.txt, read: the library versions each side's target
ships, which are the oldest qbackup supports (tests/test_floors.py)."""

from __future__ import annotations

import re
from pathlib import Path

FLOOR_FILE = Path(__file__).resolve().parent.parent / "requirements-floor.txt"
SIDES = ("dom0", "vm")  # Qubes R4.2 dom0 (Fedora 37), the backup qube's Debian 12 template
NAME, VERSION = r"[a-z0-9][a-z0-9_-]*", r"\d+(?:\.\d+)*"


def floors() -> dict[str, dict[str, str]]:
    """{side: {name: version}}; AssertionError on a line that is not 'SIDE NAME==VERSION'."""
    result: dict[str, dict[str, str]] = {side: {} for side in SIDES}
    for number, line in enumerate(FLOOR_FILE.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(rf"({'|'.join(SIDES)}) ({NAME})==({VERSION})", line)
        assert match, f"{FLOOR_FILE.name}:{number}: not 'SIDE NAME==VERSION': {line!r}"
        side, name, pinned = match.groups()
        assert name not in result[side], f"{FLOOR_FILE.name}:{number}: {name} twice for {side}"
        result[side][name] = pinned
    return result
