# SPDX-License-Identifier: GPL-2.0-or-later
"""The restore plan (qbackup.recreate.plan): order, renames, what is
refused before anything changes, and --skip-missing's fallbacks. The plan
carried out on the real Admin API: test_restore_qubes.py; on the sim:
tests/integration/test_restore_qubes_sim.py."""

from __future__ import annotations

import os

import pytest

from qbackup.errors import UsageError
from qbackup.qubes import RESTORE_IN_PROGRESS, Device, SystemInfo
from qbackup.recreate import Options, plan
from qbackup.restore import SnapshotInfo

LABELS = ("red", "orange", "yellow", "green", "gray", "blue", "purple", "black")
CONFIG = {"pool": "vm-pool", "size": 1 << 30, "rw": True, "save_on_stop": True,
          "snap_on_start": False, "revisions_to_keep": 1, "ephemeral": False}


def qube(klass, props=None, volumes=("private",), **fields):
    snap_root = klass in ("AppVM", "DispVM")
    config = {"private": CONFIG,
              "root": {**CONFIG, "save_on_stop": not snap_root, "snap_on_start": snap_root},
              "volatile": {**CONFIG, "save_on_stop": False}}
    return {"class": klass, "properties": {"label": "red", **(props or {})}, "features": {},
            "tags": ["created-by-dom0"],
            "volumes": {v: {"size": 4096, "chunks": 1, "root": os.urandom(32), "depth": 1,
                            "settings": {}} for v in volumes},
            "volume_config": config, "firewall": ["action=accept"], "devices": [],
            "dependencies": {}, **fields}


QUBES = {
    "fedora": qube("TemplateVM", {"label": "black"}, ("root", "private")),
    "sys-net": qube("AppVM", {"template": "fedora", "provides_network": True, "netvm": None},
                    devices=[{"class": "pci", "backend": "dom0", "ident": "00_1f.6",
                              "options": {"no-strict-reset": "True"}, "persistent": True}]),
    "dvm": qube("AppVM", {"template": "fedora", "template_for_dispvms": True,
                          "netvm": "sys-net"}),
    "disp": qube("DispVM", {"template": "dvm"}, ()),
    "work": qube("AppVM", {"template": "fedora", "netvm": "sys-net", "default_dispvm": "dvm",
                           "memory": 600, "maxmem": 4000},
                 features={"service.cups": "1"}, tags=["project-x"],
                 firewall=["action=accept specialtarget=dns", "action=drop"],
                 devices=[{"class": "block", "backend": "usb", "ident": "sda",
                           "options": {"read-only": "yes"}, "persistent": True},
                          {"class": "block", "backend": "usb", "ident": "sdb",
                           "options": {}, "persistent": False}]),
}


def snapshot(qubes=None) -> SnapshotInfo:
    return SnapshotInfo(os.urandom(32), 1700000000.0, "dom0", None, qubes or QUBES, 0)


def system(*qubes: str, running=(), pools=("vm-pool",), **defaults) -> SystemInfo:
    return SystemInfo({"dom0": "AdminVM", "backup": "AppVM", "usb": "AppVM",
                       **{q: "TemplateVM" if q.startswith("tpl") else "AppVM" for q in qubes}},
                      frozenset({"dom0", "backup", *running}), pools, LABELS,
                      {"default_pool": "vm-pool", "default_template": None, "default_netvm": None,
                       "default_dispvm": None, "management_dispvm": None, **defaults})


def verbs(p):
    return [(s.action[0], s.qube) for s in p.steps]


def test_order_of_a_whole_restore():
    p = plan(snapshot(), system(), Options([], backup_vm="backup"))
    assert p.problems == []
    created = [s.qube for s in p.steps if s.kind == "create"]
    assert created == ["fedora", "sys-net", "dvm", "work", "disp"]
    kinds = [s.kind for s in p.steps]
    last_create = max(i for i, k in enumerate(kinds) if k == "create")
    first_reference = kinds.index("reference")
    assert last_create < first_reference < kinds.index("device") < kinds.index("finish")
    assert set(kinds[kinds.index("finish"):]) == {"finish"}
    # each qube is tagged right after its creation, and untagged at the end
    for name in created:
        steps = [s for s in p.steps if s.qube == name]
        assert steps[0].kind == "create" and steps[1].action == ("tag", name, RESTORE_IN_PROGRESS)
        assert steps[-1].action == ("untag", name, RESTORE_IN_PROGRESS)
    work = [s.action for s in p.steps if s.qube == "work"]
    assert ("property", "work", "maxmem", 4000) in work
    assert work.index(("property", "work", "maxmem", 4000)) < work.index(
        ("property", "work", "memory", 600))
    assert ("firewall", "work", ["action=accept specialtarget=dns", "action=drop"]) in work
    assert ("device", "work", Device("block", "usb", "sda", {"read-only": "yes"}, True)) in work
    assert not [a for a in work if a[0] == "device" and a[2].ident == "sdb"]
    assert "work: block device usb:sdb is not restored: it was attached only while the qube " \
           "ran (not persistent)" in p.warnings
    # pools of every volume the qube owns; root of an AppVM is its template's
    create = next(s for s in p.steps if s.action[:2] == ("create", "work"))
    assert create.action == ("create", "work", "AppVM", "red", "fedora",
                             {"private": "vm-pool", "volatile": "vm-pool"})
    assert create.text == ("create AppVM work label=red template=fedora "
                           "pool:private=vm-pool pool:volatile=vm-pool")
    imports = [s.action[1:3] for s in p.steps if s.kind == "import"]
    assert imports == [("fedora", "private"), ("fedora", "root"), ("sys-net", "private"),
                       ("dvm", "private"), ("work", "private")]


