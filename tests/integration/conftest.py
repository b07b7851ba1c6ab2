# SPDX-License-Identifier: GPL-2.0-or-later
"""Fixtures for end-to-end tests: a simulated dom0 with a real daemon, and a
runner for the real `qbackup` command line in a subprocess.

`sim` is a fresh sim (template `tpl` with root + private, app qube `work`
with private + volatile, backup qube `backup`) whose volumes hold random
data with runs of zeros; its daemon is stopped when the test ends. Handed
out through fixtures only, so this module is never imported by name.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from qbackup_sim import create_sim, stop_daemon
from simdata import fill

PASSPHRASE = b"integration test passphrase\n"
SCRYPT_N = "16384"  # the cheapest cost init accepts: keeps the tests fast
TIMEOUT = 300  # guards against a hang, never a performance assertion


@dataclass
class Sim:
    """A sim directory and how to run `qbackup --sim DIR` against it."""
    dir: Path
    passphrase_file: Path

    def image(self, qube: str, volume: str) -> Path:
        return self.dir / "volumes" / qube / f"{volume}.img"

    def argv(self, *args: str, passphrase_file: Path | None = None) -> list[str]:
        pw = self.passphrase_file if passphrase_file is None else passphrase_file
        return [sys.executable, "-m", "qbackup_sim", "run", str(self.dir), *args,
                "--passphrase-file", str(pw)]

    def run(self, *args: str, expect: int | None = 0,
            passphrase_file: Path | None = None) -> subprocess.CompletedProcess:
        """Run the CLI; check its exit code unless `expect` is None."""
        proc = subprocess.run(self.argv(*args, passphrase_file=passphrase_file),
                              capture_output=True, text=True, timeout=TIMEOUT,
                              stdin=subprocess.DEVNULL)
        if expect is not None:
            assert proc.returncode == expect, (
                f"qbackup {' '.join(args)}: exit {proc.returncode}, expected {expect}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def json(self, *args: str) -> dict:
        """Run a command with --json; its one JSON object."""
        return json.loads(self.run(*args, "--json").stdout)

    def init(self) -> None:
        self.run("init", "--scrypt-n", SCRYPT_N, "--pack-size", "8M")


@pytest.fixture
def sim(tmp_path_factory) -> Sim:
    # a short path: the daemon's Unix socket lives in the sim directory
    root = create_sim(tmp_path_factory.mktemp("sim"), {
        "tpl": {"class": "TemplateVM", "label": "black",
                "volumes": {"root": 3 << 20, "private": 1 << 20}},
        "work": {"class": "AppVM", "label": "red", "template": "tpl",
                 "properties": {"memory": 400}, "features": {"f": "1"}, "tags": ["t"],
                 "volumes": {"private": (2 << 20) + 12345, "volatile": 1 << 20}}})
    fill(root / "volumes/tpl/root.img", 1)
    fill(root / "volumes/tpl/private.img", 2)
    fill(root / "volumes/work/private.img", 3)
    fill(root / "volumes/work/volatile.img", 4, 1.0)
    passphrase_file = root / "passphrase"
    passphrase_file.write_bytes(PASSPHRASE)
    yield Sim(root, passphrase_file)
    stop_daemon(root)
