# SPDX-License-Identifier: GPL-2.0-or-later
"""A real Qubes R4.2 Admin API in this process, for testing qbackup's adapter.

The oracle for everything qbackup asks of Qubes is the R4.2 code itself:
qubesd's Admin API handlers (qubes-core-admin 4.2.39) answer the real
qubesadmin client (qubes-core-admin-client 4.2.18), as the CI of Qubes runs
them (../shared/vendor/qubes-r4.2/README.md):

- qubesd: `qubes.Qubes` with a mocked libvirt connection, its storage pools
  real: the `varlibqubes` file pool and any `file-reflink` pool on a
  directory of the test's (a btrfs or xfs loop file system gives real
  reflinks), and `lvm_thin` pools answered by a stand-in `lvm` on PATH that
  keeps its volumes in a JSON file and logs every command it is given;
- qubesadmin: `qubesadmin.app.QubesLocal` whose `qubesd_call` runs the
  handler in-process instead of connecting to /var/run/qubesd.sock, and
  records every call (method, destination, argument) so tests can count
  them; replies and errors are encoded exactly as qubesd encodes them.
  `run_service` is qubesadmin's own: it runs `qubesadmin.config.QREXEC_CLIENT`,
  which a test points at a stand-in;
- `admin.vm.volume.Import` / `ImportWithSize`, which qubesadmin hands to the
  script `/etc/qubes-rpc/admin.vm.volume.Import` (qubes-core-admin's
  `qubes-rpc/`, not in the tarball) rather than to qubesd, are answered the
  way that script answers them: `internal.vm.volume.ImportBegin` through
  qubesd's real internal API, the data written by the real `dd` with the
  script's options, the byte count and any extra data checked, then
  `internal.vm.volume.ImportEnd` with `ok` or `fail` and the reason (a
  stand-in for the script; `import_script`);
- the host's PCI bus: `pci_devices` names the PCI devices the host has (the
  only thing qubesd checks, in sysfs, when one is assigned to a halted qube).

The sources are located through $QBACKUP_QUBES_SOURCES (default
`../shared/vendor/qubes-r4.2` next to the repository) and installed into the
test venv by scripts/setup.sh. `missing()` says why the test bed cannot run;
tests marked `qubesd` skip with that reason, and fail in CI (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import types
import unittest.mock
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCES_ENV = "QBACKUP_QUBES_SOURCES"
# Where scripts/setup.sh unpacks the tarballs (editable installs point here).
UNPACKED = REPO_ROOT / "build" / "qubes-r4.2"
VERSIONS = {"qubes": "4.2.39", "qubesadmin": "4.2.18"}
# What `qvm-features fedora-38` shows on an R4.2 system, roughly, and some
# features app qubes carry.
TEMPLATE_FEATURES = [
    "gui", "os", "os-distribution", "os-distribution-like", "os-version", "os-eol",
    "qrexec", "vmexec", "template-name", "template-epoch", "template-release",
    "supported-service.cups", "supported-service.crond",
    "supported-service.network-manager", "supported-service.qubes-firewall",
    "supported-service.qubes-updates-proxy", "supported-rpc.qubes.PdfConvert",
    "menu-items", "default-menu-items", "netvm-menu-items"]
APP_FEATURES = ["service.cups", "service.crond", "menu-items", "gui-secure-copy",
                "vm-config.x"]
# admin.vm.volume.Import's dd (qubes-rpc/admin.vm.volume.Import, R4.2), run
# without sudo: the test bed's images belong to the test's user.
IMPORT_DD = ["dd", "bs=128K", "iflag=count_bytes,fullblock",
             "conv=sparse,notrunc,nocreat,fdatasync"]
IMPORT_METHODS = ("admin.vm.volume.Import", "admin.vm.volume.ImportWithSize")
PCI_SYSFS = "/sys/bus/pci/devices/"
LVM_STATE_ENV = "QBACKUP_FAKE_LVM_STATE"
LVM_LOG_ENV = "QBACKUP_FAKE_LVM_LOG"
LVM_DEV_ENV = "QBACKUP_FAKE_LVM_DEV"
THIN_BLOCK = 64 << 10  # the stand-in thin pools' block size (thin_delta: 128 sectors)


def sources_dir() -> Path:
    """Where the R4.2 source tarballs are."""
    default = REPO_ROOT.parent / "shared" / "vendor" / "qubes-r4.2"
    return Path(os.environ.get(SOURCES_ENV) or default)


def missing() -> str | None:
    """Why the test bed cannot run here, or None if it can."""
    if not sources_dir().is_dir():
        return (f"the Qubes R4.2 sources are not at {sources_dir()} "
                f"(set ${SOURCES_ENV})")
    test_packages = UNPACKED / "qubes-core-admin" / "test-packages"
    if not test_packages.is_dir():
        return f"{test_packages} is missing: run scripts/setup.sh"
    import importlib.metadata
    for dist, version in VERSIONS.items():
        try:
            found = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return f"{dist} is not installed in this venv: run scripts/setup.sh"
        if found != version:
            return f"{dist} {found} is installed, the test bed needs {version}"
    return None


# -- the stand-in `lvm` --------------------------------------------------------

_FAKE_LVM = '''\
#!{python}
# Stand-in for lvm(8), for qubesd's lvm_thin driver and qbackup's own calls.
# Volumes live in the JSON file ${state}: {{"VG/LV": {{"size": B, "attr": ..,
# "pool_lv": .., "origin": .., "thin_id": N, "uuid": .., "map": {{vblock:
# data block}}}}}}; every command line is appended to ${log}. With ${dev}
# set, each thin LV's data is the sparse file ${dev}/VG/LV: a snapshot gets
# the mapped blocks of its origin (thin pools share them), a new thin LV is
# unmapped (zeros). Thin pool blocks are BLOCK bytes.
import fcntl, json, os, sys, uuid
BLOCK = {block}
state_path, log_path = os.environ["{state}"], os.environ["{log}"]
dev_dir = os.environ.get("{dev}")
argv = sys.argv[1:]
lock = open(state_path + ".lock", "a")
fcntl.flock(lock, fcntl.LOCK_EX)  # qubesd runs several at once
with open(log_path, "a") as log:
    log.write(json.dumps(argv) + "\\n")
with open(state_path) as f:
    lvs = json.load(f)

def fail(message):
    sys.stderr.write(message + "\\n")
    sys.exit(5)

def opt(name):
    for a in argv:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None

def vg_lv(ref):
    ref = ref.removeprefix("/dev/")
    if ref not in lvs:
        fail("Failed to find logical volume " + ref)
    return ref

def data_file(name):
    return os.path.join(dev_dir, name) if dev_dir else None

def make_file(name, size, mapping_from=None):
    path = data_file(name)
    if path is None:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
        if mapping_from is not None:  # the blocks the snapshot shares with its origin
            with open(data_file(mapping_from), "rb") as src:
                for vblock in lvs[mapping_from].get("map", {{}}):
                    src.seek(int(vblock) * BLOCK)
                    f.seek(int(vblock) * BLOCK)
                    f.write(src.read(BLOCK))

def next_thin_id():
    return 1 + max([lv.get("thin_id", 0) for lv in lvs.values()] + [0])

def named(args):
    return [a.removeprefix("/dev/") for a in args]

def positional(args):  # what is neither an option nor an option's value
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("-o", "--options", "--units", "-O", "--sort"):
            skip = True
        elif not a.startswith("-"):
            out.append(a)
    return out

command, args = argv[0], positional(argv[1:])
if command == "lvs":
    wanted = named(args)
    rows = []
    for name, lv in sorted(lvs.items()):
        vg, lv_name = name.split("/", 1)
        if wanted and name not in wanted and vg not in wanted:
            continue
        rows.append({{"vg_name": vg, "pool_lv": lv.get("pool_lv", ""), "lv_name": lv_name,
                     "lv_size": str(lv["size"]) + "B", "data_percent": "0.00",
                     "lv_attr": lv["attr"], "origin": lv.get("origin", ""),
                     "lv_uuid": lv.get("uuid", ""), "thin_id": str(lv.get("thin_id", "")),
                     "lv_metadata_size": str(lv.get("metadata_size", "")) and
                     str(lv.get("metadata_size")) + "B",
                     "metadata_percent": "1.00" if lv.get("metadata_size") else ""}})
    print(json.dumps({{"report": [{{"lv": rows}}]}}))
    sys.exit(0)
if command == "lvcreate":
    name = opt("--name").split("/")[-1]  # qubesd gives VG/LV, lvm takes either
    (source,) = args
    vg = source.split("/")[0]
    if vg + "/" + name in lvs:
        fail("Logical Volume " + name + " already exists")
    perm = "r" if opt("--permission") == "r" else "w"
    if "--thin" in argv:  # new thin volume in pool `source`
        pool = vg_lv(source).split("/")[1]
        size = int(opt("--virtualsize").removesuffix("B"))
        lvs[vg + "/" + name] = {{"size": size, "attr": "Vwi-a-tz--", "pool_lv": pool,
                                "origin": "", "thin_id": next_thin_id(),
                                "uuid": uuid.uuid4().hex, "map": {{}}}}
        make_file(vg + "/" + name, size)
    else:  # thin snapshot of `source`
        origin_name = vg_lv(source)
        origin = lvs[origin_name]
        lvs[vg + "/" + name] = dict(origin, origin=source.split("/")[1],
                                   attr="V" + perm + "i-a-tz--", thin_id=next_thin_id(),
                                   uuid=uuid.uuid4().hex, map=dict(origin.get("map", {{}})))
        make_file(vg + "/" + name, origin["size"], origin_name)
elif command == "lvremove":
    (target,) = args
    del lvs[vg_lv(target)]
    if data_file(target.removeprefix("/dev/")) and os.path.exists(data_file(target.removeprefix("/dev/"))):
        os.unlink(data_file(target.removeprefix("/dev/")))
elif command == "lvrename":
    old, new = named(args)
    lvs[new] = lvs.pop(vg_lv(old))
    if data_file(old) and os.path.exists(data_file(old)):
        os.rename(data_file(old), data_file(new))
elif command == "lvextend":
    (target,) = args
    lvs[vg_lv(target)]["size"] = int(opt("--size").removesuffix("B"))
    if data_file(vg_lv(target)):
        os.truncate(data_file(vg_lv(target)), lvs[vg_lv(target)]["size"])
elif command == "lvchange":
    (target,) = args
    lv = lvs[vg_lv(target)]
    active = opt("--activate")
    if active in ("y", "n"):
        lv["attr"] = lv["attr"][:4] + ("a" if active == "y" else "-") + lv["attr"][5:]
else:
    fail("stand-in lvm: unsupported command " + command)
with open(state_path + ".tmp", "w") as f:
    json.dump(lvs, f)
os.replace(state_path + ".tmp", state_path)
'''


_FAKE_BLKDISCARD = '''\
#!{python}
# Stand-in for blkdiscard(8) on the stand-in lvm's volumes: /dev/VG/LV then
# reads zeros and maps no block (qubesd runs it before removing a revision).
import fcntl, json, os, sys
state_path, dev_dir = os.environ["{state}"], os.environ["{dev}"]
name = sys.argv[-1].removeprefix("/dev/")
with open(state_path + ".lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    with open(state_path) as f:
        lvs = json.load(f)
    if name not in lvs:
        sys.exit(1)
    with open(os.path.join(dev_dir, name), "r+b") as f:
        f.truncate(0)
        f.truncate(lvs[name]["size"])
    lvs[name]["map"] = {{}}
    with open(state_path + ".tmp", "w") as f:
        json.dump(lvs, f)
    os.replace(state_path + ".tmp", state_path)
with open(os.environ["{log}"], "a") as log:
    log.write(json.dumps(["blkdiscard"] + sys.argv[1:]) + "\\n")
'''


class FakeLvm:
    """The stand-in `lvm` and its state: volumes and the commands it ran.

    Thin LVs have data in sparse files under `dev` (`dev/VG/LV`, as
    /dev/VG/LV) and a block map (virtual block -> pool data block, blocks of
    THIN_BLOCK bytes), so snapshots share blocks with their origin as in a
    real thin pool; `write` changes an LV as a qube would (new data blocks
    for the blocks it touches), `discard` as blkdiscard does, and
    `metadata_xml` describes the pool for `thin_restore`."""

    def __init__(self, bin_dir: Path, state_dir: Path):
        self.state = state_dir / "lvm.json"
        self.log = state_dir / "lvm.log"
        self.dev = state_dir / "dev"
        self.dev.mkdir()
        self.state.write_text("{}")
        self.log.write_text("")
        script = bin_dir / "lvm"
        script.write_text(_FAKE_LVM.format(python=sys.executable, state=LVM_STATE_ENV,
                                           log=LVM_LOG_ENV, dev=LVM_DEV_ENV,
                                           block=THIN_BLOCK))
        script.chmod(0o755)
        self.script = script
        blkdiscard = bin_dir / "blkdiscard"
        blkdiscard.write_text(_FAKE_BLKDISCARD.format(python=sys.executable, state=LVM_STATE_ENV,
                                                      dev=LVM_DEV_ENV, log=LVM_LOG_ENV))
        blkdiscard.chmod(0o755)
        os.environ[LVM_STATE_ENV] = str(self.state)
        os.environ[LVM_LOG_ENV] = str(self.log)
        os.environ[LVM_DEV_ENV] = str(self.dev)

    def volumes(self) -> dict[str, dict[str, Any]]:
        return json.loads(self.state.read_text())

    def _update(self, change) -> None:
        import fcntl
        with open(str(self.state) + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            lvs = self.volumes()
            change(lvs)
            self.state.write_text(json.dumps(lvs))

    def write(self, lv: str, offset: int, data: bytes) -> None:
        """Write to thin LV `VG/LV` as its user would: every block touched
        gets a new data block (copy-on-write away from any snapshot)."""
        def change(lvs):
            entry = lvs[lv]
            pool = entry["pool_lv"]
            with open(self.dev / lv, "r+b") as f:
                f.seek(offset)
                f.write(data)
            first, last = offset // THIN_BLOCK, (offset + len(data) - 1) // THIN_BLOCK
            used = [int(d) for v in lvs.values() if v.get("pool_lv") == pool
                    for d in v.get("map", {}).values()]
            fresh = max(used, default=-1) + 1
            for vblock in range(first, last + 1):
                entry["map"][str(vblock)] = fresh
                fresh += 1
        self._update(change)

    def metadata_xml(self) -> str:
        """The thin pools' metadata as thin_dump writes it (thin_restore's input)."""
        lvs = self.volumes()
        devices = [(lv["thin_id"], lv.get("map", {})) for lv in lvs.values()
                   if "thin_id" in lv]
        top = max([int(d) for _, m in devices for d in m.values()], default=0) + 1
        lines = [f'<superblock uuid="" time="1" transaction="1" flags="0" version="2" '
                 f'data_block_size="{THIN_BLOCK // 512}" nr_data_blocks="{top + 1024}">']
        for thin_id, mapping in sorted(devices):
            lines.append(f'  <device dev_id="{thin_id}" mapped_blocks="{len(mapping)}" '
                         f'transaction="0" creation_time="0" snap_time="0">')
            for vblock, dblock in sorted((int(v), int(d)) for v, d in mapping.items()):
                lines.append(f'    <single_mapping origin_block="{vblock}" '
                             f'data_block="{dblock}" time="0"/>')
            lines.append("  </device>")
        lines.append("</superblock>")
        return "\n".join(lines) + "\n"

    def add_thin_pool(self, vg: str, pool: str, size: int = 1 << 40) -> None:
        lvs = self.volumes()
        lvs[f"{vg}/{pool}"] = {"size": size, "attr": "twi-aotz--", "pool_lv": "",
                               "origin": "", "metadata_size": 1 << 30}
        self.state.write_text(json.dumps(lvs))

    def commands(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]


# -- the test bed ----------------------------------------------------------------

class Testbed:
    """qubesd (R4.2) in this process, with qubes, pools and running state
    set up by the test, and qubesadmin clients that talk to it.

    Patches module globals of qubes.config and os.environ['PATH'] while it
    lives: use one at a time, and `close()` it (the fixture does)."""

    def __init__(self, base: Path, varlibqubes_driver: str = "file-reflink"):
        self.base = base
        bin_dir = base / "bin"
        bin_dir.mkdir(parents=True)
        self._saved_path = os.environ["PATH"]
        os.environ["PATH"] = f"{bin_dir}:{self._saved_path}"
        self.lvm = FakeLvm(bin_dir, base)
        # qubesd runs `sudo lvm ...` when not root, and `sudo ln -sf ...` into
        # /etc/systemd when a qube's autostart is set: lvm goes to the
        # stand-in, anything else is logged and never run on this machine.
        sudo = bin_dir / "sudo"
        sudo.write_text(f'#!/bin/sh\n[ "$1" = lvm ] && exec "$@"\n'
                        f'echo "$@" >> {base / "sudo.log"}\n')
        sudo.chmod(0o755)
        test_packages = str(UNPACKED / "qubes-core-admin" / "test-packages")
        if test_packages not in sys.path:  # stub libvirt, qubesdb, dbus
            sys.path.insert(0, test_packages)

        import qubes
        import qubes.api.admin
        import qubes.app
        import qubes.config
        import qubes.exc
        self._qubes = qubes
        self.varlib = base / "var-lib-qubes"
        self._saved_config = (qubes.config.qubes_base_dir,
                              dict(qubes.config.system_path),
                              json.dumps(qubes.config.defaults["pool_configs"]))
        qubes.config.qubes_base_dir = str(self.varlib)
        qubes.config.system_path["qubes_base_dir"] = str(self.varlib)
        pools = qubes.config.defaults["pool_configs"]
        pools["varlibqubes"]["dir_path"] = str(self.varlib)
        # As on a dom0 whose /var/lib/qubes supports reflinks (btrfs, xfs)
        # unless told otherwise; without setup_check any directory will do.
        pools["varlibqubes"]["driver"] = varlibqubes_driver
        if varlibqubes_driver == "file-reflink":
            pools["varlibqubes"]["setup_check"] = False
        pools["linux-kernel"]["dir_path"] = str(self.varlib / "vm-kernels")

        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        # No QubesDB here: the stub's watch fd is a constant (3), which the
        # event loop must not poll.
        self._patches = [unittest.mock.patch.object(qubes.vm.BaseVM, "start_qdb_watch")]
        self._patches[0].start()
        self.app = qubes.Qubes(str(self.varlib / "qubes.xml"), load=False,
                               offline_mode=False)
        self.app.vmm = unittest.mock.Mock(spec=qubes.app.VMMConnection)
        self.app.vmm.offline_mode = False
        self.app.vmm.libvirt_conn.lookupByUUID.side_effect = self._libvirt_domain
        # the host: 16 GiB, 4 CPUs (model, MiB, cpus, MHz, nodes, sockets, cores, threads)
        self.app.vmm.libvirt_conn.getInfo.return_value = ["x86_64", 16384, 4, 2000, 1, 1, 4, 1]
        self.app.vmm.xc.physinfo.return_value = {"free_memory": 8 << 20, "virt_caps": ""}
        # xenstore: a start time for running qubes, nothing else
        self.app.vmm.xs.read.side_effect = (
            lambda _tx, path: "1764500000.5" if path.endswith("/start_time") else None)
        self._patches.append(unittest.mock.patch("qubes.storage.lvm.os",
                                                 _DevView(self.lvm.dev)))
        self._patches[-1].start()
        self.app.load_initial_values()
        self.app.default_kernel = None  # no kernels in vm-kernels/
        self.run(self.app.setup_pools())
        self.running: set[str] = set()
        self.start_error: str | None = None  # set: admin.vm.Start fails with it
        self._patches.append(unittest.mock.patch.object(
            qubes.vm.qubesvm.QubesVM, "start", autospec=True, side_effect=self._start))
        self._patches[-1].start()
        # kill waits for libvirt's shutdown event, which never comes here
        self._patches.append(unittest.mock.patch.object(
            qubes.vm.qubesvm.QubesVM, "kill", autospec=True, side_effect=self._kill))
        self._patches[-1].start()
        # The host's PCI devices, as qubesd's pci extension looks for them in
        # sysfs (its only check when a device is assigned to a halted qube).
        import qubes.ext.pci
        self.pci_devices: set[str] = set()
        self._patches.append(unittest.mock.patch.object(
            qubes.ext.pci, "os", _HostOs(self.pci_devices)))
        self._patches[-1].start()
        # Every call made through a client: (method, destination, argument).
        # Calls qubesd refused (method, destination, argument, exception
        # name, "" for a dropped connection) and those it aborted with an
        # unexpected exception (its log).
        self.calls: list[tuple[str, str, str]] = []
        self.refused: list[tuple[str, str, str, str]] = []
        self.aborted: list[tuple[str, str]] = []

    # -- qubesd side

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def add_pool(self, name: str, driver: str, **config: Any) -> Any:
        """A storage pool: e.g. `file-reflink` with dir_path= (setup_check=False
        off a reflink file system), or `lvm_thin` with volume_group= and
        thin_pool= (the stand-in lvm gets that thin pool)."""
        if driver == "lvm_thin":
            self.lvm.add_thin_pool(config["volume_group"], config["thin_pool"])
        return self.run(self.app.add_pool(name, driver=driver, **config))

    def add_qube(self, klass: str, name: str, *, label: str = "red",
                 template: str | None = None, pool: str | None = None,
                 **properties: Any) -> Any:
        """A qube made as qvm-create makes it (admin.vm.Create.CLASS or
        CreateInPool, so qubesd creates its volumes and tags it
        created-by-dom0); `properties` are then set directly (qube names for
        qube-valued ones). Returns qubesd's object."""
        method = "admin.vm.CreateInPool." if pool else "admin.vm.Create."
        payload = f"name={name} label={label}" + (f" pool={pool}" if pool else "")
        reply = self.handle(method + klass, "dom0", template, payload.encode())
        if not reply.startswith(b"0\0"):
            raise RuntimeError(f"creating {name}: {reply!r}")
        vm = self.app.domains[name]
        for key, value in properties.items():
            setattr(vm, key, value)
        return vm

    def populate(self, count: int, seed: int = 1) -> int:
        """`count` qubes as on a typical system: one TemplateVM in ten, with
        the features a Fedora template carries, the rest AppVMs with 0-3
        features; every qube tagged. Returns the number of features."""
        import random
        rng = random.Random(seed)
        templates = [f"tpl-{i}" for i in range(max(1, count // 10))]
        features = 0
        for i in range(count):
            if i < len(templates):
                name, names = templates[i], TEMPLATE_FEATURES
                self.add_qube("TemplateVM", name, label="black")
            else:
                name = f"app-{i}"
                names = rng.sample(APP_FEATURES, rng.randint(0, 3))
                self.add_qube("AppVM", name, template=rng.choice(templates),
                              memory=rng.choice([400, 800, 1200]))
            vm = self.app.domains[name]
            vm.features.update({n: "1" for n in names})
            vm.tags.add(f"group-{i % 3}")
            features += len(names)
        return features

    def set_running(self, name: str, running: bool = True) -> None:
        """Make libvirt report the qube active (or not)."""
        vm = self.app.domains[name]
        vm._libvirt_domain = None  # qubesd caches the domain object
        (self.running.add if running else self.running.discard)(name)

    def _libvirt_domain(self, uuid_bytes: bytes) -> Any:
        import libvirt
        vm = next((vm for vm in self.app.domains if vm.uuid.bytes == uuid_bytes), None)
        if vm is None:  # a qube being created: libvirt knows nothing of it yet
            raise libvirt.libvirtError("no domain")
        domain = unittest.mock.Mock()
        active = vm.name in self.running
        domain.isActive.return_value = active
        domain.state.return_value = [libvirt.VIR_DOMAIN_RUNNING if active
                                     else libvirt.VIR_DOMAIN_SHUTOFF, 0]
        domain.ID.return_value = vm.qid if active else -1
        # no devices attached while it runs (qubesd's device extensions parse this)
        domain.XMLDesc.return_value = "<domain><devices/></domain>"
        return domain

    async def _start(self, vm: Any, start_guid: bool = True, mem_required: Any = None,
                     **_kwargs: Any) -> Any:
        """QubesVM.start up to its first event: qubesd's domain-pre-start
        handlers run (backup_restore refuses a qube being restored), then
        the qube is running; nothing of Xen is started."""
        if self.start_error is not None:
            raise self._qubes.exc.QubesVMError(vm, self.start_error)
        if vm.name in self.running:
            raise self._qubes.exc.QubesVMNotHaltedError(vm)
        await vm.fire_event_async("domain-pre-start", pre_event=True, start_guid=start_guid,
                                  mem_required=mem_required)
        self.set_running(vm.name)
        return vm

    async def _kill(self, vm: Any) -> Any:
        if vm.name not in self.running:
            raise self._qubes.exc.QubesVMNotStartedError(vm)
        self.set_running(vm.name, False)
        return vm

    # -- qubesadmin side

    def client(self) -> Any:
        """A fresh qubesadmin app (cache off, as qubesadmin.Qubes() starts)
        whose calls go to this qubesd and are recorded in `calls`."""
        import qubesadmin.app
        testbed = self

        class Client(qubesadmin.app.QubesLocal):
            def qubesd_call(self, dest, method, arg=None, payload=None,
                            payload_stream=None):
                testbed.calls.append((method, dest or "", arg or ""))
                if method in IMPORT_METHODS and payload_stream is not None:
                    reply = testbed.import_script(method, dest, arg, payload,
                                                  payload_stream)
                    if not reply.startswith(b"0\0"):
                        testbed.refused.append((method, dest or "", arg or "",
                                                reply.split(b"\0")[1].decode()))
                    return self._parse_qubesd_response(reply)
                if payload_stream is not None:
                    payload = (payload or b"") + payload_stream.read()
                    payload_stream.close()
                reply = testbed.handle(method, dest, arg, payload or b"")
                if not reply.startswith(b"0\0"):
                    testbed.refused.append((method, dest or "", arg or "",
                                            reply.split(b"\0")[1].decode() if reply else ""))
                return self._parse_qubesd_response(reply)

        return Client()

    def handle(self, method: str, dest: str | None, arg: str | None,
               payload: bytes) -> bytes:
        """One Admin API call from dom0, answered as qubesd answers it on its
        socket: b'0\\0' + reply, b'2\\0' + exception, or b'' (call aborted)."""
        import qubes.api.admin as admin_api
        return self._answer(method, payload, lambda: admin_api.QubesAdminAPI(
            self.app, b"dom0", method.encode(), (dest or "dom0").encode(),
            (arg or "").encode()))

    def internal(self, method: str, dest: str, arg: str, payload: bytes) -> bytes:
        """One call to qubesd's internal API (qubesd.internal.sock), answered
        as qubesd-query prints it: b'0\\0' + reply or b'2\\0' + exception."""
        import qubes.api.internal as internal_api
        return self._answer(method, payload, lambda: internal_api.QubesInternalAPI(
            self.app, b"dom0", method.encode(), dest.encode(), arg.encode()))

    def _answer(self, method: str, payload: bytes, make_api: Any) -> bytes:
        qubes = self._qubes
        try:
            reply = self.run(make_api().execute(untrusted_payload=payload))
        except qubes.exc.QubesException as e:
            return b"2\0" + type(e).__name__.encode() + b"\0\0" + str(e).encode() + b"\0"
        except (qubes.api.PermissionDenied, qubes.api.ProtocolError):
            return b""
        except Exception as e:  # qubesd logs it and closes the connection
            self.aborted.append((method, repr(e)))
            return b""
        return b"0\0" + (reply or "").encode()

    def import_script(self, method: str, dest: str, arg: str, payload: bytes | None,
                      stream: Any) -> bytes:
        """admin.vm.volume.Import(WithSize) as the R4.2 script answers it
        (stand-in; qubes-core-admin qubes-rpc/admin.vm.volume.Import):
        ImportBegin with the first line of the input (ImportWithSize) or
        nothing (Import); `dd` of exactly SIZE bytes into the path qubesd
        returned; "not enough data" / "too much data" checked; ImportEnd
        with `ok` or `fail\\nREASON`, whose answer is the reply. The input is
        `payload` then `stream`, copied as qubesadmin copies it
        (`_call_with_stream`): an exception from the stream ends the input
        (the script sees EOF) and is raised once the script is done."""
        stdin = _Input(payload or b"", stream)
        first = b""
        if method.endswith("WithSize"):  # qubesd-query --single-line --max-bytes=21
            while len(first) < 21 and (byte := stdin.read(1)) not in (b"", b"\n"):
                first += byte
        begin = self.internal("internal.vm.volume.ImportBegin", dest, arg, first)
        if not begin.startswith(b"0\0"):
            stdin.close()
            return begin
        size, path = begin[2:].decode().split(" ", 1)
        dd = subprocess.Popen([*IMPORT_DD, f"of={path}", f"count={size}"],
                              stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "LC_ALL": "C"})
        stdin.copy_to(dd.stdin, int(size))
        dd.stdin.close()
        dd_err = dd.stderr.read().decode()
        error = ""
        if dd.wait() != 0:
            error = "error copying data"
        elif (copied := int(dd_err.splitlines()[-1].split(" ")[0])) != int(size):
            error = (f"not enough data (copied {copied} bytes, expected "
                     f"{size} bytes)")
        elif stdin.read(1):
            error = f"too much data (expected {size} bytes)"
        stdin.close()
        end = self.internal("internal.vm.volume.ImportEnd", dest, arg,
                            b"ok" if not error else b"fail\n" + error.encode())
        if stdin.exception is not None:
            raise stdin.exception
        return end

    def count(self, method: str | None = None) -> int:
        return sum(1 for m, _, _ in self.calls if method is None or m == method)

    def close(self) -> None:
        for patch in self._patches:
            patch.stop()
        self.app.close()
        self.loop.close()
        asyncio.set_event_loop(None)
        qubes = self._qubes
        base_dir, system_path, pool_configs = self._saved_config
        qubes.config.qubes_base_dir = base_dir
        qubes.config.system_path.clear()
        qubes.config.system_path.update(system_path)
        qubes.config.defaults["pool_configs"] = json.loads(pool_configs)
        os.environ["PATH"] = self._saved_path


class _DevView:
    """`os` for qubesd's lvm driver, whose /dev/VG/LV are the stand-in's
    data files (it checks them with os.path.exists before committing,
    removing or discarding a volume)."""

    def __init__(self, dev: Path):
        self._dev = dev
        outer = self

        class _Path:
            def __getattr__(self, name: str) -> Any:
                return getattr(os.path, name)

            def exists(self, path: str) -> bool:
                if path.startswith("/dev/") and not path.startswith("/dev/mapper/"):
                    return os.path.exists(outer._dev / path[len("/dev/"):])
                return os.path.exists(path)
        self.path = _Path()

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


class ToolStandIn:
    """qbackup's tool runner (qbackup.tools.current) for tests: `lvm` runs
    the stand-in lvm; `dmsetup message ... reserve_metadata_snap` /
    `release_metadata_snap` are answered as the kernel answers them (one
    reservation per pool, EEXIST / EINVAL otherwise); `thin_delta -m` runs
    the real thin_delta on metadata built with the real thin_restore from
    the stand-in's pools. Every command line is kept in `calls`; `fail`
    maps a word of a command line to the error that command then gives."""

    def __init__(self, lvm: FakeLvm, work: Path):
        self.lvm = lvm
        self.work = work
        self.calls: list[list[str]] = []
        self.reserved: set[str] = set()
        self.fail: dict[str, str] = {}

    def run(self, argv: list[str], *, timeout: float) -> str:
        from qbackup import tools
        self.calls.append(list(argv))
        for word, error in self.fail.items():
            if word in argv:
                raise tools.ToolError(f"{tools.describe(argv)} failed: {error}")
        if argv[0] == "lvm":
            return tools.Runner().run(argv, timeout=timeout)
        if argv[:2] == ["dmsetup", "message"]:
            device, action = argv[2], argv[4]
            if action == "reserve_metadata_snap":
                if device in self.reserved:
                    raise tools.ToolError("dmsetup message failed: device-mapper: message "
                                          "ioctl on " + device + " failed: File exists")
                self.reserved.add(device)
            elif action == "release_metadata_snap":
                if device not in self.reserved:
                    raise tools.ToolError("dmsetup message failed: device-mapper: message "
                                          "ioctl on " + device + " failed: Invalid argument")
                self.reserved.discard(device)
            return ""
        if argv[0] == "thin_delta":
            device = argv[-1]
            assert argv[1] == "-m" and device.endswith("_tmeta"), argv
            tpool = device.removeprefix("/dev/mapper/").removesuffix("_tmeta") + "-tpool"
            assert tpool in self.reserved, "thin_delta -m without a reserved metadata snapshot"
            xml, meta = self.work / "metadata.xml", self.work / "metadata.bin"
            xml.write_text(self.lvm.metadata_xml())
            with open(meta, "wb") as f:
                f.truncate(16 << 20)
            subprocess.run(["thin_restore", "-i", str(xml), "-o", str(meta)], check=True,
                           capture_output=True)
            return tools.Runner().run(["thin_delta", *argv[2:-1], str(meta)], timeout=timeout)
        raise AssertionError(f"unexpected tool call {argv}")


@contextlib.contextmanager
def reachable_daemon(monkeypatch: Any, tmp_path: Path):
    """A real daemon as the backup qube's qubes.BackupChunk, behind the
    stand-in qrexec-client that qubesadmin's run_service runs; yields the
    qrexec-client log."""
    import qubesadmin.config
    from qbackup_sim import start_daemon, stop_daemon
    root = Path(tempfile.mkdtemp(prefix="qbq-"))  # short: a Unix socket lives there
    try:
        start_daemon(root)
        log = tmp_path / "qrexec.log"
        client = fake_qrexec_client(tmp_path / "qrexec-client", log)
        monkeypatch.setattr(qubesadmin.config, "QREXEC_CLIENT", str(client))
        monkeypatch.setenv("QBACKUP_FAKE_QREXEC_SOCKET", str(root / "daemon.sock"))
        yield log
    finally:
        stop_daemon(root)
        shutil.rmtree(root, ignore_errors=True)


class _Input:
    """The import script's stdin: the payload, then the stream qubesadmin
    copies after it. An exception from the stream is kept (the script
    sees EOF) to be raised to the caller afterwards, as qubesadmin would."""

    def __init__(self, payload: bytes, stream: Any):
        self._head = payload
        self._stream = stream
        self.exception: BaseException | None = None

    def read(self, n: int) -> bytes:
        if self._head:
            data, self._head = self._head[:n], self._head[n:]
            return data
        if self.exception is not None:
            return b""
        try:
            return self._stream.read(n)
        except BaseException as e:  # re-raised by import_script
            self.exception = e
            return b""

    def copy_to(self, pipe: Any, size: int) -> None:
        """Copy up to `size` bytes into `pipe` (dd's count=SIZE)."""
        copied = 0
        while copied < size and (data := self.read(min(1 << 16, size - copied))):
            try:
                pipe.write(data)
            except BrokenPipeError:
                break
            copied += len(data)

    def close(self) -> None:
        self._stream.close()


class _HostOs(types.ModuleType):
    """`os` for qubesd's pci extension: the PCI devices in sysfs are the
    test bed's `pci_devices` (BDF idents, `00_1f.6`); the rest is `os`."""

    def __init__(self, devices: set[str]):
        super().__init__("os")
        self.__dict__.update(os.__dict__)
        self.path = types.ModuleType("os.path")
        self.path.__dict__.update(os.path.__dict__)

        def exists(path: Any) -> bool:
            path = os.fspath(path)
            if path.startswith(PCI_SYSFS):
                bdf = path[len(PCI_SYSFS):].removeprefix("0000:")
                return bdf.replace(":", "_", 1) in devices
            return os.path.exists(path)
        self.path.exists = exists


def fake_qrexec_client(path: Path, log: Path) -> Path:
    """Write a stand-in for dom0's qrexec-client at `path`.

    It logs its argv (one JSON line) to `log`, then acts on its environment:
    QBACKUP_FAKE_QREXEC_EXIT=N exits N at once (125: the socket service
    could not be reached, 127: no such service); otherwise it connects to
    the Unix socket QBACKUP_FAKE_QREXEC_SOCKET, sends the header
    qrexec-agent sends (`SERVICE+ARG dom0\\0`), and copies data both ways
    until the service closes, with stdin EOF passed on as a half-close.
    QBACKUP_FAKE_QREXEC_STDERR is written to stderr first. A service other
    than qubes.BackupChunk (qubes.VMShell, say) only has its input logged
    (`{"stdin": TEXT}`) and exits QBACKUP_FAKE_QREXEC_SERVICE_EXIT (0)."""
    path.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, socket, sys, threading
        with open({str(log)!r}, "a") as f:
            f.write(json.dumps(sys.argv[1:]) + "\\n")
        sys.stderr.write(os.environ.get("QBACKUP_FAKE_QREXEC_STDERR", ""))
        sys.stderr.flush()
        if "QBACKUP_FAKE_QREXEC_EXIT" in os.environ:
            sys.exit(int(os.environ["QBACKUP_FAKE_QREXEC_EXIT"]))
        user, call = sys.argv[-1].split(":", 1)
        kind, service, source = call.split(" ")
        assert kind == "QUBESRPC", kind
        if not service.startswith("qubes.BackupChunk"):
            stdin = sys.stdin.buffer.read().decode()
            with open({str(log)!r}, "a") as f:
                f.write(json.dumps({{"stdin": stdin}}) + "\\n")
            sys.exit(int(os.environ.get("QBACKUP_FAKE_QREXEC_SERVICE_EXIT", "0")))
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(os.environ["QBACKUP_FAKE_QREXEC_SOCKET"])
        s.sendall(f"{{service}} {{source}}".encode() + b"\\0")
        def pump_in():
            while data := os.read(0, 65536):
                s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        threading.Thread(target=pump_in, daemon=True).start()
        while data := s.recv(65536):
            os.write(1, data)
        """))
    path.chmod(0o755)
    return path
