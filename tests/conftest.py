# SPDX-License-Identifier: GPL-2.0-or-later
"""Suite-wide rules and fixtures.

Tests marked `root` need root and loop devices; tests marked `qubesd` need
the Qubes R4.2 sources (tests/qubes_r42.py); tests marked `packaging` need
the package build and lint tools (rpmbuild, rpmlint, debhelper, lintian,
systemd-analyze: scripts/setup.sh installs them). On a developer machine
without them they are skipped with the reason; in CI (`CI=true`) they fail
loudly instead, so a CI machine that lost its loop devices, the R4.2
sources or its tools cannot go green by running fewer tests.

Fixture `qubesd`: a real R4.2 qubesd in this process (`qubes_r42.Testbed`).
"""

from __future__ import annotations

import os
import shutil
from typing import Iterator

import pytest

import qubes_r42


def _missing_root_facilities() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/loop-control"):
        return "needs loop devices (/dev/loop-control is missing)"
    if shutil.which("losetup") is None:
        return "needs losetup (util-linux)"
    return None


# The distribution's tools, found in the distribution's PATH (package builds
# never use a venv's or pyenv's python3).
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
PACKAGING_TOOLS = ("git", "make", "rpm", "rpmbuild", "rpm2cpio", "rpmlint", "dpkg", "dpkg-buildpackage",
                   "dpkg-checkbuilddeps", "dh", "lintian", "systemd-analyze", "systemctl", "systemd-sysusers",
                   "systemd-nspawn", "nsenter", "setpriv")


def _missing_packaging_tools() -> str | None:
    missing = [tool for tool in PACKAGING_TOOLS if shutil.which(tool, path=SYSTEM_PATH) is None]
    if missing:
        return f"needs the packaging tools {' '.join(missing)} (scripts/setup.sh installs them)"
    return None


def pytest_configure(config: pytest.Config) -> None:
    """Under scripts/mutants.py, make sure the mutant is what the tests import."""
    mutant_dir = os.environ.get("QBACKUP_MUTANT_DIR")
    if mutant_dir:
        import qbackup
        if not qbackup.__file__.startswith(mutant_dir + os.sep):
            raise pytest.UsageError(f"the mutant in {mutant_dir} is not the qbackup imported "
                                    f"({qbackup.__file__})")


def pytest_runtest_setup(item: pytest.Item) -> None:
    missing = None
    if item.get_closest_marker("root") is not None:
        missing = _missing_root_facilities()
    if missing is None and item.get_closest_marker("qubesd") is not None:
        missing = qubes_r42.missing()
    if missing is None and item.get_closest_marker("packaging") is not None:
        missing = _missing_packaging_tools()
    if missing is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{missing}: this CI machine must provide it", pytrace=False)
    pytest.skip(missing)


@pytest.fixture
def qubesd(tmp_path_factory) -> Iterator[qubes_r42.Testbed]:
    """qubesd R4.2's Admin API in this process (mark the test `qubesd`)."""
    testbed = qubes_r42.Testbed(tmp_path_factory.mktemp("qubesd"))
    yield testbed
    testbed.close()
