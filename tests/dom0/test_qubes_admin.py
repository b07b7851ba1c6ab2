# SPDX-License-Identifier: GPL-2.0-or-later
"""QubesAdminBackend against the real Qubes R4.2 Admin API: the real
qubesadmin talking to qubesd's real handlers in this process
(tests/qubes_r42.py). What it reads, where it reads volumes, which calls it
makes and how many, and how it calls the backup qube's service."""

from __future__ import annotations

import json
import os
import random

import pytest

from qbackup.errors import QbackupError
from qbackup.proto import Session
from qbackup.qubes import DERIVED_PROPERTIES, QubesAdminBackend, volumes_to_backup

pytestmark = pytest.mark.qubesd

MiB = 1 << 20


def backend_of(qubesd) -> QubesAdminBackend:
    return QubesAdminBackend(qubesd.client())


def by_name(backend: QubesAdminBackend) -> dict:
    return {q.name: q for q in backend.list_qubes()}


def assert_no_call_refused(qubesd) -> None:
    """qubesd answered every call the adapter made: no error reply, no
    aborted connection."""
    assert qubesd.refused == [] and qubesd.aborted == []


# -- what it reads --------------------------------------------------------------

def test_every_setting_that_matters_is_read(qubesd):
    qubesd.add_qube("TemplateVM", "fedora", label="black")
    qubesd.add_qube("AppVM", "sys-firewall", template="fedora", provides_network=True)
    qubesd.add_qube("AppVM", "dvm", template="fedora", template_for_dispvms=True)
    settings = {"memory": 800, "maxmem": 8000, "vcpus": 4, "kernelopts": "nopat",
                "debug": True, "default_user": "alice", "qrexec_timeout": 120,
                "shutdown_timeout": 90, "autostart": True, "include_in_backups": False,
                "netvm": "sys-firewall", "default_dispvm": "dvm",
                "management_dispvm": "dvm", "mac": "00:16:3e:5e:6c:99",
                "virt_mode": "pv", "keyboard_layout": "de+neo+"}
    qubesd.add_qube("AppVM", "work", label="orange", template="fedora", **settings)
    vm = qubesd.app.domains["work"]
    vm.features.update({"service.crond": "1", "gui-emulated": "", "x": "y z"})
    vm.tags.update({"project-x", "has_under-dash"})
    work = by_name(backend_of(qubesd))["work"]
    expected = {"label": "orange", "template": "fedora", **settings}
    assert work.properties == expected
    assert not set(work.properties) & DERIVED_PROPERTIES
    assert work.features == {"service.crond": "1", "gui-emulated": "", "x": "y z"}
    # qubesd's own guivm-dom0 / audiovm-dom0 are left out; created-by-dom0 kept
    assert sorted(vm.tags) == ["audiovm-dom0", "created-by-dom0", "guivm-dom0",
                               "has_under-dash", "project-x"]
    assert work.tags == ["created-by-dom0", "has_under-dash", "project-x"]
    assert_no_call_refused(qubesd)


def test_running_qubes_are_read_like_halted_ones(qubesd):
    """Every property of a running qube is read without qubesd aborting
    (start_time, xid, stubdom_xid are computed for running qubes)."""
    qubesd.add_qube("TemplateVM", "fedora", label="black")
    qubesd.add_qube("AppVM", "work", template="fedora", memory=500)
    qubesd.set_running("fedora")
    qubesd.set_running("work")
    qubes = by_name(backend_of(qubesd))
    assert qubes["work"].running and qubes["fedora"].running
    assert qubes["work"].properties == {"label": "red", "template": "fedora", "memory": 500}
    assert_no_call_refused(qubesd)


# -- where it reads volumes ---------------------------------------------------

def test_reflink_pool_gives_the_committed_image(qubesd, tmp_path):
    pool_dir = tmp_path / "reflink"
    qubesd.add_pool("rpool", "file-reflink", dir_path=str(pool_dir), setup_check=False)
    qubesd.add_qube("StandaloneVM", "sa", pool="rpool")
    halted = by_name(backend_of(qubesd))["sa"]
    private = halted.volumes["private"]
    assert private.path == str(pool_dir / "appvms/sa/private.img")
    assert os.path.exists(private.path)
    # started: qubesd makes private-dirty.img, which Info reports; qbackup
    # still reads the committed private.img
    qubesd.set_running("sa")
    vm = qubesd.app.domains["sa"]
    qubesd.run(vm.volumes["private"].start())
    info = qubesd.handle("admin.vm.volume.Info", "sa", "private", b"").decode()
    assert f"path={pool_dir}/appvms/sa/private-dirty.img" in info
    running = by_name(backend_of(qubesd))["sa"]
    assert running.volumes["private"].path == str(pool_dir / "appvms/sa/private.img")
    assert running.volumes["root"].path == str(pool_dir / "appvms/sa/root.img")


