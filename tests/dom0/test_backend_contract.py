# SPDX-License-Identifier: GPL-2.0-or-later
"""One set of contract tests for both qube backends: the real one
(QubesAdminBackend, through the real qubesadmin, against qubesd R4.2's Admin
API in this process) and the simulated dom0 (SimBackend).

The same qubes are made in both; each test asserts what qubesd answers and
runs against both, so the sim cannot drift from what qubesd really answers.
Where they disagree, qubesd is right."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from qbackup.errors import QbackupError
from qbackup.proto import Session
from qbackup.qubes import (FILE_MANAGER_COMMAND, RESTORE_IN_PROGRESS, Device,
                           QubesAdminBackend, volumes_to_backup)
from qbackup_sim import SimBackend, create_sim, stop_daemon

GiB = 1 << 30
# The qubes of the contract, as qvm-create and qvm-prefs/-features/-tags would
# make them; sizes are qubesd's defaults (private 2 GiB, root and volatile 10 GiB).
QUBES = {
    "fedora": {"class": "TemplateVM", "label": "black",
               "features": {"os": "Linux", "qrexec": "1", "supported-service.cups": "1"},
               "tags": ["os-fedora"]},
    "sys-net": {"class": "AppVM", "label": "red", "template": "fedora",
                "properties": {"provides_network": True, "memory": 300, "netvm": None,
                               "virt_mode": "hvm"},
                # servicevm: qubesd adds it with provides_network (core_features)
                "features": {"service.network-manager": "1", "servicevm": "1"},
                "devices": [{"class": "pci", "backend": "dom0", "ident": "00_1f.6",
                             "options": {"no-strict-reset": "True"}, "persistent": True}]},
    "dvm": {"class": "AppVM", "label": "red", "template": "fedora",
            "properties": {"template_for_dispvms": True},
            "features": {"appmenus-dispvm": "1"}},
    "work": {"class": "AppVM", "label": "blue", "template": "fedora",
             "properties": {"netvm": "sys-net", "memory": 600, "maxmem": 4000, "vcpus": 2,
                            "kernelopts": "quiet", "default_dispvm": "dvm"},
             "features": {"service.cups": "1", "gui-default-secure-copy-sequence": "Ctrl-c"},
             "tags": ["work", "important"], "running": True,
             # as qubesd answers admin.vm.firewall.Get (it writes dsthost=10.0.0.0/8 so)
             "firewall": ["action=accept dst4=10.0.0.0/8 proto=tcp dstports=443-443",
                          "action=accept specialtarget=dns", "action=drop"],
             "devices": [{"class": "block", "backend": "sa", "ident": "sdb",
                          "options": {"read-only": "yes", "frontend-dev": "xvdi"},
                          "persistent": True}]},
    "sa": {"class": "StandaloneVM", "label": "green", "properties": {"virt_mode": "hvm"}},
    "backup": {"class": "AppVM", "label": "black", "template": "fedora", "running": True},
}
ORDER = ["fedora", "sys-net", "dvm", "work", "sa", "backup"]  # dependencies first


def _volumes(klass: str) -> dict[str, int]:
    root = {"root": 10 * GiB}
    return {**root, "private": 2 * GiB, "volatile": 10 * GiB}


@pytest.fixture
def sim_backend(tmp_path):
    spec = {}
    for name in ORDER:
        qube = dict(QUBES[name])
        spec[name] = {**qube, "volumes": _volumes(qube["class"])}
    # as qubesd's varlibqubes: a file-reflink pool, Qubes' layout
    base = Path(tempfile.mkdtemp(prefix="qbc-"))
    root = create_sim(base / "sim", spec, backup_vm="backup", pool_dir=base / "pool")
    yield SimBackend(root)
    stop_daemon(root)


@pytest.fixture
def qubesd_backend(qubesd):
    qubesd.pci_devices.add("00_1f.6")
    for name in ORDER:
        qube = QUBES[name]
        qubesd.add_qube(qube["class"], name, label=qube["label"],
                        template=qube.get("template"), **qube.get("properties", {}))
        vm = qubesd.app.domains[name]
        vm.features.update(qube.get("features", {}))
        vm.tags.update(qube.get("tags", []))
        if "firewall" in qube:
            assert qubesd.handle("admin.vm.firewall.Set", name, "", "".join(
                f"{rule}\n" for rule in qube["firewall"]).encode()) == b"0\0"
    for name in ORDER:  # devices once their backends exist
        for dev in QUBES[name].get("devices", []):
            options = [f"{k}={v}" for k, v in dev["options"].items()]
            assert qubesd.handle(f"admin.vm.device.{dev['class']}.Attach", name,
                                 f"{dev['backend']}+{dev['ident']}",
                                 " ".join([*options, "persistent=True"]).encode()) == b"0\0"
        if QUBES[name].get("running"):
            qubesd.set_running(name)
    return QubesAdminBackend(qubesd.client())


@pytest.fixture(params=[pytest.param("qubesd", marks=pytest.mark.qubesd), "sim"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def backend(kind, request):
    return request.getfixturevalue(f"{kind}_backend")


@pytest.fixture
def reachable(kind, monkeypatch, tmp_path):
    """The backup qube's service reachable: for the qubesd backend, a real
    daemon behind the stand-in qrexec-client (tests/qubes_r42.py) that
    qubesadmin runs; the sim starts its own daemon."""
    if kind != "qubesd":
        yield
        return
    from qubes_r42 import reachable_daemon
    with reachable_daemon(monkeypatch, tmp_path):
        yield


def without_paths(qube):
    return replace(qube, volumes={n: replace(v, path="<path>", live_path=v.live_path and "<live>")
                                  for n, v in qube.volumes.items()})


def test_qubes_and_their_settings(backend):
    qubes = {q.name: q for q in backend.list_qubes()}
    assert list(qubes) == sorted(ORDER)  # dom0 is not listed
    for name, spec in QUBES.items():
        qube = qubes[name]
        expected = {"label": spec["label"], **spec.get("properties", {})}
        if "template" in spec:
            expected["template"] = spec["template"]
        assert (qube.klass, qube.properties) == (spec["class"], expected), name
        assert qube.features == spec.get("features", {}), name
        # created-by-dom0 is kept; qubesd's own guivm-/audiovm- tags are not
        assert qube.tags == sorted(spec.get("tags", []) + ["created-by-dom0"]), name
        assert qube.running == spec.get("running", False), name


def test_volume_configuration(backend):
    qubes = {q.name: q for q in backend.list_qubes()}
    # qubesd R4.2 in a file-reflink pool: every volume writable, every volume
    # keeping the pool's revisions_to_keep (1)
    own_root = {"rw": True, "save_on_stop": True, "snap_on_start": False,
                "revisions_to_keep": 1, "ephemeral": False}
    template_root = {"rw": True, "save_on_stop": False, "snap_on_start": True,
                     "revisions_to_keep": 1, "ephemeral": False}
    private = own_root
    volatile = {"rw": True, "save_on_stop": False, "snap_on_start": False,
                "revisions_to_keep": 1, "ephemeral": False}
    for name, qube in qubes.items():
        root = own_root if qube.klass in ("TemplateVM", "StandaloneVM") else template_root
        assert set(qube.volumes) == {"root", "private", "volatile"}, name  # no kernel
        for vol, flags, size in (("root", root, 10 * GiB), ("private", private, 2 * GiB),
                                 ("volatile", volatile, 10 * GiB)):
            info = qube.volumes[vol]
            assert info.settings() == {"pool": "varlibqubes", "size": size, **flags}, \
                (name, vol)
            assert info.path is not None and not info.unreadable, (name, vol)


def test_where_volumes_live(backend):
    """What the volume sources need (docs/CHANGES.md): the pool's driver, the
    volume id in the pool, and what a running qube writes (--live)."""
    qubes = {q.name: q for q in backend.list_qubes()}
    for name, qube in qubes.items():
        prefix = "vm-templates" if qube.klass == "TemplateVM" else "appvms"
        for vol in qube.volumes.values():
            assert (vol.driver, vol.vid, vol.thin_pool) == (
                "file-reflink", f"{prefix}/{name}/{vol.name}", ""), (name, vol.name)
            assert vol.path.endswith(f"/{vol.vid}.img")
    work = qubes["work"]  # running: its changes are in -dirty.img beside the image
    assert work.volumes["private"].live_path == \
        work.volumes["private"].path.removesuffix(".img") + "-dirty.img"
    assert work.volumes["volatile"].live_path is None  # discarded at shutdown anyway
    assert qubes["fedora"].volumes["root"].live_path is None  # halted


def test_committed_images_are_read_never_the_running_ones(backend):
    qubes = {q.name: q for q in backend.list_qubes()}
    work = qubes["work"]
    assert work.running
    for name, qube in qubes.items():
        for vol in volumes_to_backup(qube):
            assert vol.path.endswith(f"/{name}/{vol.name}.img"), vol.path
            assert "-dirty" not in vol.path
    assert [v.name for v in volumes_to_backup(qubes["fedora"])] == ["private", "root"]
    assert [v.name for v in volumes_to_backup(qubes["sa"])] == ["private", "root"]
    assert [v.name for v in volumes_to_backup(work)] == ["private"]


def test_firewall_devices_and_dependencies(backend):
    qubes = {q.name: q for q in backend.list_qubes()}
    for name, spec in QUBES.items():
        details = backend.qube_details(name)
        assert details.firewall == spec.get("firewall", ["action=accept"]), name
        assert [d.settings() for d in details.devices] == spec.get("devices", []), name
        explicit = {"template": spec.get("template"), **spec.get("properties", {})}
        expected = {"netvm": None, "default_dispvm": None, "audiovm": "dom0", "guivm": "dom0",
                    "management_dispvm": None}
        if spec["class"] == "AppVM":
            expected["template"] = None
        expected.update({k: v for k, v in explicit.items() if k in expected})
        assert details.dependencies == expected, name
        assert details.dependencies.items() >= {
            k: v for k, v in qubes[name].properties.items() if k in expected}.items()
    with pytest.raises(QbackupError, match="reading the settings of nope failed"):
        backend.qube_details("nope")


@pytest.mark.qubesd
def test_settings_are_the_same_in_both_backends(sim_backend, qubesd_backend):
    """Beyond the explicit contract above: every field of every qube."""
    real = [without_paths(q) for q in qubesd_backend.list_qubes()]
    assert [without_paths(q) for q in sim_backend.list_qubes()] == real
    for name in ORDER:
        assert sim_backend.qube_details(name) == qubesd_backend.qube_details(name), name


def test_connect_reaches_the_daemon(backend, reachable):
    """A session through the backend's qrexec call (real daemon behind it)."""
    transport = backend.connect("backup", "contract")
    session = Session(transport)
    session.init(b"opaque key file", 8 << 20)
    session.close()


