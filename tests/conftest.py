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
Fixture `reflink_fs` (mark the test `root`): a directory on a real btrfs or
xfs file system (a loop device, one of each per test session), for
file-reflink pools; parametrize it with `indirect=True`, or use `btrfs_dir`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
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


# -- real reflink file systems on loop devices ------------------------------------

LOOP_FS_SIZE = 512 << 20  # sparse; xfs with reflink needs 300 MiB at least
_MKFS = {"btrfs": ["mkfs.btrfs", "-q", "-f"], "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"]}


class _LoopFs:
    def __init__(self, kind: str):
        self.kind = kind
        self.base = Path(tempfile.mkdtemp(prefix=f"qbackup-{kind}-"))
        self.image = self.base / "fs.img"
        self.mount = self.base / "mnt"
        self.mounted = False

    def start(self) -> Path:
        with open(self.image, "wb") as f:
            f.truncate(LOOP_FS_SIZE)
        subprocess.run([*_MKFS[self.kind], str(self.image)], check=True, capture_output=True)
        self.mount.mkdir()
        subprocess.run(["mount", "-o", "loop", str(self.image), str(self.mount)], check=True,
                       capture_output=True)
        self.mounted = True
        return self.mount

    def stop(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.mount)], check=False, capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def _loop_filesystems() -> Iterator[dict]:
    started: dict[str, _LoopFs] = {}
    yield started
    for fs in started.values():
        fs.stop()


def _fs_dir(kind: str, filesystems: dict, request) -> Path:
    missing = _missing_root_facilities()
    if missing is not None:  # the `root` marker decides: skip, or fail in CI
        pytest.skip(missing)
    if kind not in filesystems:
        fs = _LoopFs(kind)
        filesystems[kind] = fs
        fs.start()
    # one directory per test, removed after it
    path = Path(tempfile.mkdtemp(prefix="t-", dir=filesystems[kind].mount))
    request.addfinalizer(lambda: shutil.rmtree(path, ignore_errors=True))
    return path


@pytest.fixture(params=["btrfs", "xfs"])
def reflink_fs(request, _loop_filesystems) -> Path:
    """An empty directory on a real btrfs or xfs (reflink) file system."""
    return _fs_dir(request.param, _loop_filesystems, request)


@pytest.fixture
def no_reflink_dir() -> Iterator[Path]:
    """An empty directory on tmpfs, which cannot make reflink copies
    (unlike /tmp on a btrfs or xfs root)."""
    path = Path(tempfile.mkdtemp(prefix="qbackup-noreflink-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def btrfs_dir(request, _loop_filesystems) -> Path:
    """An empty directory on a real btrfs file system."""
    return _fs_dir("btrfs", _loop_filesystems, request)