def test_lvm_thin_pool_gives_the_logical_volume(qubesd):
    qubesd.add_pool("vm-pool", "lvm_thin", volume_group="qubes_dom0", thin_pool="vm-pool")
    qubesd.add_qube("TemplateVM", "fedora", label="black", pool="vm-pool")
    qubesd.add_qube("AppVM", "work", template="fedora", pool="vm-pool")
    qubes = by_name(backend_of(qubesd))
    assert qubes["work"].volumes["private"].path == "/dev/qubes_dom0/vm-work-private"
    assert qubes["fedora"].volumes["root"].path == "/dev/qubes_dom0/vm-fedora-root"
    # qubesd made them through lvm (the stand-in logs what it was asked)
    created = [c for c in qubesd.lvm.commands() if c[0] == "lvcreate"]
    assert ["lvcreate", "--thin", "--setactivationskip=n", "--activate=y",
            "--name=vm-work-private", f"--virtualsize={2 << 30}B", "--",
            "qubes_dom0/vm-pool"] in created


def test_lvm_volume_whose_committed_lv_is_missing_is_refused(qubesd):
    """When the committed LV is gone, qubesd's Info points at the newest
    -back revision: qbackup must not read an old revision as the volume."""
    import qubes.storage.lvm
    qubesd.add_pool("vm-pool", "lvm_thin", volume_group="qubes_dom0", thin_pool="vm-pool")
    qubesd.add_qube("StandaloneVM", "sa", pool="vm-pool")
    lvs = qubesd.lvm.volumes()
    lvs["qubes_dom0/vm-sa-private-1700000000-back"] = lvs.pop("qubes_dom0/vm-sa-private")
    qubesd.lvm.state.write_text(json.dumps(lvs))
    qubes.storage.lvm.reset_cache()
    private = by_name(backend_of(qubesd))["sa"].volumes["private"]
    assert private.path is None
    assert "logical volume qubes_dom0/vm-sa-private is missing" in private.unreadable
    assert "--1700000000--back" in private.unreadable  # device-mapper's escaping


@pytest.fixture
def file_driver_qubesd(tmp_path_factory):
    """qubesd on a dom0 whose /var/lib/qubes has no reflinks: varlibqubes is
    a pool of the legacy `file` driver."""
    from qubes_r42 import Testbed
    testbed = Testbed(tmp_path_factory.mktemp("qubesd-file"), varlibqubes_driver="file")
    yield testbed
    testbed.close()


def test_file_driver_volume_of_a_running_qube_is_refused(file_driver_qubesd):
    qubesd = file_driver_qubesd
    qubesd.add_qube("StandaloneVM", "sa")
    halted = by_name(backend_of(qubesd))["sa"]
    assert halted.volumes["private"].path == str(qubesd.varlib / "appvms/sa/private.img")
    qubesd.set_running("sa")
    running = by_name(backend_of(qubesd))["sa"]
    private = running.volumes["private"]
    assert private.path is None
    assert "legacy 'file' driver" in private.unreadable
    assert "shut the qube down first" in private.unreadable


def test_backup_of_an_unreadable_volume_fails_with_one_line(file_driver_qubesd, capsys):
    from qbackup import cli
    qubesd = file_driver_qubesd
    qubesd.add_qube("StandaloneVM", "sa")
    qubesd.add_qube("StandaloneVM", "backup")
    qubesd.set_running("sa")
    code = cli.run(["backup", "sa"], backend=lambda: backend_of(qubesd),
                   config={"backup_vm": "backup", "state_dir": str(qubesd.base / "state")})
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("qbackup: error: sa: cannot back up volume private: it is "
                             "in a pool of the legacy 'file' driver")


# -- how many calls -----------------------------------------------------------

def test_calls_per_qube(qubesd):
    """One GetAll, feature List + a Get per feature, tag List and one Info
    per volume but kernel; once per run admin.vm.List and one
    admin.pool.Info per pool. Nothing else."""
    features = qubesd.populate(12)
    qubesd.calls.clear()
    qubes = backend_of(qubesd).list_qubes()
    assert len(qubes) == 12
    per_method = {}
    for method, _, _ in qubesd.calls:
        per_method[method] = per_method.get(method, 0) + 1
    assert per_method == {
        "admin.vm.List": 1, "admin.pool.Info": 1,
        "admin.vm.property.GetAll": 12, "admin.vm.feature.List": 12,
        "admin.vm.feature.Get": features, "admin.vm.tag.List": 12,
        "admin.vm.volume.Info": 12 * 3}
    assert_no_call_refused(qubesd)


def test_calls_for_the_settings_of_qubes_backed_up(qubesd):
    """Firewall and devices only for the qubes a backup includes: one
    admin.vm.firewall.Get and one admin.vm.device.CLASS.List per device
    class (pci and block in R4.2's core; a real system adds usb and mic
    with their packages) per qube, admin.deviceclass.List once; the
    dependencies come from the properties already fetched."""
    qubesd.populate(12)
    backend = backend_of(qubesd)
    qubes = backend.list_qubes()
    qubesd.calls.clear()
    for qube in qubes[:5]:
        backend.qube_details(qube.name)
    per_method = {}
    for method, _, _ in qubesd.calls:
        per_method[method] = per_method.get(method, 0) + 1
    assert per_method == {"admin.deviceclass.List": 1, "admin.vm.firewall.Get": 5,
                          "admin.vm.device.block.List": 5, "admin.vm.device.pci.List": 5}
    assert_no_call_refused(qubesd)


