# SPDX-License-Identifier: GPL-2.0-or-later
"""`qbackup restore --qubes` and `show` through the command line
(subprocesses) on the simulated dom0: qubes of every class backed up from
one sim and restored onto an empty one that has the backup qube's storage
(a reinstalled system), compared setting by setting and byte by byte;
renames, the refusal to touch an existing qube, a tampered chunk."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from packs import forge_middle_chunk

from qbackup.qubes import RESTORE_IN_PROGRESS, volumes_to_backup
from qbackup.recreate import RESTORE_FAILED
from qbackup_sim import SimBackend, create_sim, stop_daemon

PASSPHRASE = b"restore qubes on the sim\n"
TIMEOUT = 300  # guards against a hang, never a performance assertion
MiB, GiB = 1 << 20, 1 << 30

QUBES = {
    "tpl": {"class": "TemplateVM", "label": "black", "features": {"os": "Linux"},
            "tags": ["os-fedora"], "volumes": {"root": 3 * MiB, "private": 1 * MiB,
                                               "volatile": 10 * GiB}},
    "sys-net": {"class": "AppVM", "label": "red", "template": "tpl", "netvm": None,
                "properties": {"provides_network": True, "virt_mode": "hvm", "memory": 300},
                "features": {"servicevm": "1"},
                "devices": [{"class": "pci", "backend": "dom0", "ident": "00_1f.6",
                             "options": {"no-strict-reset": "True"}, "persistent": True}],
                "volumes": {"root": 3 * MiB, "private": 1 * MiB, "volatile": 10 * GiB}},
    "sys-firewall": {"class": "AppVM", "label": "green", "template": "tpl", "netvm": "sys-net",
                     "properties": {"provides_network": True},
                     "volumes": {"root": 3 * MiB, "private": 1 * MiB, "volatile": 10 * GiB}},
    "dvm": {"class": "AppVM", "label": "red", "template": "tpl", "netvm": "sys-firewall",
            "properties": {"template_for_dispvms": True},
            "features": {"appmenus-dispvm": "1"},
            "volumes": {"root": 3 * MiB, "private": 1 * MiB, "volatile": 10 * GiB}},
    "disp-print": {"class": "DispVM", "label": "purple", "template": "dvm", "netvm": None,
                   "volumes": {"root": 3 * MiB, "private": 1 * MiB, "volatile": 10 * GiB}},
    "sa": {"class": "StandaloneVM", "label": "green", "properties": {"virt_mode": "hvm"},
           "volumes": {"root": 2 * MiB, "private": 1 * MiB, "volatile": 10 * GiB}},
    "work": {"class": "AppVM", "label": "blue", "template": "tpl", "netvm": "sys-firewall",
             "properties": {"default_dispvm": "dvm", "memory": 600, "maxmem": 4000,
                            "kernelopts": "quiet", "include_in_backups": True},
             "features": {"service.cups": "1", "menu-items": "firefox.desktop"},
             "tags": ["project-x"],
             "firewall": ["action=accept dst4=10.0.0.0/8 proto=tcp dstports=443-443",
                          "action=accept specialtarget=dns", "action=drop"],
             "devices": [{"class": "block", "backend": "sa", "ident": "sdb",
                          "options": {"read-only": "yes"}, "persistent": True}],
             "volumes": {"root": 3 * MiB,
                         "private": {"size": 2 * MiB + 12345, "revisions_to_keep": 2},
                         "volatile": {"size": 12 * GiB, "ephemeral": True}}},
}


class Dom0:
    """A simulated dom0 and how to run `qbackup` against it."""

    def __init__(self, root: Path, passphrase: Path):
        self.dir, self.passphrase = root, passphrase

    def run(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "qbackup_sim", "run", str(self.dir), *args,
                               "--passphrase-file", str(self.passphrase)],
                              capture_output=True, text=True, timeout=TIMEOUT,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == expect, (args, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def backend(self) -> SimBackend:
        return SimBackend(self.dir)

    def state(self, names) -> dict:
        backend = self.backend()
        qubes = {q.name: q for q in backend.list_qubes()}
        return {name: (replace(qubes[name], volumes={n: replace(v, path=None, usage=0)
                                                     for n, v in qubes[name].volumes.items()}),
                       backend.qube_details(name),
                       {v.name: Path(v.path).read_bytes()
                        for v in volumes_to_backup(qubes[name])})
                for name in names}


@pytest.fixture
def dom0s(tmp_path_factory):
    """The dom0 that made the backups, and a fresh one to restore onto
    (created by `reinstall`, with the first one's backup qube storage)."""
    passphrase = tmp_path_factory.mktemp("pw") / "passphrase"
    passphrase.write_bytes(PASSPHRASE)
    made = []

    def make(qubes: dict) -> Dom0:
        root = create_sim(tmp_path_factory.mktemp("sim"), qubes)
        made.append(root)
        return Dom0(root, passphrase)

    def reinstall(old: Dom0) -> Dom0:
        stop_daemon(old.dir)
        new = make({})
        shutil.rmtree(new.dir / "storage")
        shutil.copytree(old.dir / "storage", new.dir / "storage")
        return new

    yield make, reinstall
    for root in made:
        stop_daemon(root)


def source(make) -> Dom0:
    dom0 = make(QUBES)
    rng = random.Random(5)
    for qube in dom0.backend().list_qubes():
        for vol in volumes_to_backup(qube):
            with open(vol.path, "r+b") as f:
                for offset in range(0, vol.size, 128 << 10):
                    if rng.random() < 0.6:
                        f.seek(offset)
                        f.write(rng.randbytes(min(64 << 10, vol.size - offset)))
    dom0.run("init", "--scrypt-n", "16384", "--pack-size", "8M")
    return dom0


def test_every_class_restored_onto_an_empty_sim(dom0s):
    make, reinstall = dom0s
    old = source(make)
    old.run("backup", "--all")
    names = sorted(QUBES)
    before = old.state(names)
    new = reinstall(old)
    proc = new.run("restore", "latest", "--qubes")
    assert f"restored {len(names)} qubes" in proc.stdout and "warning" not in proc.stderr
    after = new.state(names)
    for name in names:
        assert after[name] == before[name], name
    for name in names:
        assert RESTORE_IN_PROGRESS not in new.backend().qube_tags(name)

    # show: the qubes, their settings, and what changed (first snapshot: all added)
    shown = json.loads(new.run("show", "latest", "--json").stdout)
    assert sorted(shown["qubes"]) == names
    assert shown["qubes"]["work"]["firewall"] == QUBES["work"]["firewall"]
    assert shown["qubes"]["work"]["volumes"]["private"] == {
        "size": 2 * MiB + 12345, "backed_up": True,
        "config": {"pool": "varlibqubes", "size": 2 * MiB + 12345, "rw": True,
                   "save_on_stop": True, "snap_on_start": False, "revisions_to_keep": 2,
                   "ephemeral": False}}
    assert shown["changes"]["added"] == names and shown["changes"]["predecessor"] is None


def test_show_says_what_changed(dom0s):
    make, _ = dom0s
    dom0 = source(make)
    dom0.run("backup", "tpl", "work", "sa")
    backend = dom0.backend()
    backend.set_property("work", "memory", 800)
    backend.add_tag("work", "new-tag")
    backend.set_firewall("work", ["action=drop"])
    with open(backend.volume_config("work")["private"].path, "r+b") as f:
        f.seek(1 * MiB)
        f.write(random.Random(9).randbytes(300 << 10))  # two chunks of 256 KiB, or three
    dom0.run("backup", "tpl", "work")
    shown = json.loads(dom0.run("show", "latest", "--json").stdout)
    changes = shown["changes"]
    assert changes["added"] == [] and changes["removed"] == ["sa"]
    assert {c["setting"]: (c["old"], c["new"]) for c in changes["settings"]["work"]} == {
        "property memory": (600, 800), "tag new-tag": (False, True),
        "firewall": (QUBES["work"]["firewall"], ["action=drop"])}
    private = changes["volumes"]["work"]["private"]
    assert private["changed_chunks"] == 2 and private["changed_bytes"] == 512 << 10
    assert changes["volumes"]["tpl"]["root"]["changed_chunks"] == 0
    text = dom0.run("show", "latest").stdout
    assert "work: property memory: 600 -> 800" in text
    assert "work:private: 512.0 KiB changed (2 chunks) of 2.0 MiB" in text
    assert "removed: sa" in text



def test_rename_replace_and_refusal(dom0s):
    make, reinstall = dom0s
    old = source(make)
    old.run("backup", "tpl", "work", "sys-net", "sys-firewall", "dvm", "sa")
    before = old.state(["work"])["work"]
    new = reinstall(old)
    new.run("restore", "latest", "--qubes", "tpl", "sys-net", "sys-firewall", "dvm", "sa")
    # work as work2: its references to restored qubes stay right
    proc = new.run("restore", "latest", "--qubes", "work", "--rename", "work:work2")
    work2 = new.state(["work2"])["work2"]
    assert work2[0].properties == before[0].properties and work2[2] == before[2]
    assert work2[1] == before[1]
    # an existing qube is refused (nothing changes), --replace replaces it
    proc = new.run("restore", "latest", "--qubes", "work", "--rename", "work:work2", expect=1)
    assert "work2 exists: restore never touches an existing qube without --replace work2" \
        in proc.stderr and len(proc.stderr.splitlines()) == 1
    with open(new.backend().volume_config("work2")["private"].path, "r+b") as f:
        f.write(b"changed since")
    new.run("restore", "latest", "--qubes", "work", "--rename", "work:work2",
            "--replace", "work2")
    assert new.state(["work2"])["work2"][2] == before[2]


def test_tampered_chunk_leaves_the_qube_marked(dom0s):
    make, reinstall = dom0s
    old = source(make)
    old.run("backup", "tpl")
    first = set(old.dir.glob("storage/default/packs/*/*.pack"))
    old.run("backup", "tpl", "work", "sys-net", "sys-firewall", "dvm", "sa")
    new = reinstall(old)
    packs = set(new.dir.glob("storage/default/packs/*/*.pack"))
    for pack in packs:
        if pack.relative_to(new.dir) not in {p.relative_to(old.dir) for p in first}:
            forge_middle_chunk(pack)
    proc = new.run("restore", "latest", "--qubes", expect=3)
    failed = sorted({line.split(":")[0][len("FAILED "):] for line in proc.stdout.splitlines()
                     if line.startswith("FAILED ")})
    assert failed and "tpl" not in failed
    assert "fails authentication" in proc.stdout
    assert proc.stderr.splitlines()[-1].startswith(f"qbackup: error: {len(failed)} qubes not "
                                                   "restored completely")
    for name in failed:
        tags = new.backend().qube_tags(name)
        assert RESTORE_IN_PROGRESS in tags and RESTORE_FAILED in tags


def test_browse_and_cleanup(dom0s):
    make, _ = dom0s
    dom0 = source(make)
    dom0.run("backup", "work")
    data = dom0.state(["work"])["work"][2]["private"]
    proc = dom0.run("browse", "latest", "work")
    name = proc.stdout.split(":")[0]
    assert name.startswith("qbackup-browse-work-")
    backend = dom0.backend()
    browse = {q.name: q for q in backend.list_qubes()}[name]
    assert browse.running and browse.properties["netvm"] is None
    assert browse.properties["label"] == "red" and browse.properties["template"] == "tpl"
    assert Path(browse.volumes["private"].path).read_bytes() == data
    [call] = [json.loads(line) for line in (dom0.dir / "qrexec.log").read_text().splitlines()]
    assert call["qube"] == name and call["service"] == "qubes.VMShell"
    proc = dom0.run("browse", "--cleanup")
    assert proc.stdout == f"removed 1 browse qubes: {name}\n"
    assert name not in dom0.backend().system().qubes
    assert not (dom0.dir / "volumes" / name).exists()
    dom0.run("browse", "latest", expect=2)
    dom0.run("browse", "--cleanup", "latest", expect=2)