def test_connect_refuses_an_unknown_backup_qube(backend, reachable):
    with pytest.raises(QbackupError, match="backup qube 'nope' does not exist"):
        backend.connect("nope", "default")
    with pytest.raises(QbackupError, match="invalid repository name"):
        backend.connect("backup", "../etc")


# -- restore: the changes it makes, on both backends ------------------------------

class Stream:
    """A volume's data as import_volume reads it; `fail_at` raises there."""

    def __init__(self, data: bytes, fail_at: int | None = None):
        self.data, self.pos, self.fail_at, self.closed = data, 0, fail_at, False

    def read(self, n: int = -1) -> bytes:
        if self.fail_at is not None and self.pos >= self.fail_at:
            raise OSError("the stream broke")
        n = len(self.data) if n < 0 else n
        if self.fail_at is not None:
            n = min(n, self.fail_at - self.pos)
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk

    def close(self) -> None:
        self.closed = True


def image_of(backend, qube: str, volume: str) -> bytes:
    with open(backend.volume_config(qube)[volume].path, "rb") as f:
        return f.read()


def test_system(backend):
    system = backend.system()
    assert system.qubes == {"dom0": "AdminVM", **{n: QUBES[n]["class"] for n in ORDER}}
    assert system.running == {"dom0", "work", "backup"}
    assert "varlibqubes" in system.pools
    assert set(system.labels) >= {"red", "orange", "yellow", "green", "gray", "blue", "purple",
                                  "black"}
    assert system.defaults["default_pool"] == "varlibqubes"
    for name in ("default_template", "default_netvm", "default_dispvm", "management_dispvm"):
        assert system.defaults[name] is None, name


