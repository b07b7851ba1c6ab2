# SPDX-License-Identifier: GPL-2.0-or-later
"""Content for the sim's volume images (imported by name: a conftest is not,
since which `conftest` module a plain import finds depends on what pytest
collected first)."""

from __future__ import annotations

import random
from pathlib import Path


def fill(path: Path, seed: int, data_fraction: float = 0.5) -> None:
    """Overwrite an image with random 64 KiB blocks and zero runs."""
    rng = random.Random(seed)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for offset in range(0, size, 64 << 10):
            if rng.random() < data_fraction:
                f.seek(offset)
                f.write(rng.randbytes(min(64 << 10, size - offset)))
