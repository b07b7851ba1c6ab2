# SPDX-License-Identifier: GPL-2.0-or-later
"""Progress of a long operation on stderr: bytes done, rate, ETA.

Drawn on one line, redrawn at most every `interval` seconds, and only when
the stream is a terminal (a log file or pipe gets nothing). Thread-safe:
the backup pipeline reports from several threads.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float) -> str:
    """`n` bytes for humans: 512 B, 1.5 MiB, 2.0 GiB."""
    unit = 0
    while abs(n) >= 1024 and unit < len(_UNITS) - 1:
        n /= 1024
        unit += 1
    return f"{n:.0f} B" if unit == 0 else f"{n:.1f} {_UNITS[unit]}"


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts bytes done out of `total` and shows it on `stream` (stderr).

    The engine calls `start(name, size)` when it begins an item (a volume),
    `advance(n)` as bytes complete and `done()` when the item is finished;
    `close()` (or leaving a `with` block) ends the terminal line.
    """

    def __init__(self, total: int, label: str, stream: TextIO | None = None, *,
                 interval: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled = self.stream.isatty()
        self.total = total
        self.label = label
        self.item: str | None = None
        self.done_bytes = 0
        self._interval = interval
        self._clock = clock
        self._start = clock()
        self._last_draw: float | None = None
        self._lock = threading.Lock()

    def start(self, name: str, size: int) -> None:
        """Item `name` (of `size` bytes, part of the total) begins."""
        with self._lock:
            self.item = name
            self._maybe_draw(force=False)

    def advance(self, n: int) -> None:
        """Record `n` more bytes done."""
        with self._lock:
            self.done_bytes += n
            self._maybe_draw(force=False)

    def done(self) -> None:
        """The current item is finished."""
        with self._lock:
            self.item = None

    def line(self, now: float) -> str:
        """The progress line as of time `now`."""
        elapsed = max(now - self._start, 1e-9)
        rate = self.done_bytes / elapsed
        text = self.label + (f" {self.item}" if self.item else "")
        text += f": {human_bytes(self.done_bytes)}"
        if self.total > 0:
            percent = min(100, 100 * self.done_bytes // self.total)
            text += f" / {human_bytes(self.total)} {percent}%"
        text += f"  {human_bytes(rate)}/s"
        if self.total > self.done_bytes and rate > 0:
            text += f"  ETA {_duration((self.total - self.done_bytes) / rate)}"
        return text

    def _maybe_draw(self, force: bool) -> None:
        now = self._clock()
        if self.enabled and (force or self._last_draw is None
                             or now - self._last_draw >= self._interval):
            self.stream.write(f"\r{self.line(now)}\x1b[K")
            self.stream.flush()
            self._last_draw = now

    def close(self) -> None:
        """Draw the final state and end the line (nothing if never drawn
        or not a terminal)."""
        with self._lock:
            if self._last_draw is not None:
                self._maybe_draw(force=True)
                self.stream.write("\n")
                self.stream.flush()
                self._last_draw = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PhaseProgress:
    """A `progress` callback drawing one line on a terminal (nothing otherwise):
    `LABEL: PHASE DONE/TOTAL` (bytes for gc's `repack`)."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled = self.stream.isatty()
        self.label = label
        self.drawn = False

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        show = human_bytes if phase == "repack" else str
        of = f" / {show(total)}" if total else ""
        self.stream.write(f"\r{self.label}: {phase} {show(done)}{of}\x1b[K")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