def test_a_new_qube_with_every_kind_of_setting(backend):
    backend.create_qube("new", "AppVM", "green", "fedora",
                        {"private": "varlibqubes", "volatile": "varlibqubes"})
    backend.add_tag("new", RESTORE_IN_PROGRESS)
    for prop, value in (("maxmem", 3000), ("memory", 500), ("vcpus", 3),
                        ("kernelopts", "quiet splash"), ("include_in_backups", False),
                        ("netvm", "sys-net"), ("default_dispvm", "dvm"), ("virt_mode", "hvm")):
        backend.set_property("new", prop, value)
    backend.set_feature("new", "service.crond", "1")
    backend.set_feature("new", "gui-emulated", "")
    backend.add_tag("new", "project-x")
    backend.set_firewall("new", ["action=accept specialtarget=dns", "action=drop"])
    backend.attach_device("new", Device("block", "sa", "sdc", {"read-only": "yes"}, True))
    backend.set_volume("new", "private", "revisions_to_keep", 3)
    backend.set_volume("new", "volatile", "ephemeral", True)
    backend.resize_volume("new", "volatile", 12 * GiB)
    backend.remove_tag("new", RESTORE_IN_PROGRESS)

    qube = {q.name: q for q in backend.list_qubes()}["new"]
    assert qube.klass == "AppVM"
    assert qube.properties == {"label": "green", "template": "fedora", "maxmem": 3000,
                               "memory": 500, "vcpus": 3, "kernelopts": "quiet splash",
                               "include_in_backups": False, "netvm": "sys-net",
                               "default_dispvm": "dvm", "virt_mode": "hvm"}
    assert qube.features == {"service.crond": "1", "gui-emulated": ""}
    assert qube.tags == ["created-by-dom0", "project-x"]
    assert backend.qube_tags("new") == sorted(["created-by-dom0", "project-x"] + (
        ["audiovm-dom0", "guivm-dom0"] if isinstance(backend, QubesAdminBackend) else []))
    details = backend.qube_details("new")
    assert details.firewall == ["action=accept specialtarget=dns", "action=drop"]
    assert details.devices == [Device("block", "sa", "sdc", {"read-only": "yes"}, True)]
    assert details.dependencies["netvm"] == "sys-net"
    private, volatile, root = (qube.volumes[v] for v in ("private", "volatile", "root"))
    assert (private.size, private.revisions_to_keep, private.pool) == (2 * GiB, 3, "varlibqubes")
    assert (volatile.size, volatile.ephemeral) == (12 * GiB, True)
    assert (root.snap_on_start, root.size) == (True, 10 * GiB)  # the template's


