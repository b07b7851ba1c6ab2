# SPDX-License-Identifier: GPL-2.0-or-later
"""policy/50-qbackup.policy through the real R4.2 policy parser
(qubes-core-qrexec 4.2.25's qrexec.policy.parser, from the vendored sources
that scripts/setup.sh installs into the venv; tests marked `qubesd` skip
without them, and fail in CI):

- the file parses as a whole and line by line (as qubes-policy-lint does);
- as shipped, it denies every qubes.BackupRequest and every qube's call to
  qubes.BackupChunk, and allows nothing at all;
- its commented example, put in front of it as a user's 30-user.policy
  would be, allows exactly one qube one job.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from pkgbuild import REPO

pytestmark = pytest.mark.qubesd

POLICY = REPO / "policy" / "50-qbackup.policy"
QREXEC_VERSION = "4.2.25"
EXAMPLE_PREFIX = "##qubes."  # the commented example line, uncommented by removing "##"


@pytest.fixture(scope="module")
def parser():
    assert importlib.metadata.version("qrexec") == QREXEC_VERSION, "not the vendored R4.2 qrexec"
    from qrexec.policy import parser
    return parser


def system_info():
    qubes = {"dom0": "AdminVM", "sys-backup": "AppVM", "work": "AppVM", "other-backup": "AppVM"}
    return {"domains": {name: {"tags": [], "type": kind, "template_for_dispvms": False, "default_dispvm": None,
                               "power_state": "Running", "icon": "red", "guivm": None}
                        for name, kind in qubes.items()}}


def outcome(policy, parser, service: str, argument: str, source: str, target: str) -> str:
    from qrexec.exc import AccessDenied
    request = parser.Request(service, argument, source, target, system_info=system_info())
    try:
        return type(policy.evaluate(request)).__name__
    except AccessDenied as exc:
        return f"denied ({exc})"


REQUESTS = [
    ("qubes.BackupRequest", "+daily", "sys-backup", "dom0"),
    ("qubes.BackupRequest", "+daily", "sys-backup", "@adminvm"),
    ("qubes.BackupRequest", "+weekly", "sys-backup", "dom0"),
    ("qubes.BackupRequest", "+daily", "work", "dom0"),
    ("qubes.BackupRequest", "+daily", "other-backup", "dom0"),
    ("qubes.BackupRequest", "+daily", "work", "sys-backup"),
    ("qubes.BackupChunk", "+repo", "work", "sys-backup"),
    ("qubes.BackupChunk", "+repo", "sys-backup", "sys-backup"),
    ("qubes.BackupChunk", "+", "work", "@dispvm"),
]


def test_policy_file_parses(parser):
    text = POLICY.read_text()
    policy = parser.StringPolicy(policy=text)
    assert len(policy.rules) == 3
    # qubes-policy-lint's way too: every line on its own.
    lint = subprocess.run([sys.executable, "-m", "qrexec.tools.qubes_policy_lint", str(POLICY)],
                          capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0 and lint.stdout == "", lint.stdout + lint.stderr


def test_shipped_policy_denies_everything(parser):
    policy = parser.StringPolicy(policy=POLICY.read_text())
    assert {type(rule.action).__name__ for rule in policy.rules} == {"Deny"}
    for request in REQUESTS:
        assert outcome(policy, parser, *request).startswith("denied (denied by policy"), request


def test_commented_example_allows_one_qube_one_job(parser):
    text = POLICY.read_text()
    examples = [line[2:] for line in text.splitlines() if line.startswith(EXAMPLE_PREFIX)]
    assert examples == ["qubes.BackupRequest  +daily  sys-backup  @adminvm  allow"]
    policy = parser.StringPolicy(policy={"__main__": "!include 30-user\n!include 50-qbackup\n",
                                         "30-user": examples[0] + "\n", "50-qbackup": text})
    allowed = [request for request in REQUESTS if outcome(policy, parser, *request) == "AllowResolution"]
    assert allowed == REQUESTS[:2]  # sys-backup's daily job, named as dom0 or @adminvm: nothing else
