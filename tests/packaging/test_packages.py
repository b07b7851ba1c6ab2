# SPDX-License-Identifier: GPL-2.0-or-later
"""The packages: `make rpm deb` builds them from the `version` file, rpmlint
and lintian find nothing unexplained, their requirements can be met where
they are installed (dom0 = Fedora 37), the deb installs into a throwaway
root with the socket enabled and its user created, the rpm's preset enables
the socket against Fedora's "disable *" default, and the units pass
`systemd-analyze verify` and a sandbox exposure threshold.
"""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path

import pytest
from packaging.version import Version

from floors import floors
from pkgbuild import REPO, run

pytestmark = pytest.mark.packaging

SOCKET = "/run/qbackupd/qubes.BackupChunk"

# What Fedora 37 (R4.2's dom0) provides: Python 3.11 and the dom0 lines of
# requirements-floor.txt (python3-cryptography 37.0.2, python3-zstandard
# 0.19.0, python3-msgpack 1.0.4, each with where its number comes from).
FEDORA_37 = {"python(abi)": "3.11", **floors()["dom0"]}


def rpm_query(package: Path, *args: str) -> list[str]:
    return run(["rpm", "-qp", *args, str(package)]).stdout.splitlines()


def rpm_files(package: Path) -> dict[str, str]:
    """path -> 'MODE USER GROUP FLAGS -> LINKTARGET'"""
    fmt = "[%{FILENAMES}\t%{FILEMODES:perms} %{FILEUSERNAME} %{FILEGROUPNAME} %{FILEFLAGS:fflags} -> %{FILELINKTOS}\n]"
    return dict(line.split("\t", 1) for line in rpm_query(package, "--qf", fmt))


def assert_attributes(files: dict[str, str], expected: dict[str, str]) -> None:
    """Each expected path is in the package, its listing starting with the expected attributes."""
    for path, attributes in expected.items():
        assert files.get(path, "").startswith(attributes), (path, files.get(path))


def deb_files(package: Path) -> dict[str, str]:
    """path -> 'MODE OWNER' (and '-> TARGET' for links), paths without the leading '.'"""
    files = {}
    for line in run(["dpkg-deb", "-c", str(package)]).stdout.splitlines():
        mode, owner, _size, _date, _time, rest = line.split(None, 5)
        path, _, target = rest.partition(" -> ")
        files[path.removeprefix(".").rstrip("/") or "/"] = f"{mode} {owner}" + (f" -> {target}" if target else "")
    return files


# --- version ---------------------------------------------------------------------


