# SPDX-License-Identifier: GPL-2.0-or-later
"""Helpers of the packaging tests (imported by name: `from pkgbuild import ...`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
BUILD_TIMEOUT = 600  # a guard against a hang, not a performance assertion


def run(cmd: list[str], *, cwd: Path = REPO, env: dict | None = None, timeout: int = BUILD_TIMEOUT,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run a distribution tool with the distribution's PATH; on failure the
    test fails with the command, its exit status and its output's tail."""
    full_env = {**os.environ, "PATH": SYSTEM_PATH, "LC_ALL": "C.UTF-8", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        pytest.fail(f"{' '.join(cmd)} failed with exit status {proc.returncode}:\n{tail}", pytrace=False)
    return proc
