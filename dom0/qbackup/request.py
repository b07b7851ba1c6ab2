# SPDX-License-Identifier: GPL-2.0-or-later
"""The dom0 qrexec service `qubes.BackupRequest+JOB`: a backup qube asks dom0
to run one named, pre-configured job, and nothing else (docs/JOBS.md).

qrexec runs it in dom0 as the dom0 user for calls the policy allows
(policy/50-qbackup.policy denies all by default). The caller is untrusted:
its only input is the service argument, the job's name, checked strictly.
The job must exist and name the calling qube as its backup qube; it must not
be running. Then its systemd unit `qbackup-job@JOB.service` is started
without waiting, and one line goes back to the caller: `started`, or
`refused: REASON`. The outcome of the run is in dom0, in `qbackup status`,
never sent to the backup qube.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable, Mapping

from qbackup import jobs
from qbackup.commands.common import DEFAULT_RUN_DIR, JOBS_FILE
from qbackup.commands.jobs import job_running
from qbackup.errors import QbackupError
from qbackup.transport import QUBE_NAME_RE

UNIT = "qbackup-job@{}.service"


def start_unit(job: str) -> None:
    """Start the job's unit without waiting for it (as root: through sudo
    when the service runs as the dom0 user, who has it in Qubes)."""
    command = ["systemctl", "start", "--no-block", UNIT.format(job)]
    if os.geteuid() != 0:
        command = ["sudo", "-n", "--", *command]
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)


def handle(environ: Mapping[str, str], *, jobs_file: str = JOBS_FILE,
           run_dir: str = DEFAULT_RUN_DIR,
           start: Callable[[str], None] = start_unit) -> tuple[int, str]:
    """(exit code, the one line for the caller) for one request."""
    untrusted_source = environ.get("QREXEC_REMOTE_DOMAIN", "")
    untrusted_job = environ.get("QREXEC_SERVICE_ARGUMENT", "")
    if not QUBE_NAME_RE.fullmatch(untrusted_source) or untrusted_source == "dom0":
        return 1, "refused: no calling qube"
    source = untrusted_source
    if not jobs.JOB_NAME_RE.fullmatch(untrusted_job):
        return 1, "refused: the argument must be a job name (qubes.BackupRequest+JOB)"
    name = untrusted_job
    try:
        job = jobs.load_jobs(jobs_file).get(name)
    except QbackupError:
        return 1, "refused: dom0's jobs file is broken (see qbackup check in dom0)"
    # The same answer whether the job does not exist or belongs to another
    # backup qube: a backup qube learns nothing about other jobs.
    if job is None or job.backup_vm != source:
        return 1, f"refused: no job {name} for {source}"
    if job_running(run_dir, name):
        return 1, f"refused: job {name} is running"
    try:
        start(name)
    except (OSError, subprocess.SubprocessError):
        return 1, f"refused: dom0 could not start job {name}"
    return 0, f"started job {name}; its outcome is in dom0 (qbackup status)"


def main() -> int:
    code, line = handle(os.environ)
    print(line, flush=True)
    print(f"qubes.BackupRequest from {os.environ.get('QREXEC_REMOTE_DOMAIN', '?')!r}: "
          f"{line}", file=sys.stderr)  # dom0's log
    return code
