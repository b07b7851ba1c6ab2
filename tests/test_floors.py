# SPDX-License-Identifier: GPL-2.0-or-later
"""The library floors: declared alike everywhere, and really tested.

requirements-floor.txt pins, for each side, the library versions its target
ships: dom0 (Qubes R4.2, Fedora 37) and the backup qube's template (Debian
12). They must be exactly the ">=" floors of dom0/ and vm-service/
pyproject.toml, from which the packages' requirements are generated (rpm:
python3.11dist(NAME) >= FLOOR; Debian: ${python3:Depends}); the rpm spec and
debian/control may name no other version, so that none can drift alone.

`make test-floor` runs the suites on the floors with QBACKUP_FLOOR set to
the side (dom0 or vm). Then the libraries must be exactly the floors, built
as the distributions build them (msgpack's C extension, not its pure-Python
fallback), and the daemon, which the dom0 run starts on the interpreter in
QBACKUP_SIM_DAEMON_PYTHON, must run on Debian 12's own packages.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from floors import NAME, SIDES, VERSION, floors

ROOT = Path(__file__).resolve().parent.parent
PYPROJECTS = {"dom0": ROOT / "dom0/pyproject.toml", "vm": ROOT / "vm-service/pyproject.toml"}
assert tuple(PYPROJECTS) == SIDES
FLOOR = os.environ.get("QBACKUP_FLOOR")  # the side whose floors this run has, if any
DEBIAN_PACKAGES = Path("/usr/lib/python3/dist-packages")


def release(text: str) -> tuple[int, ...]:
    """The numeric release of a version, trailing zeros dropped: 1.0 == 1.0.0."""
    match = re.match(VERSION, text)
    assert match, f"unparsable version {text!r}"
    parts = [int(part) for part in match[0].split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def test_floor_file_pins_both_sides():
    pinned = floors()
    assert set(pinned["dom0"]) == {"cryptography", "msgpack", "zstandard"}
    assert set(pinned["vm"]) == {"msgpack", "trio"}


@pytest.mark.parametrize("side", PYPROJECTS)
def test_pyproject_declares_the_floors(side):
    project = tomllib.loads(PYPROJECTS[side].read_text())["project"]
    declared = {}
    for dependency in project["dependencies"]:
        match = re.fullmatch(rf"({NAME})>=({VERSION})", dependency)
        assert match, f"{PYPROJECTS[side]}: {dependency!r} is not NAME>=FLOOR"
        declared[match[1]] = match[2]
    assert declared == floors()[side]


def spec_requires() -> dict[str, dict[str, str | None]]:
    """The rpm spec's python3-* Requires: {subpackage: {name: version or None}}."""
    result: dict[str, dict[str, str | None]] = {}
    package = None
    for line in (ROOT / "rpm_spec/qbackup.spec.in").read_text().splitlines():
        if match := re.fullmatch(r"%package\s+(\S+)", line.strip()):
            package = match[1]
            result[package] = {}
        elif re.match(r"%[a-z]", line):  # %description, %files, ...: the preamble ends
            package = None
        elif match := re.fullmatch(rf"Requires:\s+python3-({NAME})(?:\s*>=\s*(\S+))?\s*", line):
            assert package is not None, f"rpm spec: {line!r} outside a subpackage's preamble"
            result[package][match[1]] = match[2]
    return result


def debian_depends() -> dict[str, dict[str, str | None]]:
    """debian/control's python3-* Depends: {package: {name: version or None}}."""
    result: dict[str, dict[str, str | None]] = {}
    for paragraph in (ROOT / "debian/control").read_text().split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*(?:\n .*)*)", paragraph, re.M))
        if "Package" not in fields:
            continue
        depends = result[fields["Package"]] = {}
        for entry in fields.get("Depends", "").split(","):
            if match := re.fullmatch(rf"python3-({NAME})(?:\s*\(>=\s*([^)\s]+)\))?", entry.strip()):
                depends[match[1]] = match[2]
    return result


@pytest.mark.parametrize("package, requires, side", [
    ("qbackup-dom0 rpm", lambda: spec_requires()["dom0"], "dom0"),
    ("qbackup-vm rpm", lambda: spec_requires()["vm"], "vm"),
    ("qbackup-vm deb", lambda: debian_depends()["qbackup-vm"], "vm"),
])
def test_packages_name_no_other_version(package, requires, side):
    """The generators take the floors from pyproject.toml; a version that the
    spec or control file names itself must be that floor."""
    for name, floor in requires().items():
        if floor is not None:
            assert floors()[side].get(name) == floor, f"{package}: python3-{name} >= {floor}"


def test_installed_libraries_are_at_least_the_floors():
    """In .venv (both sides' libraries), or in a floor run (its side's)."""
    for side, pinned in floors().items():
        if FLOOR in (None, side):
            for name, floor in pinned.items():
                assert release(version(name)) >= release(floor), f"{side}: {name} {version(name)} < {floor}"


floor_run = pytest.mark.skipif(FLOOR is None, reason="runs in make test-floor (QBACKUP_FLOOR=dom0|vm)")

# Run by the daemon's interpreter: what the daemon imports besides the
# standard library and itself, from where, and which versions. (Modules that
# come from no file, such as Cython's cython_runtime, are left out.)
DAEMON_PROBE = """
import json, sys
from importlib.metadata import version
before = set(sys.modules)
import qbackupd.cli, qbackupd.server
imported = {name.partition(".")[0] for name in set(sys.modules) - before}
def where(module):
    return getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), None)
import msgpack
print(json.dumps({
    "modules": {name: where(sys.modules[name])
                for name in sorted(imported - set(sys.stdlib_module_names) - {"qbackupd"})
                if where(sys.modules[name])},
    "versions": {name: version(name) for name in ("msgpack", "trio")},
    "msgpack": msgpack.Unpacker.__module__}))
"""


@floor_run
def test_this_run_has_exactly_its_sides_floors():
    import msgpack

    assert FLOOR in ("dom0", "vm")
    assert {name: version(name) for name in floors()[FLOOR]} == floors()[FLOOR]
    assert msgpack.Unpacker.__module__ == "msgpack._cmsgpack", (
        "msgpack runs its pure-Python fallback, which neither Fedora nor Debian ships "
        "(was it built without g++?)")
    if FLOOR == "dom0":
        import zstandard

        assert zstandard.backend == "cext"


@floor_run
def test_the_daemon_runs_on_debian_12s_own_packages():
    if FLOOR == "dom0":
        from qbackup_sim.daemon import DAEMON_PYTHON

        python = os.environ.get(DAEMON_PYTHON)
        assert python, f"{DAEMON_PYTHON} must name the backup qube's floor venv's python"
    else:
        python = sys.executable
    probe = subprocess.run([python, "-c", DAEMON_PROBE], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    daemon = json.loads(probe.stdout)
    assert daemon["versions"] == floors()["vm"]
    assert daemon["msgpack"] == "msgpack._cmsgpack"
    assert {"trio", "msgpack"} <= set(daemon["modules"])
    elsewhere = {name: path for name, path in daemon["modules"].items()
                 if not Path(path).is_relative_to(DEBIAN_PACKAGES)}
    assert not elsewhere, f"the daemon imports these from outside {DEBIAN_PACKAGES}: {elsewhere}"
