# SPDX-License-Identifier: GPL-2.0-or-later
"""The one way qbackup runs dom0's storage tools: lvm, dmsetup, thin_delta.

Every call goes through `run(argv)`, which hands it to `current`, a
`Runner`. Tests replace `current` (monkeypatch) with one that records the
calls and answers them, so each command line qbackup gives a tool is
checked, and tools that need device-mapper can be stood in for.

A tool that fails, cannot be found or runs past its timeout raises
`ToolError` with one line: the tool, its action, and the last line it wrote
to stderr. Tools run with LC_ALL=C, stdin closed, and no shell.
"""

from __future__ import annotations

import os
import subprocess

from qbackup.errors import QbackupError

TIMEOUT = 600.0  # no storage tool qbackup runs should take longer


class ToolError(QbackupError):
    """A dom0 tool failed (one line: which, and why)."""


def describe(argv: list[str]) -> str:
    """`lvm lvcreate`, `dmsetup message`, `thin_delta`: what a command line is."""
    words = [os.path.basename(argv[0])] if argv else ["?"]
    if len(argv) > 1 and not argv[1].startswith("-"):
        words.append(argv[1])
    return " ".join(words)


class Runner:
    """Runs a command line and returns its stdout as text."""

    def run(self, argv: list[str], *, timeout: float = TIMEOUT) -> str:
        env = dict(os.environ, LC_ALL="C")
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout, env=env, close_fds=True)
        except FileNotFoundError:
            raise ToolError(f"{describe(argv)}: {argv[0]} is not installed") from None
        except subprocess.TimeoutExpired:
            raise ToolError(f"{describe(argv)} did not finish within {timeout:g} s") from None
        if proc.returncode != 0:
            lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
            raise ToolError(f"{describe(argv)} failed: {why}")
        return proc.stdout.decode("utf-8", "replace")


current: Runner = Runner()


def run(argv: list[str], *, timeout: float = TIMEOUT) -> str:
    """Run a dom0 tool through the current runner; its stdout."""
    return current.run(list(argv), timeout=timeout)
