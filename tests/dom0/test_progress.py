# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests for qbackup.progress: TTY-only drawing, throttling, figures, threads."""

import io
import threading

import pytest

from qbackup.progress import Progress, human_bytes


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (64 << 20, "64.0 MiB"), (3 << 30, "3.0 GiB"), (5 << 50, "5.0 PiB"),
    (1 << 62, "4096.0 PiB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_silent_when_not_a_terminal():
    stream = io.StringIO()
    with Progress(1000, "backup", stream) as progress:
        progress.start("work:private", 1000)
        progress.advance(500)
        progress.advance(500)
        progress.done()
    assert progress.done_bytes == 1000
    assert stream.getvalue() == ""


def test_draws_figures_and_ends_the_line():
    stream, clock = Terminal(), Clock()
    progress = Progress(100 << 20, "backup", stream, clock=clock)
    progress.start("work:private", 100 << 20)
    clock.now += 2
    progress.advance(25 << 20)  # 25 MiB in 2 s: 12.5 MiB/s, 75 MiB left: 6 s
    line = stream.getvalue().rsplit("\r", 1)[1]
    assert line.endswith("\x1b[K")
    assert line.startswith("backup work:private: 25.0 MiB / 100.0 MiB 25%")
    assert "12.5 MiB/s" in line and "ETA 0:00:06" in line
    progress.done()
    assert "work:private" not in progress.line(clock.now)
    progress.close()
    assert stream.getvalue().endswith("\n")
    progress.close()  # idempotent: no second newline
    assert stream.getvalue().count("\n") == 1


def test_redraws_at_most_every_interval():
    stream, clock = Terminal(), Clock()
    progress = Progress(1000, "x", stream, clock=clock, interval=0.25)
    for i in range(100):
        clock.now += 0.01
        if i % 10 == 0:
            progress.start(f"volume{i}", 10)
        progress.advance(1)
    # 1 s of updates at 0.25 s intervals: the first draw, then 4 more at most
    assert 4 <= stream.getvalue().count("\r") <= 5


def test_no_eta_when_done_or_total_unknown():
    stream, clock = Terminal(), Clock()
    progress = Progress(0, "verify", stream, clock=clock)
    clock.now += 1
    progress.advance(2048)
    assert "verify: 2.0 KiB  2.0 KiB/s" in stream.getvalue()
    assert "ETA" not in stream.getvalue() and "%" not in stream.getvalue()
    finished = Progress(10, "y", Terminal(), clock=clock)
    finished.advance(10)
    assert "100%" in finished.line(clock.now + 1)
    assert "ETA" not in finished.line(clock.now + 1)


def test_never_shows_more_than_100_percent():
    progress = Progress(10, "z", Terminal(), clock=Clock())
    progress.advance(15)  # the total was an estimate
    assert "100%" in progress.line(101.0)


def test_counts_from_many_threads():
    progress = Progress(0, "t", Terminal())

    def work() -> None:
        for _ in range(10000):
            progress.advance(3)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert progress.done_bytes == 8 * 10000 * 3


def test_nothing_written_if_never_drawn():
    stream = Terminal()
    Progress(10, "n", stream).close()
    assert stream.getvalue() == ""
