# SPDX-License-Identifier: GPL-2.0-or-later
"""`SimBackend`: the simulated dom0 behind qbackup's `qubes.Backend` interface.

`list_qubes` reads the sim's inventory; `connect` does what qrexec does for
`qubes.BackupChunk+REPO`: starts the backup qube's service (the real daemon)
if needed and connects to its socket, sending the same header qrexec sends.
"""

from __future__ import annotations

import os
from pathlib import Path

from qbackup import transport
from qbackup.qubes import QubeInfo
from qbackup_sim.daemon import socket_path, start_daemon
from qbackup_sim.inventory import SimError, load_inventory, qube_infos


class SimBackend:
    """The Backend for the sim in `directory`."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).absolute()
        self.inventory = load_inventory(self.directory)

    @property
    def backup_vm(self) -> str:
        """The inventory's backup qube."""
        return self.inventory["backup_vm"]

    def list_qubes(self) -> list[QubeInfo]:
        return qube_infos(self.directory, self.inventory)

    def connect(self, backup_vm: str, repo: str) -> transport.Transport:
        if backup_vm not in self.inventory["qubes"]:
            raise SimError(f"backup qube {backup_vm!r} does not exist")
        start_daemon(self.directory)
        return transport.unix_socket(str(socket_path(self.directory)), repo)
