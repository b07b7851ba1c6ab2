# SPDX-License-Identifier: GPL-2.0-or-later
"""Fixtures for the packaging tests: the packages built once per session
(`make rpm deb` into a temporary BUILDDIR, from the files git tracks), and
the deb installed into a throwaway root. Handed out through fixtures only.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pkgbuild import REPO, SYSTEM_PATH, run


@dataclass
class Built:
    builddir: Path
    version: str
    dom0_rpm: Path
    vm_rpm: Path
    srpm: Path
    deb: Path
    changes: Path


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Built:
    """`make rpm deb` into a temporary BUILDDIR."""
    version = (REPO / "version").read_text().strip()
    builddir = tmp_path_factory.mktemp("pkg")
    deps = run(["dpkg-checkbuilddeps"], check=False)
    if deps.returncode != 0:
        pytest.fail(f"the deb's build dependencies are missing: {deps.stderr.strip()}", pytrace=False)
    run(["make", "--no-print-directory", "rpm", "deb", f"BUILDDIR={builddir}"])
    rpms = builddir / "rpm" / "RPMS" / "noarch"
    result = Built(
        builddir=builddir,
        version=version,
        dom0_rpm=rpms / f"qbackup-dom0-{version}-1.noarch.rpm",
        vm_rpm=rpms / f"qbackup-vm-{version}-1.noarch.rpm",
        srpm=builddir / "rpm" / "SRPMS" / f"qbackup-{version}-1.src.rpm",
        deb=builddir / "deb" / f"qbackup-vm_{version}_all.deb",
        changes=builddir / "deb" / f"qbackup_{version}_amd64.changes",
    )
    if not result.changes.exists():  # named after the build machine's architecture
        result.changes = next((builddir / "deb").glob(f"qbackup_{version}_*.changes"))
    for path in (result.dom0_rpm, result.vm_rpm, result.srpm, result.deb):
        assert path.is_file(), f"make rpm deb did not produce {path.name}"
    return result


def _dpkg_root(path: Path) -> Path:
    """An empty root with an empty dpkg database."""
    for sub in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    for name in ("status", "available"):
        (path / "var/lib/dpkg" / name).touch()
    return path


@pytest.fixture(scope="session")
def dpkg_in_root(tmp_path_factory):
    """dpkg on a throwaway root, maintainer scripts run outside a chroot with
    DPKG_ROOT set (--force-script-chrootless), as debootstrap-less installs
    do. bookworm's py3compile/py3clean do not know DPKG_ROOT (they would
    compile the host's /usr/lib/python3): no-op stand-ins replace them, and
    nothing else."""
    shims = tmp_path_factory.mktemp("shims")
    for tool in ("py3compile", "py3clean"):
        (shims / tool).write_text("#!/bin/sh\nexit 0\n")
        (shims / tool).chmod(0o755)

    def dpkg(root: Path, *args: str) -> subprocess.CompletedProcess:
        return run(["dpkg", f"--root={root}", "--force-script-chrootless", "--force-depends", "--force-not-root",
                    *args], env={"PATH": f"{shims}:{SYSTEM_PATH}"})

    return dpkg


@pytest.fixture(scope="session")
def deb_root(built, dpkg_in_root, tmp_path_factory) -> Path:
    """The deb installed (and configured) into a throwaway root."""
    root = _dpkg_root(tmp_path_factory.mktemp("debroot"))
    dpkg_in_root(root, "-i", str(built.deb))
    return root


@pytest.fixture
def new_dpkg_root(tmp_path) -> Path:
    return _dpkg_root(tmp_path / "root")


@pytest.fixture(scope="session")
def rpm_root(built, tmp_path_factory) -> Path:
    """Both rpms installed into a throwaway root: files only (--noscripts:
    there is no shell in the root to run scriptlets in)."""
    root = tmp_path_factory.mktemp("rpmroot")
    run(["rpm", f"--root={root}", "--initdb"])
    run(["rpm", f"--root={root}", "-i", "--nodeps", "--noscripts", str(built.dom0_rpm), str(built.vm_rpm)])
    return root


# qubesd.service comes with Qubes' dom0 (qbackup-job@.service requires it).
QUBESD_STAND_IN = "[Unit]\nDescription=stand-in for Qubes' qubesd\n[Service]\nExecStart=/bin/sh -c true\n"


def _verify_root(installed: Path, units: str, destination: Path) -> Path:
    """A copy of an installed root with what `systemd-analyze verify --root`
    needs besides our units: the host's own units (sysinit.target, ...), a
    stand-in qubesd.service and /bin/sh (ExecStartPre= of the socket)."""
    shutil.copytree(installed, destination, symlinks=True, dirs_exist_ok=True)
    unit_dir = destination / units
    unit_dir.mkdir(parents=True, exist_ok=True)
    for host_units in (Path("/lib/systemd/system"), Path("/usr/lib/systemd/system")):
        if host_units.is_dir():
            for unit in host_units.iterdir():
                target = unit_dir / unit.name
                if not target.exists() and not target.is_symlink() and unit.is_file():
                    shutil.copy2(unit, target)
    (unit_dir / "qubesd.service").write_text(QUBESD_STAND_IN)
    (destination / "bin").mkdir(exist_ok=True)
    shutil.copy2(Path("/bin/sh").resolve(), destination / "bin" / "sh")
    return destination


@pytest.fixture(scope="session")
def verify_roots(deb_root, rpm_root, tmp_path_factory) -> dict[str, Path]:
    """{"deb": root, "rpm": root} ready for systemd-analyze --root."""
    return {
        "deb": _verify_root(deb_root, "lib/systemd/system", tmp_path_factory.mktemp("verify-deb")),
        "rpm": _verify_root(rpm_root, "usr/lib/systemd/system", tmp_path_factory.mktemp("verify-rpm")),
    }
