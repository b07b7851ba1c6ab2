# SPDX-License-Identifier: GPL-2.0-or-later
"""Simulated Qubes dom0 for developing and testing qbackup (never shipped).

A sim directory holds `inventory.json` (the qubes and their volumes),
`volumes/` (image files), `storage/` (the backup qube's storage) and the
daemon's socket, pid file and log. `SimBackend` stands in for qbackup's
qubesadmin backend; `python -m qbackup_sim` creates, starts, stops and
inspects sims.
"""

from qbackup_sim.backend import SimBackend, run_qbackup
from qbackup_sim.daemon import daemon_pid, socket_path, start_daemon, stop_daemon
from qbackup_sim.ext4 import make_ext4_image, read_file, write_files
from qbackup_sim.inventory import SimError, create_sim, load_inventory, save_inventory

__all__ = ["SimBackend", "run_qbackup", "SimError", "create_sim", "daemon_pid", "load_inventory",
           "make_ext4_image", "read_file", "save_inventory", "socket_path",
           "start_daemon", "stop_daemon", "write_files"]
