# SPDX-License-Identifier: GPL-2.0-or-later
"""Garbage collection under the real dom0 client: three real backups through
the simulated dom0, the oldest deleted, a `qbackupd gc` beside the running
sim daemon SIGKILLed part way (a process of its own, as a timer would run
it), then finished; dom0's `verify --all` authenticates every chunk of every
snapshot left, and a restore of the oldest remaining one matches."""

from __future__ import annotations

import filecmp
import shutil
import signal
import subprocess
from pathlib import Path

from simdata import fill
from qbackup_sim.daemon import daemon_command

GC_CHILD = Path(__file__).parents[1] / "daemon" / "gc_child.py"


def child(storage: Path, kill_at: int) -> list[str]:
    """gc_child.py on the interpreter the sim's daemon runs on (the backup qube's)."""
    return [daemon_command()[0], str(GC_CHILD), str(storage), "default", str(kill_at), "100"]


def test_gc_killed_then_finished_and_dom0_verifies_everything(sim, tmp_path):
    sim.init()
    images = {}
    for generation in range(3):
        if generation:
            fill(sim.image("work", "private"), 10 + generation, 0.3)  # rewrite a part of it
        sim.run("backup", "--all")
        images[generation] = tmp_path / f"work-private-{generation}.img"
        images[generation].write_bytes(sim.image("work", "private").read_bytes())
    snapshots = [s["id"] for s in sim.json("list")["snapshots"]]
    assert len(snapshots) == 3
    sim.run("delete", snapshots[0])
    storage = sim.dir / "storage"
    packs_before = set(storage.glob("default/packs/*/*.pack"))

    # how many steps a whole collection takes here (on a copy), to kill the real one late:
    # in its sweep, after it has copied live blobs and while it deletes packs
    shutil.copytree(storage, tmp_path / "copy", symlinks=True)
    whole = subprocess.run(child(tmp_path / "copy", 10**9), capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0 and whole.stdout.startswith("done"), whole.stdout + whole.stderr
    steps = int(whole.stdout.split()[1])
    killed = subprocess.run(child(storage, steps - 3), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    finished = subprocess.run(
        daemon_command("gc", "--storage", str(storage), "default"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert set(storage.glob("default/packs/*/*.pack")) != packs_before  # it deleted or rewrote packs

    verified = sim.run("verify", "--all")
    assert "FAILED" not in verified.stdout and verified.stdout.count("OK") == 2
    target = tmp_path / "restored"
    sim.run("restore", snapshots[1], "--volume-target", f"work:private={target}")
    assert filecmp.cmp(target, images[1], shallow=False)
    check = subprocess.run(
        daemon_command("check", "--read-data", "--storage", str(storage), "default"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
