# SPDX-License-Identifier: GPL-2.0-or-later
"""One set of contract tests for both qube backends: the real one
(QubesAdminBackend, through the real qubesadmin, against qubesd R4.2's Admin
API in this process) and the simulated dom0 (SimBackend).

The same qubes are made in both; each test asserts what qubesd answers and
runs against both, so the sim cannot drift from what qubesd really answers.
Where they disagree, qubesd is right."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from qbackup.errors import QbackupError
from qbackup.proto import Session
from qbackup.qubes import QubesAdminBackend, volumes_to_backup
from qbackup_sim import SimBackend, create_sim, stop_daemon

GiB = 1 << 30
# The qubes of the contract, as qvm-create and qvm-prefs/-features/-tags would
# make them; sizes are qubesd's defaults (private 2 GiB, root and volatile 10 GiB).
QUBES = {
    "fedora": {"class": "TemplateVM", "label": "black",
               "features": {"os": "Linux", "qrexec": "1", "supported-service.cups": "1"},
               "tags": ["os-fedora"]},
    "sys-net": {"class": "AppVM", "label": "red", "template": "fedora",
                "properties": {"provides_network": True, "memory": 300, "netvm": None},
                # servicevm: qubesd adds it with provides_network (core_features)
                "features": {"service.network-manager": "1", "servicevm": "1"}},
    "dvm": {"class": "AppVM", "label": "red", "template": "fedora",
            "properties": {"template_for_dispvms": True},
            "features": {"appmenus-dispvm": "1"}},
    "work": {"class": "AppVM", "label": "blue", "template": "fedora",
             "properties": {"netvm": "sys-net", "memory": 600, "maxmem": 4000, "vcpus": 2,
                            "kernelopts": "quiet", "default_dispvm": "dvm"},
             "features": {"service.cups": "1", "gui-default-secure-copy-sequence": "Ctrl-c"},
             "tags": ["work", "important"], "running": True},
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
    for name in ORDER:
        qube = QUBES[name]
        qubesd.add_qube(qube["class"], name, label=qube["label"],
                        template=qube.get("template"), **qube.get("properties", {}))
        vm = qubesd.app.domains[name]
        vm.features.update(qube.get("features", {}))
        vm.tags.update(qube.get("tags", []))
        if qube.get("running"):
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
                "revisions_to_keep": 1}
    template_root = {"rw": True, "save_on_stop": False, "snap_on_start": True,
                     "revisions_to_keep": 1}
    private = own_root
    volatile = {"rw": True, "save_on_stop": False, "snap_on_start": False,
                "revisions_to_keep": 1}
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


@pytest.mark.qubesd
def test_settings_are_the_same_in_both_backends(sim_backend, qubesd_backend):
    """Beyond the explicit contract above: every field of every qube."""
    real = [without_paths(q) for q in qubesd_backend.list_qubes()]
    assert [without_paths(q) for q in sim_backend.list_qubes()] == real


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
