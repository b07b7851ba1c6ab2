# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests for qbackup.qubes (volume selection, settings, the qubesadmin
backend against a stand-in qubesadmin module) and the simulated backend."""

import json
import subprocess
import sys
import types

import pytest

from qbackup.errors import QbackupError
from qbackup.qubes import (DERIVED_PROPERTIES, QubeInfo, QubesAdminBackend, VolumeInfo,
                           restorable_properties, volumes_to_backup)
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
                                                "revisions_to_keep": 1}}}
    assert "/x" not in json.dumps(settings)


# -- the qubesadmin backend, against a stand-in qubesadmin ------------------

class FakeQubesException(Exception):
    pass


class Named:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return self.name


class FakeVolume:
    def __init__(self, pool, vid, size=1 << 20, rw=True, save_on_stop=True,
                 snap_on_start=False, revisions_to_keep=1):
        self.pool, self.vid, self.size, self.rw = pool, vid, size, rw
        self.save_on_stop, self.snap_on_start = save_on_stop, snap_on_start
        self.revisions_to_keep = revisions_to_keep


class FakeFeatures(dict):
    pass


class FakeVM:
    def __init__(self, name, klass, props, defaults, volumes, features=None, tags=()):
        self.name, self.klass, self._props, self._defaults = name, klass, props, defaults
        self.volumes, self.features = volumes, FakeFeatures(features or {})
        self.tags = set(tags)
        self.calls = []

    def property_list(self):
        return sorted(self._props)

    def property_is_default(self, name):
        return name in self._defaults

    def __getattr__(self, name):
        try:
            return self.__dict__["_props"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __str__(self):
        return self.name

    def run_service(self, service, filter_esc=False, **kwargs):
        self.calls.append((service, dict(kwargs, filter_esc=filter_esc)))
        if self.name == "broken":
            raise FakeQubesException("qube failed to start")
        # a real process carrying the call: echoes what it is sent
        return subprocess.Popen([sys.executable, "-c",
                                 "import os\nwhile b := os.read(0, 65536): os.write(1, b)"],
                                **kwargs)


class FakeDomains(dict):
    """Like qubesadmin's VMCollection: iterates over qubes, looks up names."""

    def __iter__(self):
        return iter(list(self.values()))


class FakeApp:
    def __init__(self, vms, pools):
        self.domains = FakeDomains((vm.name, vm) for vm in vms)
        self.pools = pools


@pytest.fixture
def fake_qubesadmin(monkeypatch):
    template = FakeVM("fedora", "TemplateVM", {"label": Named("black")}, set(), {
        "root": FakeVolume("lvm", "qubes_dom0/vm-fedora-root"),
        "private": FakeVolume("lvm", "qubes_dom0/vm-fedora-private"),
        "volatile": FakeVolume("lvm", "qubes_dom0/vm-fedora-volatile", save_on_stop=False)})
    work = FakeVM("work", "AppVM",
                  {"label": Named("red"), "template": template, "netvm": None,
                   "memory": 400, "qid": 3, "uuid": "abc", "ip": "10.137.0.3",
                   "maxmem": 4000, "kernel": "6.6"},
                  {"maxmem", "kernel"},
                  {"private": FakeVolume("reflink", "appvms/work/private"),
                   "root": FakeVolume("reflink", "appvms/work/root", save_on_stop=False,
                                      snap_on_start=True, rw=False),
                   "other": FakeVolume("zfs", "tank/work")},
                  features={"service.cups": "1"}, tags=["created-by-dom0", "b"])
    dom0 = FakeVM("dom0", "AdminVM", {}, set(), {})
    backup = FakeVM("backup", "AppVM", {}, set(), {})
    broken = FakeVM("broken", "AppVM", {}, set(), {})
    pools = {"lvm": types.SimpleNamespace(driver="lvm_thin", config={}),
             "reflink": types.SimpleNamespace(driver="file-reflink",
                                              config={"dir_path": "/var/lib/qubes"}),
             "zfs": types.SimpleNamespace(driver="zfs", config={})}
    app = FakeApp([template, work, dom0, backup, broken], pools)
    module = types.ModuleType("qubesadmin")
    module.Qubes = lambda: app
    exc = types.ModuleType("qubesadmin.exc")
    exc.QubesException = FakeQubesException
    module.exc = exc
    monkeypatch.setitem(sys.modules, "qubesadmin", module)
    monkeypatch.setitem(sys.modules, "qubesadmin.exc", exc)
    return app


def test_qubesadmin_backend_reads_settings(fake_qubesadmin):
    qubes = {q.name: q for q in QubesAdminBackend().list_qubes()}
    assert sorted(qubes) == ["backup", "broken", "fedora", "work"]  # no dom0
    work = qubes["work"]
    assert work.klass == "AppVM"
    # explicit properties only, as names; derived and default ones left out
    assert work.properties == {"label": "red", "template": "fedora", "netvm": None,
                               "memory": 400}
    assert work.features == {"service.cups": "1"}
    assert work.tags == ["b", "created-by-dom0"]


def test_qubesadmin_backend_resolves_committed_volume_paths(fake_qubesadmin):
    qubes = {q.name: q for q in QubesAdminBackend().list_qubes()}
    work, fedora = qubes["work"].volumes, qubes["fedora"].volumes
    assert work["private"].path == "/var/lib/qubes/appvms/work/private.img"
    assert work["root"].path == "/var/lib/qubes/appvms/work/root.img"
    assert work["other"].path is None  # unsupported driver: not readable
    assert fedora["root"].path == "/dev/qubes_dom0/vm-fedora-root"
    assert work["root"].snap_on_start and not work["root"].rw
    assert [v.name for v in volumes_to_backup(qubes["fedora"])] == ["private", "root"]


def test_qubesadmin_backend_connects_with_binary_safe_pipes(fake_qubesadmin):
    transport = QubesAdminBackend().connect("backup", "work-repo")
    try:
        service, kwargs = fake_qubesadmin.domains["backup"].calls[0]
        assert service == "qubes.BackupChunk+work-repo"
        assert kwargs["filter_esc"] is False and kwargs["bufsize"] == 0
        data = bytes(range(256)) * 3  # escape bytes included, unchanged
        transport.write(data)
        got = b""
        while len(got) < len(data):  # unbuffered: returns what has arrived
            got += transport.read(1 << 20)
        assert got == data
        transport.close_write()
        assert transport.read(10) == b""
    finally:
        transport.close()


def test_qubesadmin_backend_errors_are_one_line(fake_qubesadmin):
    backend = QubesAdminBackend()
    with pytest.raises(QbackupError, match="backup qube 'nope' does not exist"):
        backend.connect("nope", "default")
    with pytest.raises(QbackupError, match="invalid repository name"):
        backend.connect("backup", "../etc")
    with pytest.raises(QbackupError, match="calling qubes.BackupChunk.default in broken "
                                           "failed: qube failed to start"):
        backend.connect("broken", "default")


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
    assert work.features == {"f": "v"} and work.tags == ["t"]
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
