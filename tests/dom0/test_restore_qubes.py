# SPDX-License-Identifier: GPL-2.0-or-later
"""`qbackup restore --qubes` on the real R4.2 Admin API (tests/qubes_r42.py):
qubes of every class backed up from one qubesd, restored onto another
(a reinstalled system) through the whole command line, and compared setting
by setting and byte by byte; renames, dependency order, the refusal to touch
an existing qube, and a tampered chunk."""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from packs import forge_middle_chunk

from qbackup import cli
from qbackup.qubes import RESTORE_IN_PROGRESS, QubesAdminBackend, volumes_to_backup
from qbackup.recreate import RESTORE_FAILED
from qbackup_sim import start_daemon, stop_daemon

pytestmark = pytest.mark.qubesd

MiB = 1 << 20
PCI = "00_1f.6"


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Two dom0s in turn (qubesd test beds) and one backup qube's storage
    (a real daemon behind the stand-in qrexec-client) that outlives them."""
    import qubesadmin.config
    from qubes_r42 import Testbed, fake_qrexec_client
    root = Path(tempfile.mkdtemp(prefix="qbr-"))  # short: a Unix socket lives there
    start_daemon(root)
    client = fake_qrexec_client(tmp_path / "qrexec-client", tmp_path / "qrexec.log")
    monkeypatch.setattr(qubesadmin.config, "QREXEC_CLIENT", str(client))
    monkeypatch.setenv("QBACKUP_FAKE_QREXEC_SOCKET", str(root / "daemon.sock"))
    world = World(tmp_path, Testbed)
    yield world
    if world.testbed is not None:
        world.testbed.close()
    stop_daemon(root)


class World:
    def __init__(self, tmp_path: Path, testbed_class):
        self.tmp, self._testbed_class = tmp_path, testbed_class
        self.testbed = None
        self.passphrase = tmp_path / "passphrase"
        self.passphrase.write_text("restore qubes\n")
        self.systems = 0

    def new_system(self):
        """A freshly installed dom0: qubesd with only the backup qube (and
        the host's network card); dom0's own state starts empty."""
        if self.testbed is not None:
            self.testbed.close()
        self.systems += 1
        self.testbed = self._testbed_class(self.tmp / f"dom0-{self.systems}")
        self.testbed.pci_devices.add(PCI)
        self.testbed.add_qube("StandaloneVM", "backup", label="black")
        return self.testbed

    def backend(self) -> QubesAdminBackend:
        return QubesAdminBackend(self.testbed.client())

    def qbackup(self, *argv: str, capfd, expect: int = 0) -> tuple[str, str]:
        code = cli.run([*argv, "--passphrase-file", str(self.passphrase)],
                       backend=self.backend,
                       config={"backup_vm": "backup",
                               "state_dir": str(self.tmp / f"state-{self.systems}")})
        out, err = capfd.readouterr()
        assert code == expect, (code, out, err)
        return out, err


def fill(backend: QubesAdminBackend, qube: str, volume: str, size: int, seed: int) -> bytes:
    """Give a volume `size` bytes of data (some random, some zero, some
    repeated), as a qube would have written them; through the Admin API."""
    rng = random.Random(seed)
    block = rng.randbytes(256 << 10)
    data = bytearray(size)
    for offset in range(0, size, 512 << 10):
        data[offset:offset + (256 << 10)] = block if offset % (2 * MiB) else rng.randbytes(256 << 10)
    data = bytes(data[:size])
    backend.import_volume(qube, volume, io.BytesIO(data), len(data))
    return data


def small_template(qubesd, backend, name: str = "fedora") -> dict[str, bytes]:
    """A template whose volumes are a few MiB (qubesd makes them 10 GiB and
    2 GiB: importing those zeros would only make the tests slow)."""
    qubesd.add_qube("TemplateVM", name, label="black")
    return {"root": fill(backend, name, "root", 24 * MiB, 1),
            "private": fill(backend, name, "private", 3 * MiB, 2)}


def build_source(world) -> dict[str, dict[str, bytes]]:
    """Qubes of every class with settings of every kind; the data of the
    volumes a backup keeps."""
    qubesd = world.new_system()
    backend = world.backend()
    data = {"fedora": small_template(qubesd, backend)}
    vm = qubesd.app.domains["fedora"]
    vm.features.update({"os": "Linux", "qrexec": "1", "supported-service.cups": "1"})
    vm.tags.add("os-fedora")
    # a netvm chain: sys-net (with the network card) <- sys-firewall <- work
    qubesd.add_qube("AppVM", "sys-net", template="fedora", provides_network=True, netvm=None,
                    virt_mode="hvm", memory=300, label="red")
    assert qubesd.handle("admin.vm.device.pci.Attach", "sys-net", f"dom0+{PCI}",
                         b"no-strict-reset=True persistent=True") == b"0\0"
    qubesd.add_qube("AppVM", "sys-firewall", template="fedora", provides_network=True,
                    netvm="sys-net", label="green")
    # a disposable template and a named disposable
    qubesd.add_qube("AppVM", "dvm", template="fedora", template_for_dispvms=True,
                    netvm="sys-firewall", label="red")
    qubesd.app.domains["dvm"].features["appmenus-dispvm"] = "1"
    for name in ("sys-net", "sys-firewall", "dvm"):
        data[name] = {"private": fill(backend, name, "private", 1 * MiB, len(name))}
    qubesd.add_qube("DispVM", "disp-print", template="dvm", label="purple", netvm=None)
    # a standalone qube with a block device assigned from it
    qubesd.add_qube("StandaloneVM", "sa", label="green", virt_mode="hvm", kernelopts="nopat")
    data["sa"] = {"root": fill(backend, "sa", "root", 16 * MiB, 3),
                  "private": fill(backend, "sa", "private", 2 * MiB, 4)}
    qubesd.add_qube("AppVM", "work", template="fedora", label="blue", netvm="sys-firewall",
                    default_dispvm="dvm", management_dispvm="dvm", memory=600, maxmem=4000,
                    vcpus=3, kernelopts="quiet", qrexec_timeout=120, include_in_backups=True,
                    debug=True, default_user="alice")
    data["work"] = {"private": fill(backend, "work", "private", 9 * MiB, 5)}
    vm = qubesd.app.domains["work"]
    vm.features.update({"service.cups": "1", "gui-default-secure-copy-sequence": "Ctrl-c",
                        "menu-items": "firefox.desktop org.gnome.Nautilus.desktop"})
    vm.tags.update({"project-x", "important"})
    assert qubesd.handle("admin.vm.firewall.Set", "work", "", (
        b"action=accept dsthost=10.0.0.0/8 proto=tcp dstports=443-443\n"
        b"action=accept specialtarget=dns\naction=accept proto=icmp icmptype=8\n"
        b"action=drop\n")) == b"0\0"
    assert qubesd.handle("admin.vm.device.block.Attach", "work", "sa+sdb",
                         b"read-only=yes frontend-dev=xvdj persistent=True") == b"0\0"
    backend.set_volume("work", "private", "revisions_to_keep", 2)
    backend.set_volume("work", "volatile", "ephemeral", "True")
    backend.resize_volume("work", "volatile", 12 << 30)
    return data


def snapshot_of_system(backend: QubesAdminBackend, names) -> dict:
    """Every setting of the qubes `names` and the data of their volumes (not
    where the images are, nor how much of them is allocated)."""
    qubes = {q.name: q for q in backend.list_qubes()}
    state = {}
    for name in names:
        qube = qubes[name]
        state[name] = {
            "info": replace(qube, volumes={n: replace(v, path=None, usage=0)
                                           for n, v in qube.volumes.items()}),
            "details": backend.qube_details(name),
            "data": {v.name: Path(v.path).read_bytes() for v in volumes_to_backup(qube)},
        }
    return state


def test_every_class_restored_onto_an_empty_system(world, capfd):
    data = build_source(world)
    names = sorted(data) + ["disp-print"]
    before = snapshot_of_system(world.backend(), names)
    for name, volumes in data.items():
        assert before[name]["data"] == volumes, name
    world.qbackup("init", "--scrypt-n", "16384", "--pack-size", "8M", capfd=capfd)
    world.qbackup("backup", *names, capfd=capfd)

    qubesd = world.new_system()  # the disk failed: Qubes reinstalled
    out, err = world.qbackup("restore", "latest", "--qubes", capfd=capfd)
    assert f"restored {len(names)} qubes" in out and "warning" not in err
    after = snapshot_of_system(world.backend(), names)
    for name in names:
        assert after[name]["info"] == before[name]["info"], name
        assert after[name]["details"] == before[name]["details"], name
        assert after[name]["data"] == before[name]["data"], name
    assert after["work"]["details"].devices[0].options == {"read-only": "yes",
                                                           "frontend-dev": "xvdj"}
    assert after["sys-net"]["details"].devices[0].persistent
    assert qubesd.refused == [] and qubesd.aborted == []
    # dependency order: templates first, then netvms; netvm and default_dispvm
    # only once every qube exists; the tag that keeps a qube from starting
    # comes off last
    calls = [(m, d, a) for m, d, a in qubesd.calls if not m.endswith((".Info", ".List",
                                                                      ".GetAll"))]
    creates = [i for i, (m, _, _) in enumerate(calls) if m.startswith("admin.vm.Create")]
    order = [calls[i][0].rsplit(".", 1)[1] for i in creates]
    assert order[0] == "TemplateVM" and order[-1] == "DispVM"
    references = [i for i, (m, _, a) in enumerate(calls)
                  if m == "admin.vm.property.Set" and a in ("netvm", "default_dispvm")]
    assert references and min(references) > max(creates)
    untags = [i for i, (m, _, a) in enumerate(calls)
              if m == "admin.vm.tag.Remove" and a == RESTORE_IN_PROGRESS]
    assert len(untags) == len(names) and min(untags) > max(references)
    for name in names:
        assert RESTORE_IN_PROGRESS not in world.backend().qube_tags(name)


def small_source(world) -> dict:
    qubesd = world.new_system()
    backend = world.backend()
    small_template(qubesd, backend)
    qubesd.add_qube("AppVM", "sys-firewall", template="fedora", provides_network=True,
                    netvm=None)
    qubesd.add_qube("AppVM", "work", template="fedora", label="blue", netvm="sys-firewall")
    qubesd.add_qube("AppVM", "mail", template="fedora", label="yellow")
    for name in ("sys-firewall", "work", "mail"):  # 2 GiB of zeros each, else
        fill(backend, name, "private", 1 * MiB, 9)
    return {"work": fill(backend, "work", "private", 8 * MiB, 7),
            "mail": fill(backend, "mail", "private", 1 * MiB, 8)}


def test_renames_dry_run_and_missing_dependencies(world, capfd):
    data = small_source(world)
    world.qbackup("init", "--scrypt-n", "16384", "--pack-size", "8M", capfd=capfd)
    world.qbackup("backup", "fedora", "sys-firewall", "work", "mail", capfd=capfd)
    qubesd = world.new_system()
    qubesd.add_qube("TemplateVM", "debian", label="black")
    qubesd.app.default_template = "debian"
    qubesd.calls.clear()

    # work as work2 with its template renamed: references follow; its netvm
    # is neither restored nor here
    argv = ["restore", "latest", "--qubes", "work", "fedora", "--rename", "work:work2",
            "--rename", "fedora:fedora-old"]
    out, _ = world.qbackup(*argv, "--dry-run", capfd=capfd, expect=1)
    assert "create TemplateVM fedora-old (from fedora) label=black" in out
    assert "create AppVM work2 (from work) label=blue template=fedora-old" in out
    assert "work2: netvm sys-firewall is missing: sys-firewall is in the snapshot but not " \
           "restored (add it to --qubes)" in out
    changes = [c for c in qubesd.calls if not c[0].endswith((".List", ".GetAll", ".Info"))]
    assert changes == [("admin.vm.Start", "backup", "")]  # run_service starts the backup qube
    _, err = world.qbackup(*argv, capfd=capfd, expect=1)
    assert err.startswith("qbackup: error: work2: netvm sys-firewall is missing") and \
        "nothing was changed" in err and len(err.splitlines()) == 1
    out, err = world.qbackup(*argv, "--skip-missing", capfd=capfd)
    assert "qbackup: warning: work2: netvm sys-firewall is missing" in err
    qubes = {q.name: q for q in world.backend().list_qubes()}
    assert qubes["work2"].properties["template"] == "fedora-old"
    assert "netvm" not in qubes["work2"].properties  # the system's default
    assert Path(qubes["work2"].volumes["private"].path).read_bytes() == data["work"]
    assert "work" not in qubes and "fedora" not in qubes

    # a template that is nowhere: the system's default with --skip-missing
    out, err = world.qbackup("restore", "latest", "--qubes", "mail", "--skip-missing",
                             capfd=capfd)
    assert "template fedora is missing" in err and "default template debian" in err
    mail = {q.name: q for q in world.backend().list_qubes()}["mail"]
    assert mail.properties["template"] == "debian"


def test_existing_qubes_are_touched_only_with_replace(world, capfd):
    data = small_source(world)
    world.qbackup("init", "--scrypt-n", "16384", "--pack-size", "8M", capfd=capfd)
    world.qbackup("backup", "fedora", "mail", capfd=capfd)
    backend = world.backend()
    fill(backend, "mail", "private", 2 * MiB, 99)  # changed since
    world.testbed.calls.clear()
    _, err = world.qbackup("restore", "latest", "--qubes", capfd=capfd, expect=1)
    assert "fedora exists: restore never touches an existing qube without --replace fedora" \
        in err and "(and 1 more problems" in err
    assert not [c for c in world.testbed.calls if c[0].startswith(("admin.vm.Create",
                                                                   "admin.vm.Remove"))]
    _, err = world.qbackup("restore", "latest", "--qubes", "mail", "--replace", "mail",
                           capfd=capfd)
    mail = {q.name: q for q in world.backend().list_qubes()}["mail"]
    assert Path(mail.volumes["private"].path).read_bytes() == data["mail"]
    # a running qube is not replaced, nor is the backup qube
    world.testbed.set_running("mail")
    _, err = world.qbackup("restore", "latest", "--qubes", "mail", "--replace", "mail",
                           capfd=capfd, expect=1)
    assert "mail is running: shut it down before replacing it" in err
    # a template in use by another qube: qubesd refuses to remove it, and
    # nothing else is done
    _, err = world.qbackup("restore", "latest", "--qubes", "fedora", "--replace", "fedora",
                           capfd=capfd, expect=1)
    assert err.startswith("qbackup: error: removing fedora failed: ")


def test_a_tampered_chunk_leaves_no_qube_that_looks_complete(world, capfd):
    qubesd = world.new_system()
    backend = world.backend()
    small_template(qubesd, backend)
    qubesd.add_qube("AppVM", "work", template="fedora", label="blue")
    fill(backend, "work", "private", 12 * MiB, 11)
    world.qbackup("init", "--scrypt-n", "16384", "--pack-size", "8M", capfd=capfd)
    storage = Path(os.environ["QBACKUP_FAKE_QREXEC_SOCKET"]).parent / "storage"
    world.qbackup("backup", "fedora", capfd=capfd)
    first = set(storage.glob("default/packs/*/*.pack"))
    world.qbackup("backup", "fedora", "work", capfd=capfd)  # packs with work's data only
    [pack] = set(storage.glob("default/packs/*/*.pack")) - first
    forge_middle_chunk(pack)

    qubesd = world.new_system()
    out, err = world.qbackup("restore", "latest", "--qubes", capfd=capfd, expect=3)
    assert "restored 1 qubes from snapshot" in out and ": fedora" in out
    failed = [line for line in out.splitlines() if line.startswith("FAILED work: ")]
    assert len(failed) == 1 and "volume private not restored (qubesd discarded the import): " \
        "work:private at offset " in failed[0] and "fails authentication" in failed[0]
    offset = int(failed[0].split("at offset ")[1].split(":")[0])
    # the pack's middle record: its chunk's place in the volume depends on the
    # order the backup's workers finished their puts (offset 0 was seen once)
    assert 0 <= offset < 12 * MiB and offset % (256 << 10) == 0
    assert err.splitlines()[-1].startswith("qbackup: error: 1 qubes not restored completely: "
                                           "work; they keep the tags")
    work = {q.name: q for q in world.backend().list_qubes()}["work"]
    assert {RESTORE_IN_PROGRESS, RESTORE_FAILED} <= set(work.tags)
    # its private volume is the empty one qubesd created: nothing was committed
    private = work.volumes["private"]
    assert private.size == 2 << 30
    with open(private.path, "rb") as f:
        assert os.stat(private.path).st_blocks == 0 and not f.read(1 << 20).strip(b"\0")
    # and qubesd refuses to start it
    reply = qubesd.handle("admin.vm.Start", "work", "", b"")
    assert b"Restore of this domain in progress, cannot start" in reply
    assert json.dumps(out)  # printable report


def test_browse_a_qubes_files_in_a_disposable_qube(world, capfd, tmp_path):
    qubesd = world.new_system()
    backend = world.backend()
    small_template(qubesd, backend)
    qubesd.add_qube("AppVM", "work", template="fedora", label="blue", netvm=None)
    data = fill(backend, "work", "private", 6 * MiB, 12)
    world.qbackup("init", "--scrypt-n", "16384", "--pack-size", "8M", capfd=capfd)
    world.qbackup("backup", "work", capfd=capfd)
    fill(backend, "work", "private", 1 * MiB, 13)  # the file was lost since

    out, _ = world.qbackup("browse", "latest", "work", capfd=capfd)
    qubes = {q.name: q for q in world.backend().list_qubes()}
    [name] = [n for n in qubes if n.startswith("qbackup-browse-")]
    assert name.startswith("qbackup-browse-work-") and len(name) <= 31
    assert out.startswith(f"{name}: the private volume of work from snapshot ")
    browse = qubes[name]
    assert browse.klass == "AppVM" and browse.running
    assert browse.properties["label"] == "red" and browse.properties["netvm"] is None
    assert browse.properties["template"] == "fedora"
    assert browse.properties["include_in_backups"] is False
    assert "qbackup-browse" in browse.tags and RESTORE_IN_PROGRESS not in browse.tags
    assert Path(browse.volumes["private"].path).read_bytes() == data
    log = [json.loads(line) for line in (tmp_path / "qrexec.log").read_text().splitlines()]
    assert log[-2] == ["-d", name, "DEFAULT:QUBESRPC qubes.VMShell dom0"]
    assert "nautilus" in log[-1]["stdin"]

    # a qube that only looks like one is left alone; ours is killed and removed
    qubesd.add_qube("AppVM", "qbackup-browse-mine", template="fedora")
    out, err = world.qbackup("browse", "--cleanup", capfd=capfd)
    assert out == f"removed 1 browse qubes: {name}\n"
    assert "qbackup-browse-mine has no tag qbackup-browse" in err
    assert set(world.backend().system().qubes) == {"dom0", "backup", "fedora", "work",
                                                    "qbackup-browse-mine"}


def test_browse_removes_its_qube_when_a_chunk_is_forged(world, capfd):
    qubesd = world.new_system()
    backend = world.backend()
    small_template(qubesd, backend)
    qubesd.add_qube("AppVM", "work", template="fedora")
    world.qbackup("init", "--scrypt-n", "16384", "--pack-size", "8M", capfd=capfd)
    storage = Path(os.environ["QBACKUP_FAKE_QREXEC_SOCKET"]).parent / "storage"
    world.qbackup("backup", "fedora", capfd=capfd)
    first = set(storage.glob("default/packs/*/*.pack"))
    fill(backend, "work", "private", 6 * MiB, 14)
    world.qbackup("backup", "work", capfd=capfd)
    [pack] = set(storage.glob("default/packs/*/*.pack")) - first
    forge_middle_chunk(pack)
    _, err = world.qbackup("browse", "latest", "work", capfd=capfd, expect=3)
    assert err.startswith("qbackup: error: the private volume of work failed authentication: "
                          "work:private at offset ") and "was removed" in err
    assert not [q for q in world.backend().system().qubes if q.startswith("qbackup-browse")]
