# SPDX-License-Identifier: GPL-2.0-or-later
"""Jobs end to end on the simulated dom0: `qbackup check`, `qbackup backup
--job`, `qbackup status`, and the systemd service/timer pair run the way
systemd runs it (no terminal, the passphrase from the job's file)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qbackup.commands.jobs import job_lock

REPO = Path(__file__).resolve().parent.parent.parent
UNITS = REPO / "dom0" / "systemd"
TIMEOUT = 300  # a hang guard, never a performance assertion

# The job passphrase file must be root's, mode 0600: these tests run as root.
pytestmark = pytest.mark.root


@pytest.fixture
def job_sim(sim, tmp_path):
    """The sim, initialised, with a jobs file and a root-only passphrase file."""
    sim.init()
    pw = tmp_path / "job.pass"
    pw.write_bytes(sim.passphrase_file.read_bytes())
    pw.chmod(0o600)
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(f"""
[jobs.daily]
backup_vm = "backup"
repo = "default"
include = ["work"]
passphrase_file = "{pw}"

[jobs.full]
backup_vm = "backup"
repo = "default"
include = ["@all"]
passphrase_file = "{pw}"

[jobs.broken]
backup_vm = "backup"
repo = "default"
include = ["work", "ghost"]
passphrase_file = "{pw}"
""")
    sim.jobs_file = jobs
    return sim


def qbackup(sim, *args, expect=None):
    """Run qbackup against the sim with the test's jobs file and no
    passphrase option (jobs bring their own)."""
    proc = subprocess.run([sys.executable, "-m", "qbackup_sim", "run", str(sim.dir),
                           "--jobs-file", str(sim.jobs_file), *args],
                          capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)
    if expect is not None:
        assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def test_check_says_what_is_and_is_not_backed_up(job_sim):
    out = qbackup(job_sim, "check", "daily", expect=6).stdout
    assert "job daily: backs up to repository default in backup" in out
    assert "included (1):\n  work    named" in out
    assert "not included (2):" in out
    assert "  backup  the backup qube (it holds the repository)" in out
    assert "  tpl     not selected" in out
    assert "work uses tpl as its template, which the job does not include" in out
    assert "backup qube: " in out and " free of " in out
    assert out.rstrip().endswith("job daily: runs, see the warnings above")
    clean = qbackup(job_sim, "check", "full", "--json", expect=0)
    report = json.loads(clean.stdout)
    assert report["included"] == {"tpl": "@all", "work": "@all"}
    assert report["errors"] == report["warnings"] == []
    assert report["volumes"] == 3 and report["backup_vm_free"] > 0
    refused = qbackup(job_sim, "check", "broken", expect=7)
    assert "include names ghost, which does not exist" in refused.stdout
    assert "job broken: refused" in refused.stdout


def test_check_of_an_unknown_job_or_a_bad_file(job_sim):
    proc = qbackup(job_sim, "check", "weekly", expect=1)
    assert proc.stderr.strip() == ("qbackup: error: no job 'weekly' "
                                   "(jobs: broken, daily, full)")
    job_sim.jobs_file.write_text("[jobs.x]\nbackup_vm = 'backup'\nincldue = ['work']\n")
    proc = qbackup(job_sim, "check", "x", expect=1)
    assert f"{job_sim.jobs_file}:3: job 'x': unknown key 'incldue'" in proc.stderr


def test_job_run_and_status(job_sim):
    assert "daily: never run" in qbackup(job_sim, "status", expect=0).stdout
    proc = qbackup(job_sim, "backup", "--job", "daily", "--json", expect=0)
    figures = json.loads(proc.stdout)
    assert figures["job"] == "daily" and figures["qubes"] == ["work"]
    assert "warning: work uses tpl as its template" in proc.stderr
    status = qbackup(job_sim, "status", expect=0).stdout
    assert "daily: ok at " in status and f"snapshot {figures['snapshot'][:16]}" in status
    report = json.loads(qbackup(job_sim, "status", "--json", expect=0).stdout)
    daily = next(j for j in report["jobs"] if j["job"] == "daily")
    assert daily["state"] == "ok" and daily["figures"]["snapshot"] == figures["snapshot"]
    # the backup is a normal snapshot of the repository
    listed = subprocess.run(job_sim.argv("list", "--json"), capture_output=True, text=True,
                            timeout=TIMEOUT, check=True).stdout
    assert [s["id"] for s in json.loads(listed)["snapshots"]] == [figures["snapshot"]]


def test_a_job_check_rejects_is_refused_and_recorded(job_sim):
    proc = qbackup(job_sim, "backup", "--job", "broken", expect=1)
    assert proc.stderr.strip().endswith(
        "qbackup: error: job broken refused: include names ghost, which does not exist")
    status = qbackup(job_sim, "status", expect=1).stdout
    assert "broken: failed at " in status and "include names ghost" in status
    usage = qbackup(job_sim, "backup", "--job", "daily", "tpl", expect=2)
    assert "job daily chooses the qubes" in usage.stderr
    usage = qbackup(job_sim, "--backup-vm", "other", "backup", "--job", "daily", expect=2)
    assert "--backup-vm other contradicts job daily (backup)" in usage.stderr


def test_a_running_job_is_not_run_twice(job_sim):
    with job_lock(str(job_sim.dir / "dom0-run"), "daily"):
        proc = qbackup(job_sim, "backup", "--job", "daily", expect=1)
        assert proc.stderr.strip() == "qbackup: error: job daily is already running"
        assert "daily: running" in qbackup(job_sim, "status").stdout


def test_a_killed_run_shows_as_failed(job_sim):
    state = job_sim.dir / "dom0-state" / "jobs"
    state.mkdir(parents=True)
    (state / "daily.json").write_text(json.dumps({"state": "running", "started": 1.0,
                                                  "pid": 999999}))
    status = qbackup(job_sim, "status", expect=1).stdout
    assert "daily: failed since " in status and "ended without recording" in status


def test_the_systemd_service_runs_a_job_with_no_terminal(job_sim):
    """The unit's own ExecStart, with %i the job and /usr/bin/qbackup the
    sim's runner, in a new session (no controlling terminal), stdin closed:
    as systemd runs it. Its stdout, for the journal, is one JSON line."""
    unit = (UNITS / "qbackup-job@.service").read_text()
    exec_start = next(line.split("=", 1)[1] for line in unit.splitlines()
                      if line.startswith("ExecStart="))
    argv = shlex.split(exec_start.replace("%i", "daily"))
    assert argv[0] == "/usr/bin/qbackup"
    argv = [sys.executable, "-m", "qbackup_sim", "run", str(job_sim.dir),
            "--jobs-file", str(job_sim.jobs_file), *argv[1:]]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL, start_new_session=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["job"] == "daily"
    assert "daily: ok" in qbackup(job_sim, "status", expect=0).stdout


def test_the_units_pass_systemd_analyze_verify(tmp_path):
    """In a throwaway root holding this machine's system units, a stand-in
    qubesd.service and an executable /usr/bin/qbackup."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("systemd-analyze is missing: this CI machine must provide it")
        pytest.skip("needs systemd-analyze")
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/qbackup").write_text("#!/bin/sh\n")
    (root / "usr/bin/qbackup").chmod(0o755)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    (units / "qubesd.service").write_text("[Service]\nExecStart=/usr/bin/qbackup\n")
    for unit in UNITS.iterdir():
        shutil.copy(unit, units / unit.name)
    proc = subprocess.run([analyze, "verify", f"--root={root}",
                           "/etc/systemd/system/qbackup-job@daily.service",
                           "/etc/systemd/system/qbackup-job@daily.timer"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
