# SPDX-License-Identifier: GPL-2.0-or-later
"""The demo (`make demo` runs it in demo-out/) runs to the end and checks out."""

import subprocess
import sys

from qbackup_sim import daemon_pid

TIMEOUT = 600  # guards against a hang, never a performance assertion


def test_demo_runs_and_checks_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    (out / "leftover").write_text("wiped first")
    proc = subprocess.run([sys.executable, "-m", "qbackup_sim.demo", str(out)],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo OK" in proc.stdout
    assert proc.stdout.count("matches the") == 9  # 3 volumes, 2 restores to files, 1 of qubes
    assert proc.stdout.count("the same as the original") == 2  # the settings of both qubes
    assert "refusing to overwrite without --force" in proc.stdout
    assert not (out / "leftover").exists()
    assert daemon_pid(out) is None and daemon_pid(out / "reinstalled") is None


def test_demo_usage():
    proc = subprocess.run([sys.executable, "-m", "qbackup_sim.demo"], capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 2 and "usage" in proc.stderr