def test_renames_follow_references():
    p = plan(snapshot(), system(), Options([], renames={"fedora": "f2", "sys-net": "net"}))
    assert p.problems == []
    assert p.names["fedora"] == "f2"
    actions = [s.action for s in p.steps]
    assert ("create", "work", "AppVM", "red", "f2", {"private": "vm-pool",
                                                      "volatile": "vm-pool"}) in actions
    assert ("property", "work", "netvm", "net") in actions
    assert ("property", "net", "netvm", None) in actions


@pytest.mark.parametrize("options, message", [
    (Options(["nosuch"]), "not in snapshot"),
    (Options(["work"], renames={"fedora": "x"}), "--rename fedora:x: fedora is not restored"),
    (Options([], renames={"work": "fedora"}), "two qubes would be restored as fedora"),
    (Options(["work"], replace={"fedora"}), "--replace fedora: no qube is restored"),
])
def test_impossible_options(options, message):
    with pytest.raises(UsageError, match=message):
        plan(snapshot(), system(), options)


def test_existing_qubes_are_refused_without_replace():
    p = plan(snapshot(), system("work", "dvm", running=("dvm",)),
             Options([], replace={"dvm"}, backup_vm="backup"))
    assert "work exists: restore never touches an existing qube without --replace work (or " \
           "restore it as another qube: --rename work:NEW)" in p.problems
    assert "dvm is running: shut it down before replacing it" in p.problems
    p = plan(snapshot({"backup": qube("AppVM", {"template": "fedora"}),
                       "fedora": QUBES["fedora"]}),
             system(), Options([], replace={"backup"}, backup_vm="backup"))
    assert p.problems == ["backup is the backup qube the restore reads from: it cannot be "
                          "replaced"]


def test_replace_removes_first():
    p = plan(snapshot(), system("work", "dvm"), Options([], replace={"work", "dvm"}))
    assert p.problems == []
    assert verbs(p)[:2] == [("remove", "work"), ("remove", "dvm")]  # dependents first


def test_missing_dependencies_are_refused_or_replaced_by_defaults():
    options = Options(["work"])
    p = plan(snapshot(), system(), options)
    assert "work: template fedora is missing: fedora is in the snapshot but not restored (add " \
           "it to --qubes); --skip-missing would use the system's default template none" \
           in p.problems
    assert any(m.startswith("work: netvm sys-net is missing") for m in p.problems)
    assert not [m for m in p.problems if "usb" in m]  # the device's backend is here
    p = plan(snapshot(), system("tpl-debian", default_template="tpl-debian",
                                default_netvm="sys-firewall"),
             Options(["work"], skip_missing=True))
    assert p.problems == []
    create = next(s for s in p.steps if s.kind == "create")
    assert create.action[4] == "tpl-debian"
    assert "work: netvm sys-net is missing (sys-net is in the snapshot but not restored (add " \
           "it to --qubes)): leaving netvm at the system's default (sys-firewall) " \
           "(--skip-missing)" in p.warnings
    assert not [s for s in p.steps if s.action[:3] == ("property", "work", "netvm")]
    # no default to fall back on
    p = plan(snapshot(), system(), Options(["work"], skip_missing=True))
    assert "work: its template fedora is missing and this system has no default to use " \
           "instead" in p.problems


def test_templates_of_the_wrong_class_are_refused():
    p = plan(snapshot(), system("fedora"), Options(["work"], skip_missing=True))
    assert "work: its template fedora is of class AppVM, not TemplateVM" in p.problems


def test_pools_labels_and_values():
    qubes = {"fedora": QUBES["fedora"],
             "work": qube("AppVM", {"template": "fedora", "label": "pink",
                                    "odd": [1, 2]})}
    p = plan(snapshot(qubes), system(pools=("other",)), Options([]))
    assert "work: label pink does not exist on this system" in p.problems
    assert "work: property odd has a value qbackup cannot restore" in p.problems
    assert any(m.startswith("fedora: volume private: pool vm-pool does not exist") for m in
               p.problems)
    p = plan(snapshot(qubes), system(pools=("other",)), Options([], pool="other"))
    assert not [m for m in p.problems if "pool" in m]
    create = next(s for s in p.steps if s.kind == "create")
    assert create.action[5] == {"root": "other", "private": "other", "volatile": "other"}
    p = plan(snapshot(qubes), system(pools=("other",)), Options([], skip_missing=True))
    assert not [m for m in p.problems if "pool" in m]
    assert next(s for s in p.steps if s.kind == "create").action[5] == {}


