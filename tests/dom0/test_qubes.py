# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests for qbackup.qubes (volume selection, settings, where volumes are
read, qrexec exit codes) and the simulated backend. The qubesadmin backend
itself runs against the real R4.2 Admin API in test_qubes_admin.py and
test_backend_contract.py."""

import json
import subprocess
import sys

import pytest

from qbackup.errors import QbackupError
from qbackup.qubes import (DERIVED_PROPERTIES, QubeInfo, QubesAdminBackend, VolumeInfo,
                           qrexec_exit_reason, restorable_properties, volume_path,
                           volumes_to_backup)
from qbackup_sim import SimBackend, SimError, create_sim, load_inventory, save_inventory
from qbackup_sim.ext4 import make_ext4_image, read_file, write_files


def vol(name, *, save_on_stop=True, snap_on_start=False, path="/x"):
    return VolumeInfo(name=name, pool="p", size=4096, path=path, rw=True,
                      save_on_stop=save_on_stop, snap_on_start=snap_on_start,
                      revisions_to_keep=1)


def qube(klass, *volumes):
    return QubeInfo(name="q", klass=klass, volumes={v.name: v for v in volumes})


# -- volume selection and settings ------------------------------------------

def test_appvm_backs_up_private_only():
    q = qube("AppVM", vol("private"), vol("root", save_on_stop=False, snap_on_start=True),
             vol("volatile", save_on_stop=False), vol("kernel", save_on_stop=False))
    assert [v.name for v in volumes_to_backup(q)] == ["private"]


@pytest.mark.parametrize("klass", ["TemplateVM", "StandaloneVM"])
def test_templates_and_standalones_back_up_root_too(klass):
    q = qube(klass, vol("root"), vol("private"), vol("volatile"), vol("kernel"))
    assert [v.name for v in volumes_to_backup(q)] == ["private", "root"]


def test_volumes_discarded_at_shutdown_are_skipped():
    q = qube("DispVM", vol("private", save_on_stop=False, snap_on_start=True))
    assert volumes_to_backup(q) == []
    assert volumes_to_backup(qube("AppVM")) == []


def test_derived_properties_are_dropped():
    props = {"label": "red", "netvm": "sys-firewall", "qid": 7, "uuid": "u", "xid": 3,
             "ip": "10.137.0.9", "ip6": "fd09::9", "dispid": 2, "installed_by_rpm": True,
             "backup_timestamp": 1, "stubdom_xid": 4, "memory": 400}
    assert restorable_properties(props) == {"label": "red", "memory": 400,
                                            "netvm": "sys-firewall"}
    assert {"qid", "uuid", "xid", "ip", "ip6", "dispid", "installed_by_rpm",
            "backup_timestamp", "stubdom_xid", "stubdom_uuid"} <= DERIVED_PROPERTIES


def test_settings_hold_configuration_not_paths():
    q = QubeInfo(name="work", klass="AppVM", properties={"label": "blue"},
                 features={"f": "1"}, tags=["t"], volumes={"private": vol("private")})
    settings = q.settings()
    assert settings == {"class": "AppVM", "properties": {"label": "blue"},
                        "features": {"f": "1"}, "tags": ["t"],
                        "volume_config": {"private": {"pool": "p", "size": 4096, "rw": True,
                                                "save_on_stop": True, "snap_on_start": False,
                                                "revisions_to_keep": 1, "ephemeral": False}}}
    assert "/x" not in json.dumps(settings)


# -- where volumes are read, and what qrexec-client's exit codes mean ------------

REFLINK = {"driver": "file-reflink", "dir_path": "/var/lib/qubes"}


def info(vid, path=""):
    return {"vid": vid, "path": path}


@pytest.mark.parametrize("running", [False, True])
def test_reflink_volumes_are_read_from_the_committed_image(running):
    assert volume_path("file-reflink", REFLINK, info("appvms/work/private",
                       "/var/lib/qubes/appvms/work/private-dirty.img"), running) == (
        "/var/lib/qubes/appvms/work/private.img", "")


def test_file_driver_volumes_only_while_the_qube_is_halted():
    pool = {"driver": "file", "dir_path": "/var/lib/qubes"}
    assert volume_path("file", pool, info("vm-templates/t/root"), False) == (
        "/var/lib/qubes/vm-templates/t/root.img", "")
    path, why = volume_path("file", pool, info("vm-templates/t/root"), True)
    assert path is None and "shut the qube down first" in why


@pytest.mark.parametrize("vid", ["../../etc/shadow", "/etc/shadow", "appvms/../../x", ""])
def test_a_volume_id_outside_its_pool_directory_is_refused(vid):
    path, why = volume_path("file-reflink", REFLINK, info(vid), False)
    assert path is None and "not inside pool directory" in why


def test_lvm_volumes_are_the_committed_logical_volume():
    vid = "qubes_dom0/vm-my-work-private"
    assert volume_path("lvm_thin", {}, info(vid, "/dev/mapper/qubes_dom0-vm--my--work--private"),
                       True) == ("/dev/qubes_dom0/vm-my-work-private", "")
    path, why = volume_path("lvm_thin", {}, info(
        vid, "/dev/mapper/qubes_dom0-vm--my--work--private--1700000000--back"), False)
    assert path is None and "is missing" in why


@pytest.mark.parametrize("driver", ["zfs", "callback", "linux-kernel", ""])
def test_other_drivers_are_not_read(driver):
    path, why = volume_path(driver, {}, info("x/y"), False)
    assert path is None and f"{driver!r} driver, which qbackup cannot read" in why


def test_qrexec_exit_codes_are_explained():
    assert qrexec_exit_reason(0, "vault") is None
    assert "nothing answers on its socket" in qrexec_exit_reason(125, "vault")
    assert "vault has no qubes.BackupChunk service" in qrexec_exit_reason(127, "vault")
    assert qrexec_exit_reason(3, "vault").endswith("(qrexec-client exit code 3)")


def test_without_qubesadmin_the_error_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "qubesadmin", None)  # import fails
    with pytest.raises(QbackupError, match="qubesadmin is not installed"):
        QubesAdminBackend()


# -- the simulated backend --------------------------------------------------

def make_sim(tmp_path):
    return create_sim(tmp_path / "sim", {
        "fedora": {"class": "TemplateVM", "label": "black",
                   "volumes": {"root": 1 << 20, "private": 1 << 19}},
        "work": {"class": "AppVM", "label": "red", "template": "fedora",
                 "netvm": None, "properties": {"memory": 400, "qid": 9, "uuid": "x"},
                 "features": {"f": "v"}, "tags": ["t"],
                 "volumes": {"private": 1 << 20, "volatile": 1 << 20}}})


def test_sim_lists_qubes_like_qubesadmin(tmp_path):
    root = make_sim(tmp_path)
    backend = SimBackend(root)
    assert isinstance(backend, SimBackend) and backend.backup_vm == "backup"
    qubes = {q.name: q for q in backend.list_qubes()}
    assert sorted(qubes) == ["backup", "fedora", "work"]
    work = qubes["work"]
    assert work.properties == {"label": "red", "memory": 400, "netvm": None,
                               "template": "fedora"}
    assert work.features == {"f": "v"} and work.tags == ["created-by-dom0", "t"]
    private = work.volumes["private"]
    assert private.path == str(root / "volumes/work/private.img")
    assert private.size == 1 << 20 and private.save_on_stop
    assert (root / "volumes/work/private.img").stat().st_size == 1 << 20
    assert not work.volumes["volatile"].save_on_stop
    assert [v.name for v in volumes_to_backup(work)] == ["private"]
    assert [v.name for v in volumes_to_backup(qubes["fedora"])] == ["private", "root"]


def test_sim_refuses_to_overwrite_and_unknown_backup_qube(tmp_path):
    root = make_sim(tmp_path)
    with pytest.raises(SimError, match="already holds a sim"):
        create_sim(root, {})
    with pytest.raises(SimError, match="backup qube 'nope' does not exist"):
        SimBackend(root).connect("nope", "default")
    with pytest.raises(SimError, match="not a sim directory"):
        SimBackend(tmp_path / "missing")


@pytest.mark.parametrize("damage, message", [
    (lambda inv: inv.update(extra=1), "exactly the keys"),
    (lambda inv: inv.update(backup_vm="ghost"), "not a qube"),
    (lambda inv: inv.update(backup_vm=["backup"]), "not a qube"),
    (lambda inv: inv.update(qubes=[]), "qubes: not an object"),
    (lambda inv: inv["qubes"].update({"../x": {"class": "AppVM"}}), "invalid qube name"),
    (lambda inv: inv["qubes"]["work"].update({"class": "Evil"}), "class must be"),
    (lambda inv: inv["qubes"]["work"].update({"tags": "t"}), "tags must be"),
    (lambda inv: inv["qubes"]["work"].update({"features": {"f": 1}}), "features must"),
    (lambda inv: inv["qubes"]["work"]["volumes"]["private"].update(size="1"),
     "size must be int"),
    (lambda inv: inv["qubes"]["work"]["volumes"]["private"].update(size=-1), "negative"),
    (lambda inv: inv["qubes"]["work"]["volumes"]["private"].pop("rw"), "exactly the keys"),
    (lambda inv: inv["qubes"]["work"]["volumes"].update({"Bad/Vol": {}}),
     "invalid volume name"),
])
def test_sim_rejects_malformed_inventory(tmp_path, damage, message):
    root = make_sim(tmp_path)
    inventory = load_inventory(root)
    damage(inventory)
    (root / "inventory.json").write_text(json.dumps(inventory))
    with pytest.raises(SimError, match=message):
        load_inventory(root)
    with pytest.raises(SimError, match=message):
        save_inventory(root, inventory)


@pytest.mark.parametrize("text", ["", "{", "[]", "\xff"])
def test_sim_rejects_unreadable_inventory(tmp_path, text):
    root = make_sim(tmp_path)
    (root / "inventory.json").write_text(text, errors="surrogateescape")
    with pytest.raises(SimError):
        load_inventory(root)


def test_ext4_images_hold_real_files(tmp_path):
    image = tmp_path / "private.img"
    make_ext4_image(image, 8 << 20, {"home/user/notes.txt": b"hello\n", "a.bin": b"\0" * 5})
    assert image.stat().st_size == 8 << 20
    assert read_file(image, "home/user/notes.txt") == b"hello\n"
    write_files(image, {"home/user/notes.txt": b"changed\n", "new/dir/file": b"x" * 70000})
    assert read_file(image, "home/user/notes.txt") == b"changed\n"
    assert read_file(image, "new/dir/file") == b"x" * 70000
    assert read_file(image, "a.bin") == b"\0" * 5
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True,
                          env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})
    assert fsck.returncode == 0, fsck.stdout
    with pytest.raises(SimError, match="cannot read"):
        read_file(image, "missing")
    for bad in ("../etc/passwd", "/abs", "a b", "a//b", "a;rm x", "a/./b", "a/"):
        with pytest.raises(SimError, match="unsupported path"):
            write_files(image, {bad: b""})
