# SPDX-License-Identifier: GPL-2.0-or-later
"""Progress reports and cancellation of the daemon's long operations
(garbage collection, check, usage), which run in a worker thread.

A ``Monitor`` is called often, cheaply; it passes at most one report per
``interval`` seconds to its callback (every report with ``force``), and
raises ``Cancelled`` as soon as its ``stop`` callable says so — the
operation then unwinds at a point where everything it wrote is consistent.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Progress = Callable[[str, int, int], None]  # (phase, done, total); total 0 = unknown


class Cancelled(Exception):
    """The operation was asked to stop (client gone, daemon stopping, Ctrl-C)."""


class Monitor:
    def __init__(
        self,
        progress: Progress | None = None,
        stop: Callable[[], bool] | None = None,
        interval: float = 1.0,
    ):
        self._progress = progress
        self._stop = stop
        self._interval = interval
        self._last = 0.0

    def check(self) -> None:
        """Raise ``Cancelled`` if the operation must stop."""
        if self._stop is not None and self._stop():
            raise Cancelled("stopped before the end (what was done is kept; run it again to go on)")

    def __call__(self, phase: str, done: int, total: int = 0, force: bool = False) -> None:
        self.check()
        if self._progress is None:
            return
        now = time.monotonic()
        if force or now - self._last >= self._interval:
            self._last = now
            self._progress(phase, done, total)