@pytest.mark.parametrize("args, message", [
    (("work", "AppVM", "red", "fedora", {}), "creating work failed: VM work already exists"),
    (("new", "AppVM", "nolabel", "fedora", {}), "creating new failed: .*nolabel"),
    (("new", "AppVM", "red", "fedora", {"root": "varlibqubes"}),
     "creating new failed: Snapshot volume root must be in the same pool"),
    (("new", "AppVM", "red", "fedora", {"private": "nopool"}), "creating new failed: .*nopool"),
    (("new", "TemplateVM", "red", "fedora", {}), "creating new failed: .*cannot be based on"),
])
def test_creating_a_qube_qubesd_refuses(backend, args, message):
    with pytest.raises(QbackupError, match=message):
        backend.create_qube(*args)
    assert "new" not in backend.system().qubes


def test_import_commits_only_exactly_the_announced_bytes(backend):
    backend.create_qube("new", "StandaloneVM", "red", None, {})
    data = os.urandom(1 << 20) + bytes(3 << 20) + b"end"
    stream = Stream(data)
    backend.import_volume("new", "private", stream, len(data))
    assert stream.closed
    assert image_of(backend, "new", "private") == data
    assert backend.volume_config("new")["private"].size == len(data)
    # short, long, broken: qubesd keeps the volume as it was
    with pytest.raises(QbackupError, match="new: importing volume private failed: Data import "
                                           "failed: not enough data"):
        backend.import_volume("new", "private", Stream(b"x" * 1000), len(data))
    with pytest.raises(QbackupError, match="Data import failed: too much data"):
        backend.import_volume("new", "private", Stream(data + b"!"), len(data))
    with pytest.raises(OSError, match="the stream broke"):
        backend.import_volume("new", "private", Stream(b"y" * len(data), fail_at=300000),
                              len(data))
    assert image_of(backend, "new", "private") == data
    assert backend.volume_config("new")["private"].size == len(data)
    backend.import_volume("new", "root", Stream(b"r" * 4096), 4096)
    assert image_of(backend, "new", "root") == b"r" * 4096


def test_import_is_refused_for_a_running_qube(backend):
    with pytest.raises(QbackupError, match="work: importing volume private failed: Domain is "
                                           "not powered off: 'work'"):
        backend.import_volume("work", "private", Stream(b"x"), 1)


def test_removing_a_qube(backend):
    with pytest.raises(QbackupError, match="removing fedora failed: Domain is in use"):
        backend.remove_qube("fedora")
    with pytest.raises(QbackupError, match="removing work failed: Domain is not powered off"):
        backend.remove_qube("work")
    backend.create_qube("new", "AppVM", "red", "fedora", {})
    backend.remove_qube("new")
    assert "new" not in backend.system().qubes


def test_the_file_manager_needs_a_complete_qube(backend, kind, monkeypatch, tmp_path):
    if kind == "qubesd":
        import qubesadmin.config
        from qubes_r42 import fake_qrexec_client
        log = tmp_path / "qrexec.log"
        monkeypatch.setattr(qubesadmin.config, "QREXEC_CLIENT",
                            str(fake_qrexec_client(tmp_path / "qrexec-client", log)))
    else:
        log = backend.directory / "qrexec.log"
    backend.create_qube("new", "AppVM", "red", "fedora", {})
    backend.add_tag("new", RESTORE_IN_PROGRESS)
    with pytest.raises(QbackupError, match="new failed to start: Restore of this domain in "
                                           "progress, cannot start"):
        backend.run_file_manager("new")
    backend.remove_tag("new", RESTORE_IN_PROGRESS)
    backend.run_file_manager("new")
    assert "new" in backend.system().running
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[-1]["stdin"] == FILE_MANAGER_COMMAND.decode()
    backend.kill_qube("new")
    assert "new" not in backend.system().running