def test_fifty_qubes_stay_within_ten_calls_each(qubesd):
    """The issue's budget, measured: bench/bench_adminapi.py reports the
    same figures."""
    qubesd.populate(50)
    qubesd.calls.clear()
    backend_of(qubesd).list_qubes()
    assert len(qubesd.calls) <= 10 * 50, len(qubesd.calls)


# -- calling the backup qube's service ------------------------------------------

@pytest.fixture
def service(qubesd, monkeypatch, tmp_path):
    """A backup qube whose qubes.BackupChunk is the real daemon, behind the
    stand-in qrexec-client that qubesadmin runs (tests/qubes_r42.py)."""
    from qubes_r42 import reachable_daemon
    qubesd.add_qube("TemplateVM", "fedora", label="black")
    qubesd.add_qube("AppVM", "backup", template="fedora", label="black")
    with reachable_daemon(monkeypatch, tmp_path) as log:
        yield log


def test_the_service_is_called_as_root_and_the_qube_started(qubesd, service):
    assert "backup" not in qubesd.running
    backend = backend_of(qubesd)
    session = Session(backend.connect("backup", "repo-1"))
    session.init(b"key file", 8 << 20)
    session.close()
    assert "backup" in qubesd.running  # run_service started it (admin.vm.Start)
    calls = [json.loads(line) for line in service.read_text().splitlines()]
    assert calls == [["-d", "backup", "root:QUBESRPC qubes.BackupChunk+repo-1 dom0"]]
    assert ("admin.vm.Start", "backup", "") in qubesd.calls


@pytest.mark.parametrize("code, message", [
    (125, "backup has the qubes.BackupChunk service but nothing answers on its socket: "
          "is qbackupd running there?"),
    (127, "backup has no qubes.BackupChunk service: install the qbackup-vm package"),
    (1, "the qrexec call to backup failed (qrexec-client exit code 1)"),
])
def test_qrexec_failures_are_explained(qubesd, service, monkeypatch, code, message):
    monkeypatch.setenv("QBACKUP_FAKE_QREXEC_EXIT", str(code))
    with pytest.raises(QbackupError) as err:
        Session(backend_of(qubesd).connect("backup", "repo"))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_the_backup_qubes_stderr_never_reaches_dom0(qubesd, service, monkeypatch, capfd):
    monkeypatch.setenv("QBACKUP_FAKE_QREXEC_STDERR", "\x1b]0;pwned\x07" + "x" * 100000)
    session = Session(backend_of(qubesd).connect("backup", "repo"))
    session.init(b"key file", 8 << 20)
    session.close()
    out, err = capfd.readouterr()
    assert "pwned" not in err and "xxxx" not in err and out == ""


def test_a_backup_qube_that_fails_to_start(qubesd, service):
    qubesd.start_error = "not enough memory to start domain 'backup'"
    with pytest.raises(QbackupError, match="backup qube backup failed to start: "
                                           "not enough memory"):
        backend_of(qubesd).connect("backup", "repo")


def test_dom0_is_not_a_backup_qube(qubesd, service):
    with pytest.raises(QbackupError, match="the backup qube cannot be dom0"):
        backend_of(qubesd).connect("dom0", "repo")


# -- the whole command line on the real adapter --------------------------------

def test_backup_verify_restore_through_the_real_adapter(qubesd, service, tmp_path, capfd):
    """qbackup's CLI with QubesAdminBackend: volumes found through the Admin
    API in a file-reflink pool, the daemon reached through run_service."""
    from qbackup import cli
    pool_dir = tmp_path / "pool"
    qubesd.add_pool("rpool", "file-reflink", dir_path=str(pool_dir), setup_check=False)
    qubesd.add_qube("AppVM", "work", template="fedora", pool="rpool")
    image = pool_dir / "appvms/work/private.img"
    data = random.Random(7).randbytes(3 * MiB)
    with open(image, "r+b") as f:
        f.write(data)
    passphrase = tmp_path / "pw"
    passphrase.write_text("real adapter\n")
    config = {"backup_vm": "backup", "state_dir": str(tmp_path / "state")}

    def qbackup(*argv: str) -> tuple[int, str]:
        code = cli.run([*argv, "--passphrase-file", str(passphrase)],
                       backend=lambda: backend_of(qubesd), config=config)
        out, err = capfd.readouterr()
        assert code == 0, err
        return code, out

    qbackup("init", "--scrypt-n", "16384", "--pack-size", "8M")
    code, out = qbackup("backup", "work", "--json")
    assert code == 0 and json.loads(out)["qubes"] == ["work"]
    assert qbackup("verify")[0] == 0
    code, _ = qbackup("restore", "latest", "--to", str(tmp_path / "out"))
    assert code == 0
    restored = (tmp_path / "out/work/private.img").read_bytes()
    assert restored[:len(data)] == data and restored[len(data):].count(0) == len(
        restored) - len(data)
    assert volumes_to_backup(by_name(backend_of(qubesd))["work"])[0].path == str(image)