@pytest.mark.parametrize("pyproject", ["dom0/pyproject.toml", "vm-service/pyproject.toml", "sim/pyproject.toml"])
def test_one_version_everywhere(pyproject):
    """`version` drives the rpm (Version: @VERSION@) and `make deb` (which
    refuses a different debian/changelog); these must agree with it."""
    version = (REPO / "version").read_text().strip()
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    assert tomllib.loads((REPO / pyproject).read_text())["project"]["version"] == version, pyproject
    changelog = (REPO / "debian/changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"qbackup ({version}) "), changelog
    spec = (REPO / "rpm_spec/qbackup.spec.in").read_text()
    assert "Version:        @VERSION@\n" in spec
    entry = spec.split("%changelog\n", 1)[1].splitlines()[0]
    assert entry.endswith(f" - {version}-1"), f"rpm %changelog's newest entry is not {version}-1: {entry}"


def test_make_deb_refuses_a_changelog_behind_the_version(tmp_path):
    """A version bump without a Debian changelog entry is one clear line."""
    result = run(["make", "--no-print-directory", "deb", f"BUILDDIR={tmp_path}", "VERSION=9.9.9"], check=False)
    assert result.returncode != 0
    assert "debian/changelog is at" in result.stderr and "but version says 9.9.9" in result.stderr, result.stderr
    assert not (tmp_path / "deb").exists()


# --- what the packages hold -----------------------------------------------------


def test_dom0_rpm_contents(built):
    files = rpm_files(built.dom0_rpm)
    assert files["/usr/bin/qbackup"].startswith("-rwxr-xr-x root root")
    assert files["/etc/qubes/policy.d/50-qbackup.policy"].startswith("-rw-rw-r-- root qubes cn")  # %config(noreplace)
    assert files["/var/lib/qbackup"].startswith("drwx------ root root")
    assert files["/etc/qubes-rpc/qubes.BackupRequest"].startswith("-rwxr-xr-x root root")
    for unit in ("qbackup-job@.service", "qbackup-job@.timer"):
        assert files[f"/usr/lib/systemd/system/{unit}"].startswith("-rw-r--r-- root root"), unit
    assert "/usr/share/doc/qbackup-dom0/JOBS.md" in files  # the units' Documentation=
    sitelib = "/usr/lib/python3.11/site-packages"
    assert f"{sitelib}/qbackup/cli.py" in files
    assert f"{sitelib}/qbackup/__pycache__/cli.cpython-311.pyc" in files  # byte-compiled as on Fedora
    assert f"{sitelib}/qbackup-{built.version}.dist-info/METADATA" in files
    assert not [f for f in files if "qbackupd" in f or "qbackup_sim" in f or "/tests/" in f]
    shebang = run(["sh", "-c", f"rpm2cpio {built.dom0_rpm} | cpio -i --quiet --to-stdout ./usr/bin/qbackup | head -1"])
    assert shebang.stdout.strip() == "#!/usr/bin/python3 -s"


# The backup qube's files, in both packages: {UNITDIR} and {PRESETDIR} are
# usr/lib/systemd/... in the rpm and lib/systemd/... in the deb (bookworm's
# dh_installsystemd looks in lib/, not usr/lib/).
VM_FILES = {
    "/usr/bin/qbackupd": "-rwxr-xr-x",
    "{UNITDIR}/qbackupd.socket": "-rw-r--r--",
    "{UNITDIR}/qbackupd.service": "-rw-r--r--",
    "{UNITDIR}/qbackupd-gc.service": "-rw-r--r--",
    "{UNITDIR}/qbackupd-gc.timer": "-rw-r--r--",
    "{PRESETDIR}/70-qbackupd.preset": "-rw-r--r--",
    "/usr/lib/sysusers.d/qbackupd.conf": "-rw-r--r--",
    "/usr/share/man/man8/qbackupd.8.gz": "-rw-r--r--",
}
LAYOUTS = {"rpm": {"UNITDIR": "/usr/lib/systemd/system", "PRESETDIR": "/usr/lib/systemd/system-preset"},
           "deb": {"UNITDIR": "/lib/systemd/system", "PRESETDIR": "/lib/systemd/system-preset"}}


def vm_files(package: str, owner: str) -> dict[str, str]:
    return {path.format(**LAYOUTS[package]): f"{mode} {owner}" for path, mode in VM_FILES.items()}


def test_vm_rpm_contents(built):
    files = rpm_files(built.vm_rpm)
    assert_attributes(files, vm_files("rpm", "root root"))
    assert files["/etc/qubes-rpc/qubes.BackupChunk"].endswith(f"-> {SOCKET}")
    assert not [f for f in files if "/qbackup/" in f or "qbackup_sim" in f or "policy.d" in f]
    scripts = "\n".join(rpm_query(built.vm_rpm, "--scripts"))
    assert re.search(r"preinstall scriptlet[^\n]*\n(.*\n)*.*u qbackupd ", scripts), scripts  # user before files
    assert "qbackupd.socket" in scripts.split("postinstall scriptlet", 1)[1].split("preuninstall", 1)[0]


def test_deb_contents(built):
    files = deb_files(built.deb)
    assert_attributes(files, vm_files("deb", "root/root"))
    assert_attributes(files, {"/usr/share/lintian/overrides/qbackup-vm": "-rw-r--r-- root/root",
                              "/usr/lib/python3/dist-packages/qbackupd/server.py": "-rw-r--r-- root/root"})
    assert files["/etc/qubes-rpc/qubes.BackupChunk"].endswith(f"-> {SOCKET}")
    control = run(["dpkg-deb", "-f", str(built.deb), "Version", "Depends"]).stdout
    assert f"Version: {built.version}\n" in control
    for dependency in ("qubes-core-agent", "python3-msgpack", "python3-trio", "systemd"):
        assert re.search(rf"[ ,|]{re.escape(dependency)}\b", control), (dependency, control)


def test_sizes_stay_small(built):
    """Each package is a few tens of KiB; a stray file (a venv, the tests, a
    build tree) would show here first."""
    for package in (built.dom0_rpm, built.vm_rpm, built.deb, built.srpm):
        assert package.stat().st_size < 1 << 20, (package.name, package.stat().st_size)


# --- requirements ----------------------------------------------------------------


# Fedora 37's own Python packages, as rpm requirements name them.
FEDORA_37_PACKAGES = {"python3-qubesadmin", "python3-msgpack", "python3-zstandard", "python3-cryptography"}


def unmet_on_fedora_37(requires: list[str]) -> list[str]:
    """Each `python3.11dist(NAME) OP V` (what Fedora's dependency generator
    makes of the package metadata), `python3-NAME OP V` (the spec's own) or
    `python(abi) = V` that Fedora 37's own packages do not satisfy."""
    unmet = []
    for line in requires:
        if line.startswith("python(abi)"):
            if line != f"python(abi) = {FEDORA_37['python(abi)']}":
                unmet.append(f"{line} (Fedora 37 has Python {FEDORA_37['python(abi)']})")
            continue
        if line.startswith("python3-"):
            name = line.split()[0]
            if name not in FEDORA_37_PACKAGES:
                unmet.append(f"{line} (not among the Fedora 37 packages this check knows)")
                continue
            line = line.replace(name, f"python3.11dist({name.removeprefix('python3-')})", 1)
            if name == "python3-qubesadmin":
                continue  # Qubes' own dom0 package: any version of R4.2
        if "dist(" not in line:
            continue
        m = re.fullmatch(r"python3\.11dist\(([a-z0-9_.-]+)\)(?: (>=|>|=|==) (\S+))?", line)
        if not m:
            unmet.append(f"{line} (not a requirement this check understands)")
            continue
        name, op, wanted = m.groups()
        have = FEDORA_37.get(name)
        if have is None:
            unmet.append(f"{line} (not among the Fedora 37 packages this check knows)")
        elif op and not {">=": Version(have) >= Version(wanted), ">": Version(have) > Version(wanted),
                         "=": Version(have) == Version(wanted), "==": Version(have) == Version(wanted)}[op]:
            unmet.append(f"{line} (Fedora 37 has {name} {have})")
    return unmet


def test_dom0_requirements_are_met_by_fedora_37(built):
    """rpm -qp --requires on the dom0 rpm: the Python requirements generated
    from the package metadata (and any the spec names itself) must be
    satisfiable by Fedora 37, or `qubes-dom0-update` cannot install it."""
    requires = rpm_query(built.dom0_rpm, "--requires")
    assert "python3-qubesadmin" in requires
    assert any(r.startswith("python3.11dist(cryptography)") for r in requires), requires  # the generator ran
    unmet = unmet_on_fedora_37(requires)
    assert not unmet, "not installable on Fedora 37 (R4.2 dom0): " + "; ".join(unmet)


def test_fedora_37_check_catches_a_too_new_floor():
    assert unmet_on_fedora_37(["python3.11dist(zstandard) >= 0.19", "python(abi) = 3.11"]) == []
    assert unmet_on_fedora_37(["python3.11dist(zstandard) >= 0.21"]) == [
        "python3.11dist(zstandard) >= 0.21 (Fedora 37 has zstandard 0.19.0)"]
    assert unmet_on_fedora_37(["python(abi) = 3.12"])
    assert unmet_on_fedora_37(["python3-cryptography >= 37.0.2", "python3-qubesadmin"]) == []
    assert unmet_on_fedora_37(["python3-cryptography >= 41"]) == [
        "python3.11dist(cryptography) >= 41 (Fedora 37 has cryptography 37.0.2)"]
    assert unmet_on_fedora_37(["python3-frobnicate"])


def test_vm_rpm_requirements(built):
    requires = rpm_query(built.vm_rpm, "--requires")
    for needed in ("qubes-core-agent", "systemd", "python(abi) = 3.11"):
        assert needed in requires, (needed, requires)
    assert any(r.startswith("python3.11dist(trio) >= 0.22") for r in requires), requires
    assert any(r.startswith("python3.11dist(msgpack)") for r in requires), requires


# --- lint --------------------------------------------------------------------------


def test_rpmlint_and_lintian_find_nothing_unexplained(built):
    """`make lint-packages`: rpmlint --strict (every warning an error) with
    rpm_spec/rpmlint.toml, lintian failing on errors and warnings with
    debian/qbackup-vm.lintian-overrides; each silenced message is explained
    in those files."""
    result = run(["make", "--no-print-directory", "lint-packages", f"BUILDDIR={built.builddir}"], check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "0 errors, 0 warnings" in output, output
    lintian_lines = [line for line in output.splitlines() if re.match(r"[EWI]: ", line)]
    assert lintian_lines == [], lintian_lines


def test_every_lint_filter_is_explained():
    filters = (REPO / "rpm_spec/rpmlint.toml").read_text().split("Filters = [", 1)[1]
    lines = [line.strip() for line in filters.splitlines() if line.strip() and line.strip() != "]"]
    for number, line in enumerate(lines):
        if not line.startswith("#"):  # a filter: right below its explanation, or below another filter
            assert number > 0 and lines[number - 1].startswith(("#", "'")), f"unexplained filter: {line}"
    overrides = (REPO / "debian/qbackup-vm.lintian-overrides").read_text().splitlines()
    for number, line in enumerate(overrides):
        if line and not line.startswith("#"):
            assert number > 0 and overrides[number - 1].startswith("#"), f"unexplained override: {line}"


# --- installed ---------------------------------------------------------------------


def test_deb_installs_enables_the_socket_and_creates_the_user(deb_root):
    wants = deb_root / "etc/systemd/system/sockets.target.wants/qbackupd.socket"
    assert wants.is_symlink() and str(wants.readlink()) == "/lib/systemd/system/qbackupd.socket"
    enabled = run(["systemctl", f"--root={deb_root}", "is-enabled", "qbackupd.socket", "qbackupd.service",
                   "qbackupd-gc.timer", "qbackupd-gc.service"], check=False)
    assert enabled.stdout.split() == ["enabled", "static", "enabled", "static"], enabled.stdout + enabled.stderr
    passwd = (deb_root / "etc/passwd").read_text()
    assert re.search(r"^qbackupd:x:\d+:\d+:qbackup storage daemon:/:/usr/sbin/nologin$", passwd, re.M), passwd
    assert (deb_root / "etc/qubes-rpc/qubes.BackupChunk").readlink() == Path(SOCKET)
    status = run(["dpkg", f"--root={deb_root}", "-s", "qbackup-vm"]).stdout
    assert "Status: install ok installed" in status


def test_deb_removal_and_purge_leave_no_units_behind(built, dpkg_in_root, new_dpkg_root):
    root = new_dpkg_root
    dpkg_in_root(root, "-i", str(built.deb))
    dpkg_in_root(root, "-r", "qbackup-vm")
    assert not (root / "lib/systemd/system/qbackupd.socket").exists()
    assert not (root / "etc/qubes-rpc/qubes.BackupChunk").is_symlink()
    dpkg_in_root(root, "--purge", "qbackup-vm")
    assert not (root / "etc/systemd/system/sockets.target.wants/qbackupd.socket").is_symlink()
    leftovers = [p for p in root.rglob("*qbackupd*") if not p.is_relative_to(root / "var/lib/dpkg")]
    assert leftovers == [], leftovers


def test_rpms_install_and_the_preset_beats_fedoras_default(rpm_root, tmp_path):
    """What %systemd_post does on Fedora: `systemctl preset`. Fedora's default
    preset disables every unit it does not name; ours enables the socket
    and the garbage collection timer."""
    root = tmp_path / "root"
    shutil.copytree(rpm_root, root, symlinks=True)
    presets = root / "usr/lib/systemd/system-preset"
    (presets / "99-default-disable.preset").write_text("disable *\n")

    units = ["qbackupd.socket", "qbackupd.service", "qbackupd-gc.timer", "qbackupd-gc.service"]

    def preset_states() -> list[str]:
        run(["systemctl", f"--root={root}", "preset", *units])
        return run(["systemctl", f"--root={root}", "is-enabled", *units], check=False).stdout.split()

    assert preset_states() == ["enabled", "static", "enabled", "static"]
    (presets / "70-qbackupd.preset").unlink()  # without our preset file, Fedora's default wins
    assert preset_states() == ["disabled", "static", "disabled", "static"]
    policy = root / "etc/qubes/policy.d/50-qbackup.policy"
    assert policy.read_text() == (REPO / "policy/50-qbackup.policy").read_text()


UNITS = {"deb": ["qbackupd.socket", "qbackupd.service", "qbackupd-gc.timer", "qbackupd-gc.service"],
         "rpm": ["qbackupd.socket", "qbackupd.service", "qbackupd-gc.timer", "qbackupd-gc.service",
                 "qbackup-job@daily.service", "qbackup-job@daily.timer"]}


@pytest.mark.parametrize("package", ["deb", "rpm"])
def test_units_pass_systemd_analyze_verify(verify_roots, package):
    """systemd-analyze prints problems (unknown keys, bad values, missing
    executables or manual pages) but may still exit 0: both must be clean."""
    root = verify_roots[package]
    result = run(["systemd-analyze", "verify", f"--root={root}", *UNITS[package]],
                 env={"MANPATH": str(root / "usr/share/man")}, check=False)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


def test_service_sandbox_exposure(verify_roots):
    """systemd-analyze security, offline: the hardened unit scores at most
    1.0 ("SAFE"; an unhardened service is 9.6)."""
    result = run(["systemd-analyze", "security", "--offline=yes", f"--root={verify_roots['deb']}", "--threshold=10",
                  "--no-pager", "qbackupd.service"], check=False)
    output = result.stdout + result.stderr
    m = re.search(r"Overall exposure level for qbackupd\.service: (\d+\.\d)", output)
    assert m, output
    assert result.returncode == 0 and float(m.group(1)) <= 1.0, output


def unit_settings(name: str) -> dict[str, list[str]]:
    """KEY -> values, every section, in file order (systemd allows repeated keys)."""
    settings: dict[str, list[str]] = {}
    for line in (REPO / "vm-service/systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_socket_unit_is_root_only_and_up_before_qrexec():
    socket_unit = unit_settings("qbackupd.socket")
    assert socket_unit["ListenStream"] == [SOCKET]
    assert socket_unit["SocketUser"] == ["root"] and socket_unit["SocketGroup"] == ["root"]
    assert socket_unit["SocketMode"] == ["0600"]
    assert "qubes-qrexec-agent.service" in socket_unit["Before"]
    assert socket_unit["WantedBy"] == ["sockets.target"]
    assert socket_unit.get("Accept", ["no"]) == ["no"]  # one listening socket for the daemon, not one per call
    for unit in (socket_unit, unit_settings("qbackupd.service")):
        assert unit["ConditionPathExists"] == ["/var/run/qubes-service/qbackup-storage"]
    preset = (REPO / "vm-service/systemd/70-qbackupd.preset").read_text()
    assert [line for line in preset.splitlines() if not line.startswith("#")] == [
        "enable qbackupd.socket", "enable qbackupd-gc.timer"]


def test_service_unit_is_hardened():
    service = unit_settings("qbackupd.service")
    expected = {
        "User": ["qbackupd"],
        "ExecStart": ["/usr/bin/qbackupd serve --systemd-socket --storage ${QBACKUPD_STORAGE}"],
        "ProtectSystem": ["strict"],
        "ReadWritePaths": ["/rw/qbackupd"],
        "NoNewPrivileges": ["yes"],
        "RestrictAddressFamilies": ["AF_UNIX"],
        "PrivateTmp": ["yes"],
        "PrivateNetwork": ["yes"],
        "CapabilityBoundingSet": [""],
    }
    for key, value in expected.items():
        assert service.get(key) == value, (key, service.get(key))
    # In a user namespace root would reach SO_PEERCRED as nobody: the daemon would refuse qrexec-agent.
    assert "PrivateUsers" not in service
    sysusers = (REPO / "vm-service/systemd/qbackupd.sysusers").read_text()
    assert re.search(r"^u qbackupd - ", sysusers, re.M)
    # The socket and the service read the storage setting from the same places.
    socket_unit = unit_settings("qbackupd.socket")
    for key in ("Environment", "EnvironmentFile"):
        assert socket_unit[key] == service[key], key
    assert service["Environment"] == ["QBACKUPD_STORAGE=/rw/qbackupd"]


def test_scheduled_gc_runs_only_where_asked_with_the_daemons_sandbox():
    """The timer is enabled by the preset but runs only in a qube given the
    qbackup-gc service; its oneshot runs `qbackupd gc --all` as qbackupd on
    the daemon's storage, in the daemon's sandbox (every setting from
    ReadWritePaths= on, the same values)."""
    timer, gc = unit_settings("qbackupd-gc.timer"), unit_settings("qbackupd-gc.service")
    assert timer["ConditionPathExists"] == ["/var/run/qubes-service/qbackup-gc"]
    assert timer["WantedBy"] == ["timers.target"] and timer["OnCalendar"]
    assert gc["ConditionPathExists"] == ["/var/run/qubes-service/qbackup-gc",
                                         "/var/run/qubes-service/qbackup-storage"]
    assert gc["Type"] == ["oneshot"] and gc["User"] == ["qbackupd"]
    assert gc["ExecStart"] == ["/usr/bin/qbackupd gc --all --storage ${QBACKUPD_STORAGE}"]
    service = unit_settings("qbackupd.service")
    for key in ("Environment", "EnvironmentFile"):
        assert gc[key] == service[key], key
    sandbox = list(service)[list(service).index("ReadWritePaths"):]
    assert {key: gc.get(key) for key in sandbox} == {key: service[key] for key in sandbox}
