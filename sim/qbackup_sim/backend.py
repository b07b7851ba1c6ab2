# SPDX-License-Identifier: GPL-2.0-or-later
"""`SimBackend`: the simulated dom0 behind qbackup's `qubes.Backend` interface.

`list_qubes` reads the sim's inventory; `connect` does what qrexec does for
`qubes.BackupChunk+REPO`: starts the backup qube's service (the real daemon)
if needed and connects to its socket, sending the same header qrexec sends;
restore's changes (creating qubes, importing volumes, ...) are in
`qbackup_sim.changes`.

`run_qbackup(DIR, ARGV)` runs the real `qbackup` command line with this
backend: the dom0 package itself never imports the simulation.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from qbackup import cli, transport
from qbackup.qubes import QubeDetails, QubeInfo
from qbackup_sim.changes import SimChanges
from qbackup_sim.daemon import socket_path, start_daemon
from qbackup_sim.inventory import SimError, load_inventory, qube_details, qube_infos


class SimBackend(SimChanges):
    """The Backend for the sim in `directory` (restore's changes: SimChanges)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).absolute()
        self.inventory = load_inventory(self.directory)

    @property
    def backup_vm(self) -> str:
        """The inventory's backup qube."""
        return self.inventory["backup_vm"]

    def list_qubes(self) -> list[QubeInfo]:
        return qube_infos(self.directory, self.inventory)

    def qube_details(self, name: str) -> QubeDetails:
        if name not in self.inventory["qubes"]:
            raise SimError(f"reading the settings of {name} failed: no such qube")
        return qube_details(self.inventory, name)

    def connect(self, backup_vm: str, repo: str) -> transport.Transport:
        if backup_vm not in self.inventory["qubes"]:
            raise SimError(f"backup qube {backup_vm!r} does not exist")
        start_daemon(self.directory)
        return transport.unix_socket(str(socket_path(self.directory)), repo)


def run_qbackup(directory: str | os.PathLike, argv: list[str]) -> int:
    """Run `qbackup ARGV` against the sim in `directory`; the exit code.

    The sim's settings stand in for /etc/qbackup/qbackup.conf: its backup
    qube, dom0's state in `DIR/dom0-state` and job locks in `DIR/dom0-run`.
    Options still win."""
    try:
        backend = SimBackend(directory)
    except SimError as e:
        print(f"qbackup: error: {e}", file=sys.stderr)
        return 1
    config = {"backup_vm": backend.backup_vm,
              "state_dir": str(backend.directory / "dom0-state"),
              "run_dir": str(backend.directory / "dom0-run")}
    return cli.run(argv, backend=lambda: backend, config=config,
                   prog=f"python -m qbackup_sim run {directory}")