def test_format_1_snapshots_say_what_they_lack():
    qubes = {"fedora": {**QUBES["fedora"], "firewall": None, "devices": None,
                        "volume_config": {}, "tags": []}}
    p = plan(snapshot(qubes), system(), Options([]))
    assert p.problems == []
    assert any("no firewall rules recorded" in w for w in p.warnings)
    assert any("no device assignments recorded" in w for w in p.warnings)
    assert any("no volume configuration" in w for w in p.warnings)
    # the original was not created by dom0: the tag qubesd adds comes off
    assert ("untag", "fedora", "created-by-dom0") in [s.action for s in p.steps]


def test_a_format_1_snapshot_restores(tmp_path):
    """A snapshot written before format 2 (no firewall, devices or
    ephemeral recorded) still gives working qubes, with its data, on the sim."""
    import msgpack

    from qbackup import crypto, proto, transport
    from qbackup.backup import VolumeSource, backup
    from qbackup.recreate import execute
    from qbackup.restore import load_history
    from qbackup.state import State
    from qbackup_sim import SimBackend, create_sim, socket_path, start_daemon, stop_daemon

    old = create_sim(tmp_path / "old", {
        "tpl": {"class": "TemplateVM", "label": "black", "volumes": {"root": 1 << 20,
                                                                     "private": 1 << 20}},
        "work": {"class": "AppVM", "label": "blue", "template": "tpl",
                 "volumes": {"private": 3 << 20}}})
    data = os.urandom(1 << 20)
    with open(old / "volumes/work/private.img", "r+b") as f:
        f.seek(1 << 20)
        f.write(data)
    keys = crypto.create_keys(64 << 10)
    state = State(str(tmp_path / "state"))
    start_daemon(old)
    try:
        def session():
            return proto.Session(transport.unix_socket(str(socket_path(old)), "v1"))
        s = session()
        s.init(crypto.wrap_keys(keys, b"pw", scrypt_n=2 ** 14), 8 << 20)
        qubes = {q.name: q for q in SimBackend(old).list_qubes()}
        sources = [VolumeSource(q, v.name, v.path, v.size, v.settings())
                   for q in ("tpl", "work") for v in qubes[q].volumes.values()
                   if v.name in ("private", "root") and v.save_on_stop]
        meta = {q: {k: v for k, v in qubes[q].settings().items()} for q in ("tpl", "work")}
        stats = backup(s, keys, sources, meta, state=state)
        s.close()
        # rewrite its manifest as format 1 wrote it, under a new snapshot id
        s = session()
        s.open(True, lock_wait=15)
        [snap] = load_history(s, keys, state)
        doc = {"format": "qbackup-manifest", "version": 1, "repo_id": keys.repo_id,
               "snapshot_id": os.urandom(32), "time": snap.time + 1, "host": "dom0",
               "predecessor": stats.snapshot_id, "chunk_size": keys.chunk_size,
               "qubes": {}}
        for name, entry in snap.qubes.items():
            entry = {k: v for k, v in entry.items()
                     if k not in ("firewall", "devices", "dependencies")}
            entry["volume_config"] = {v: {k: x for k, x in c.items() if k != "ephemeral"}
                                      for v, c in entry["volume_config"].items()}
            doc["qubes"][name] = entry
        plain = msgpack.packb(doc, use_bin_type=True)
        roots = [v["root"] for q in snap.qubes.values() for v in q["volumes"].values()
                 if v["root"] != crypto.ZERO_ID]
        s.commit(doc["snapshot_id"], crypto.seal_snapshot(keys, doc["snapshot_id"], plain), roots)
        v1 = load_history(s, keys, state)[-1]
        assert v1.version == 1 and v1.id == doc["snapshot_id"]
        new = create_sim(tmp_path / "new", {})
        backend = SimBackend(new)
        p = plan(v1, backend.system(), Options([]))
        assert p.problems == []
        assert sum("no firewall rules recorded" in w for w in p.warnings) == 2
        outcome = execute(p, backend, s, keys)
        s.close()
    finally:
        stop_daemon(old)
    assert outcome.restored == ["tpl", "work"] and not outcome.failed
    restored = {q.name: q for q in SimBackend(new).list_qubes()}
    assert restored["work"].properties == qubes["work"].properties
    with open(restored["work"].volumes["private"].path, "rb") as f:
        assert f.read() == bytes(1 << 20) + data + bytes(1 << 20)
