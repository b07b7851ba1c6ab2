# SPDX-License-Identifier: GPL-2.0-or-later
"""The one adapter between qbackup and Qubes OS.

Everything qbackup learns about qubes (classes, properties, features, tags,
volumes and where to read them, firewall rules, device assignments), the
qrexec call to the backup qube, and every change restore makes (creating
qubes, setting their settings, importing volumes) go through a `Backend`. On a real system that is `QubesAdminBackend`, the only
code in qbackup that imports `qubesadmin`; in development and tests the
simulated dom0 stands in for it: it hands its own backend to `qbackup.cli.run`
from outside this package, which never imports it.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from typing import Any, Protocol

from qbackup.errors import QbackupError
from qbackup.transport import SERVICE, ProcessTransport, Transport, check_repo_name

# Volume names that never hold state worth keeping (QUBES_FACTS "Volumes").
_NEVER_BACKED_UP = frozenset({"volatile", "kernel"})
# The volumes of every qube in R4.2 (qubes/vm/{appvm,templatevm,standalonevm,
# dispvm}.py define root, private, volatile and kernel, and no Admin API call
# adds one), but `kernel`, whose content is the `kernel` property
# (linux-kernel pool). The adapter asks for these by name rather than
# listing them: one admin.vm.volume.List per qube saved (docs/QUBES.md).
QUBE_VOLUMES = ("private", "root", "volatile")
# Classes whose root volume belongs to the qube itself (not to a template).
_OWN_ROOT_CLASSES = frozenset({"TemplateVM", "StandaloneVM"})

# Properties that are derived or machine-specific and must not be restored
# as-is (QUBES_FACTS "Qube settings"), plus read-only ones computed by qubesd.
DERIVED_PROPERTIES = frozenset({
    "name", "klass", "qid", "uuid", "xid", "dispid", "start_time",
    "ip", "ip6", "gateway", "gateway6", "dns", "visible_ip", "visible_ip6",
    "visible_gateway", "visible_gateway6", "visible_netmask",
    "installed_by_rpm", "backup_timestamp", "stubdom_xid", "stubdom_uuid",
    "icon", "updateable",
})


@dataclass(frozen=True)
class VolumeInfo:
    """One volume of a qube. `path` is the committed image or device qbackup
    copies (docs/CHANGES.md); when qbackup cannot read this volume
    consistently, `path` is None and `unreadable` says why, in words fit for
    the user.

    Where it lives, for the volume sources: `driver` is its pool's driver
    (`file-reflink`, `lvm_thin`, `file`; "" for a plain file or block device,
    as in the simulation), `vid` its id in the pool (lvm_thin: `VG/LV`),
    `thin_pool` the lvm_thin pool's thin pool LV, and `live_path` what the
    running qube writes (file-reflink: `-dirty.img`; lvm_thin: the `-snap`
    LV), None when it is halted or there is none."""
    name: str
    pool: str
    size: int
    path: str | None
    rw: bool
    save_on_stop: bool
    snap_on_start: bool
    revisions_to_keep: int
    unreadable: str = ""
    usage: int = 0    # bytes the volume holds (allocated), as Qubes reports it
    ephemeral: bool = False
    driver: str = ""
    vid: str = ""
    thin_pool: str = ""
    live_path: str | None = None

    def settings(self) -> dict[str, Any]:
        """The volume's configuration as recorded in a snapshot (no path:
        where it lives is a property of this machine, not of the qube)."""
        return {"pool": self.pool, "size": self.size, "rw": self.rw,
                "save_on_stop": self.save_on_stop,
                "snap_on_start": self.snap_on_start,
                "revisions_to_keep": self.revisions_to_keep,
                "ephemeral": self.ephemeral}


@dataclass(frozen=True)
class QubeInfo:
    """A qube's settings as they are to be restored, its volumes, and
    whether it runs now (state, not a setting: not in `settings()`)."""
    name: str
    klass: str
    properties: dict[str, Any] = field(default_factory=dict)
    features: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    volumes: dict[str, VolumeInfo] = field(default_factory=dict)
    running: bool = False

    def settings(self) -> dict[str, Any]:
        """The qube's settings as recorded in a snapshot's manifest; the
        configuration of every volume, backed up or not (a volatile
        volume's size, say), is under `volume_config`."""
        return {"class": self.klass, "properties": dict(self.properties),
                "features": dict(self.features), "tags": list(self.tags),
                "volume_config": {n: v.settings() for n, v in sorted(self.volumes.items())}}


# The properties that name the qubes a qube depends on (manifest.DEPENDENCIES).
DEPENDENCIES = ("template", "netvm", "default_dispvm", "audiovm", "guivm", "management_dispvm")


@dataclass(frozen=True)
class Device:
    """A device assignment as R4.2 lists it (admin.vm.device.CLASS.List):
    `persistent` ones are in qubes.xml and attached at every start; the
    others are attached to the running qube only."""
    devclass: str
    backend: str
    ident: str
    options: dict[str, str] = field(default_factory=dict)
    persistent: bool = True

    def settings(self) -> dict[str, Any]:
        return {"class": self.devclass, "backend": self.backend, "ident": self.ident,
                "options": dict(self.options), "persistent": self.persistent}


@dataclass(frozen=True)
class QubeDetails:
    """The settings read only for the qubes a backup includes: firewall
    rules (admin.vm.firewall.Get lines, in order), device assignments, and
    the qubes it depends on (the value of each of DEPENDENCIES it has,
    default or not; `properties` says which are set)."""
    firewall: list[str]
    devices: list[Device]
    dependencies: dict[str, str | None]

    def settings(self) -> dict[str, Any]:
        return {"firewall": list(self.firewall),
                "devices": [d.settings() for d in self.devices],
                "dependencies": dict(sorted(self.dependencies.items()))}


def parse_device_list(devclass: str, text: str) -> list[Device]:
    """admin.vm.device.CLASS.List: `BACKEND+IDENT [OPT=VALUE ...] persistent=yes|no` lines."""
    devices = []
    for line in text.splitlines():
        target, *options = line.split(" ")
        backend, _, ident = target.partition("+")
        opts = dict(o.split("=", 1) for o in options if "=" in o)
        persistent = opts.pop("persistent", "no") == "yes"
        devices.append(Device(devclass, backend, ident, opts, persistent))
    return devices


@dataclass(frozen=True)
class SystemInfo:
    """What restore needs to know of the system before it changes anything:
    every qube (dom0 included, class AdminVM) and which run, the storage
    pools and labels, and the system's defaults (`default_template`,
    `default_netvm`, `default_dispvm`, `management_dispvm`, `default_pool`,
    ...: global property → value, None if unset)."""
    qubes: dict[str, str]
    running: frozenset[str]
    pools: tuple[str, ...]
    labels: tuple[str, ...]
    defaults: dict[str, str | None]


# The tag qubesd's backup_restore extension refuses to start a qube with
# (qubes/ext/backup_restore.py): restore puts it on every qube it creates
# and takes it off once that qube is complete.
RESTORE_IN_PROGRESS = "backup-restore-in-progress"
# What `browse` runs in its qube (qubes.VMShell, as the default user): the
# first file manager found, on the home directory; exit 3 if there is none.
FILE_MANAGER_COMMAND = (
    b'FM=$(command -v nautilus thunar dolphin nemo caja pcmanfm | head -n 1); '
    b'[ -n "$FM" ] || exit 3; setsid "$FM" "$HOME" </dev/null >/dev/null 2>&1 & exit 0\n')


class Backend(Protocol):
    """What qbackup needs from dom0: the qube inventory, a qube's further
    settings, the qrexec call, and (restore) the changes below. Every
    method raises QbackupError with one line on failure; values are passed
    to qubesd, which checks them."""

    def list_qubes(self) -> list[QubeInfo]: ...

    def qube_details(self, name: str) -> QubeDetails: ...

    def connect(self, backup_vm: str, repo: str) -> Transport: ...

    # -- restore

    def system(self) -> SystemInfo: ...

    def create_qube(self, name: str, klass: str, label: str, template: str | None,
                    pools: dict[str, str]) -> None:
        """A new qube (pools: volume → pool; empty: the system's defaults)."""

    def set_property(self, name: str, prop: str, value: Any) -> None: ...

    def set_feature(self, name: str, feature: str, value: str) -> None: ...

    def add_tag(self, name: str, tag: str) -> None: ...

    def remove_tag(self, name: str, tag: str) -> None: ...

    def qube_tags(self, name: str) -> list[str]: ...

    def set_firewall(self, name: str, rules: list[str]) -> None: ...

    def attach_device(self, name: str, device: Device) -> None: ...

    def volume_config(self, name: str) -> dict[str, VolumeInfo]: ...

    def set_volume(self, name: str, volume: str, key: str, value: Any) -> None:
        """key: revisions_to_keep, rw or ephemeral."""

    def resize_volume(self, name: str, volume: str, size: int) -> None: ...

    def import_volume(self, name: str, volume: str, stream: Any, size: int) -> None:
        """Replace the volume's data with exactly `size` bytes read from
        `stream` (read, close): committed only if exactly that many come."""

    def remove_qube(self, name: str) -> None: ...

    def kill_qube(self, name: str) -> None: ...

    def run_file_manager(self, name: str) -> None:
        """Start the qube if needed and open a file manager in it."""


def volumes_to_backup(qube: QubeInfo) -> list[VolumeInfo]:
    """The volumes of `qube` that hold its state: `private` of every qube and
    `root` of TemplateVMs and StandaloneVMs; never `volatile` or `kernel`, and
    never a volume whose content is discarded at shutdown (no save_on_stop,
    e.g. a disposable's private volume)."""
    wanted = {"private"} | ({"root"} if qube.klass in _OWN_ROOT_CLASSES else set())
    return [vol for name, vol in sorted(qube.volumes.items())
            if name in wanted and name not in _NEVER_BACKED_UP and vol.save_on_stop]


def restorable_properties(properties: dict[str, Any]) -> dict[str, Any]:
    """`properties` without the derived ones (DERIVED_PROPERTIES)."""
    return {k: v for k, v in sorted(properties.items()) if k not in DERIVED_PROPERTIES}


def managed_tag(tag: str) -> bool:
    """Whether qubesd sets `tag` itself from a property (its gui and audio
    extensions add `guivm-NAME` / `audiovm-NAME` for the guivm / audiovm
    property): not a user setting, recreated by qubesd on restore.
    (`created-by-NAME` is kept: policies use it, and qubesd would not put
    back the original creator.)"""
    return tag.startswith(("guivm-", "audiovm-"))


def _plain(value: Any) -> Any:
    """A property value as plain data: qubes and labels become their names."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def parse_info(text: str) -> dict[str, str]:
    """A `key=value` per line answer (admin.vm.volume.Info, admin.pool.Info)."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _flag(info: dict[str, str], key: str) -> bool:
    return info.get(key) == "True"


def volume_path(driver: str, pool: dict[str, str], info: dict[str, str],
                running: bool) -> tuple[str | None, str]:
    """Where the committed image of a volume is, from its pool's driver and
    configuration and its admin.vm.volume.Info (QUBES_FACTS "Volumes"), or
    (None, why qbackup cannot read it consistently).

    file-reflink: `{dir_path}/{vid}.img`, never the `-dirty.img` a running
    qube writes (Info's path); lvm_thin: `/dev/{vid}`, refused when qubesd
    reports a revision instead (the committed LV is missing); the legacy
    file driver: `{dir_path}/{vid}.img`, refused while the qube runs, since
    the qube then writes that very image."""
    vid = info.get("vid", "")
    if driver in ("file-reflink", "file"):
        root = os.path.normpath(pool.get("dir_path", ""))
        path = os.path.normpath(os.path.join(root, vid + ".img"))
        if not vid or not os.path.isabs(root) or not path.startswith(root + os.sep):
            return None, f"volume id {vid!r} is not inside pool directory {root!r}"
        if driver == "file" and running:
            return None, ("it is in a pool of the legacy 'file' driver, whose images a "
                          "running qube writes directly: shut the qube down first")
        return path, ""
    if driver == "lvm_thin":
        expected = "/dev/mapper/" + vid.replace("-", "--").replace("/", "-")
        if info.get("path") != expected:
            return None, (f"its logical volume {vid} is missing (qubesd points at "
                          f"{info.get('path') or 'nothing'})")
        return "/dev/" + vid, ""
    return None, f"its pool uses the {driver!r} driver, which qbackup cannot read"


def live_path(driver: str, pool: dict[str, str], info: dict[str, str], running: bool) -> str | None:
    """What a running qube writes for a volume that keeps its changes (the
    source of a `--live` copy): file-reflink `{dir_path}/{vid}-dirty.img`,
    lvm_thin `/dev/{vid}-snap`; None when halted, for other drivers, or for
    a volume whose changes are discarded."""
    vid = info.get("vid", "")
    if not running or not vid or not _flag(info, "save_on_stop"):
        return None
    if driver == "file-reflink":
        return os.path.join(os.path.normpath(pool.get("dir_path", "")), vid + "-dirty.img")
    if driver == "lvm_thin":
        return "/dev/" + vid + "-snap"
    return None


class QubesAdminBackend:
    """The backend for a real dom0, through qubesadmin (Admin API).

    Tested against the real R4.2 qubesd handlers (tests/qubes_r42.py). Every
    call it makes, per qube: one admin.vm.property.GetAll (cache_enabled),
    admin.vm.feature.List plus one admin.vm.feature.Get per feature,
    admin.vm.tag.List, and one admin.vm.volume.Info for each of
    QUBE_VOLUMES; once per run admin.vm.List (which also gives every qube's
    power state) and one admin.pool.Info per pool in use. See docs/QUBES.md.
    """

    def __init__(self, app: Any = None) -> None:
        try:
            import qubesadmin  # only present in a Qubes dom0
            import qubesadmin.exc
        except ImportError:
            raise QbackupError("qubesadmin is not installed: qbackup runs in a Qubes "
                               "dom0") from None
        self._app = qubesadmin.Qubes() if app is None else app
        # One admin.vm.property.GetAll per qube instead of one Get per
        # property, and power states from the admin.vm.List answer.
        self._app.cache_enabled = True
        self._error = qubesadmin.exc.QubesException
        self._pools: dict[str, dict[str, str]] = {}
        self._device_classes: list[str] | None = None

    def list_qubes(self) -> list[QubeInfo]:
        try:
            return sorted((self._qube(vm) for vm in self._app.domains
                           if vm.klass != "AdminVM"),  # dom0: nothing to read this way
                          key=lambda q: q.name)
        except self._error as e:
            raise QbackupError(f"reading the qubes failed: {e}") from None

    def _qube(self, vm: Any) -> QubeInfo:
        # With cache_enabled the first property read fetches them all at once
        # (admin.vm.property.GetAll), which also gives property_list() its
        # names without an admin.vm.property.List.
        vm.property_is_default("label")
        properties = {name: _plain(getattr(vm, name)) for name in vm.property_list()
                      if name not in DERIVED_PROPERTIES and not vm.property_is_default(name)}
        running = vm.get_power_state() != "Halted"
        volumes = {}
        for name in QUBE_VOLUMES:
            info = parse_info(self._app.qubesd_call(
                vm.name, "admin.vm.volume.Info", name).decode("ascii"))
            volumes[name] = self._volume(name, info, running)
        return QubeInfo(name=vm.name, klass=vm.klass, properties=properties,
                        features=dict(vm.features.items()),
                        tags=sorted(t for t in vm.tags if not managed_tag(t)),
                        volumes=volumes, running=running)

    def _volume(self, name: str, info: dict[str, str], running: bool) -> VolumeInfo:
        pool_name = info["pool"]
        if pool_name not in self._pools:
            self._pools[pool_name] = parse_info(self._app.qubesd_call(
                "dom0", "admin.pool.Info", pool_name).decode("ascii"))
        pool = self._pools[pool_name]
        driver = pool.get("driver", "")
        path, unreadable = volume_path(driver, pool, info, running)
        return VolumeInfo(
            name=name, pool=pool_name, size=int(info["size"]), path=path,
            rw=_flag(info, "rw"), save_on_stop=_flag(info, "save_on_stop"),
            snap_on_start=_flag(info, "snap_on_start"),
            revisions_to_keep=int(info["revisions_to_keep"]), unreadable=unreadable,
            usage=int(info.get("usage") or 0), ephemeral=_flag(info, "ephemeral"),
            driver=driver, vid=info.get("vid", ""),
            thin_pool=pool.get("thin_pool", "") if driver == "lvm_thin" else "",
            live_path=live_path(driver, pool, info, running) if path else None)

    def qube_details(self, name: str) -> QubeDetails:
        """One admin.vm.firewall.Get and one admin.vm.device.CLASS.List per
        device class (admin.deviceclass.List once per run); the dependencies
        come from the properties list_qubes already fetched (GetAll)."""
        try:
            if name not in self._app.domains:
                raise QbackupError(f"reading the settings of {name} failed: no such qube")
            vm = self._app.domains[name]
            names = vm.property_list()
            dependencies = {p: _plain(getattr(vm, p)) for p in DEPENDENCIES if p in names}
            firewall = self._app.qubesd_call(name, "admin.vm.firewall.Get").decode(
                "ascii").splitlines()
            if self._device_classes is None:
                self._device_classes = self._app.qubesd_call(
                    "dom0", "admin.deviceclass.List").decode("ascii").split()
            devices = []
            for devclass in self._device_classes:
                devices += parse_device_list(devclass, self._app.qubesd_call(
                    name, f"admin.vm.device.{devclass}.List").decode("ascii"))
        except self._error as e:
            raise QbackupError(f"reading the settings of {name} failed: {e}") from None
        return QubeDetails(firewall, devices, dependencies)

    # -- restore: every change through one Admin API call, qubesd checks it

    def _call(self, dest: str, method: str, arg: str | None = None,
              payload: bytes | None = None, *, what: str) -> str:
        try:
            return self._app.qubesd_call(dest, method, arg, payload).decode("ascii")
        except self._error as e:
            raise QbackupError(f"{what}: {e}") from None

    def system(self) -> SystemInfo:
        """admin.vm.List, admin.property.GetAll, admin.pool.List and
        admin.label.List: four calls."""
        what = "reading the system's qubes and settings failed"
        qubes, running = {}, set()
        for line in self._call("dom0", "admin.vm.List", what=what).splitlines():
            name, *fields = line.split(" ")
            info = dict(f.split("=", 1) for f in fields if "=" in f)
            qubes[name] = info.get("class", "")
            if info.get("state", "Halted") != "Halted":
                running.add(name)
        defaults: dict[str, str | None] = {}
        for line in self._call("dom0", "admin.property.GetAll", what=what).splitlines():
            name, _default, kind, value = (line.split(" ", 3) + [""])[:4]
            defaults[name] = None if kind == "type=vm" and not value else value
        pools = tuple(self._call("dom0", "admin.pool.List", what=what).split())
        labels = tuple(self._call("dom0", "admin.label.List", what=what).split())
        return SystemInfo(qubes, frozenset(running), pools, labels, defaults)

    def create_qube(self, name: str, klass: str, label: str, template: str | None,
                    pools: dict[str, str]) -> None:
        payload = f"name={name} label={label}" + "".join(
            f" pool:{vol}={pool}" for vol, pool in sorted(pools.items()))
        method = ("admin.vm.CreateInPool." if pools else "admin.vm.Create.") + klass
        self._call("dom0", method, template, payload.encode(), what=f"creating {name} failed")
        self._app.domains.clear_cache()

    def set_property(self, name: str, prop: str, value: Any) -> None:
        payload = "" if value is None else str(value)  # True/False as qubesadmin sends them
        self._call(name, "admin.vm.property.Set", prop, payload.encode(),
                   what=f"{name}: setting {prop} failed")

    def set_feature(self, name: str, feature: str, value: str) -> None:
        self._call(name, "admin.vm.feature.Set", feature, value.encode(),
                   what=f"{name}: setting feature {feature} failed")

    def add_tag(self, name: str, tag: str) -> None:
        self._call(name, "admin.vm.tag.Set", tag, what=f"{name}: adding tag {tag} failed")

    def remove_tag(self, name: str, tag: str) -> None:
        self._call(name, "admin.vm.tag.Remove", tag, what=f"{name}: removing tag {tag} failed")

    def qube_tags(self, name: str) -> list[str]:
        return self._call(name, "admin.vm.tag.List", what=f"{name}: listing tags failed").split()

    def set_firewall(self, name: str, rules: list[str]) -> None:
        self._call(name, "admin.vm.firewall.Set", None,
                   "".join(f"{rule}\n" for rule in rules).encode(),
                   what=f"{name}: setting the firewall failed")

    def attach_device(self, name: str, device: Device) -> None:
        options = [f"{k}={v}" for k, v in device.options.items()]
        options.append(f"persistent={device.persistent}")
        self._call(name, f"admin.vm.device.{device.devclass}.Attach",
                   f"{device.backend}+{device.ident}", " ".join(options).encode(),
                   what=f"{name}: attaching {device.devclass} device "
                   f"{device.backend}:{device.ident} failed")

    def volume_config(self, name: str) -> dict[str, VolumeInfo]:
        return {vol: self._volume(vol, parse_info(self._call(
                    name, "admin.vm.volume.Info", vol, what=f"{name}: reading volume {vol} failed")),
                    False)
                for vol in QUBE_VOLUMES}

    def set_volume(self, name: str, volume: str, key: str, value: Any) -> None:
        self._call(name, f"admin.vm.volume.Set.{key}", volume, str(value).encode(),
                   what=f"{name}: setting {key} of volume {volume} failed")

    def resize_volume(self, name: str, volume: str, size: int) -> None:
        self._call(name, "admin.vm.volume.Resize", volume, str(size).encode(),
                   what=f"{name}: resizing volume {volume} failed")

    def import_volume(self, name: str, volume: str, stream: Any, size: int) -> None:
        """admin.vm.volume.ImportWithSize, as qubesadmin's
        import_data_with_size: qubesadmin runs /etc/qubes-rpc's import script,
        which asks qubesd for an import target (ImportBegin), writes exactly
        `size` bytes of `stream` there with dd, and commits it (ImportEnd)
        only if exactly that many came; otherwise qubesd discards it."""
        try:
            self._app.qubesd_call(name, "admin.vm.volume.ImportWithSize", volume,
                                  payload=f"{size}\n".encode(), payload_stream=stream)
        except self._error as e:
            raise QbackupError(f"{name}: importing volume {volume} failed: {e}") from None

    def remove_qube(self, name: str) -> None:
        self._call(name, "admin.vm.Remove", what=f"removing {name} failed")
        self._app.domains.clear_cache()

    def kill_qube(self, name: str) -> None:
        self._call(name, "admin.vm.Kill", what=f"stopping {name} failed")

    def run_file_manager(self, name: str) -> None:
        try:
            proc = self._app.run_service(name, "qubes.VMShell", stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        except self._error as e:
            raise QbackupError(f"{name} failed to start: {e}") from None
        proc.communicate(FILE_MANAGER_COMMAND)
        if proc.returncode == 3:
            raise QbackupError(f"{name} has no file manager (nautilus, thunar, dolphin, nemo, "
                               f"caja, pcmanfm): open a terminal with qvm-run {name} xterm")
        if proc.returncode != 0:
            raise QbackupError(f"starting a file manager in {name} failed (qrexec exit code "
                               f"{proc.returncode})")

    def connect(self, backup_vm: str, repo: str) -> Transport:
        service = f"{SERVICE}+{check_repo_name(repo)}"
        try:
            if backup_vm not in self._app.domains:
                raise QbackupError(f"backup qube {backup_vm!r} does not exist")
            vm = self._app.domains[backup_vm]
            if vm.klass == "AdminVM":
                raise QbackupError("the backup qube cannot be dom0")
            # Starts the backup qube first if it is not running (admin.vm.Start,
            # the only Admin API call run_service makes), then runs
            # qrexec-client. As root: qrexec-agent then connects to the socket
            # itself, so no process running as `user` in the backup qube
            # (qrexec-fork-server included) can reach it and pose as dom0.
            # filter_esc stays off (it would rewrite binary data); bufsize=0 so
            # reads return what has arrived; stderr discarded, never shown.
            proc = vm.run_service(service, user="root", filter_esc=False,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, bufsize=0)
        except self._error as e:
            raise QbackupError(f"backup qube {backup_vm} failed to start: {e}") from None
        return ProcessTransport(proc, explain=lambda code: qrexec_exit_reason(
            code, backup_vm))


def qrexec_exit_reason(code: int, backup_vm: str) -> str | None:
    """What qrexec-client's exit `code` means for the call to qubes.BackupChunk
    in `backup_vm` (QUBES_FACTS "qrexec socket services"), None for success."""
    if code == 0:
        return None
    if code == 125:
        return (f"{backup_vm} has the {SERVICE} service but nothing answers on its socket: "
                f"is qbackupd running there? (qvm-service {backup_vm} qbackup-storage on, "
                f"then restart {backup_vm})")
    if code == 127:
        return (f"{backup_vm} has no {SERVICE} service: install the qbackup-vm package in "
                f"its template, run qvm-service {backup_vm} qbackup-storage on, and "
                f"restart {backup_vm}")
    return f"the qrexec call to {backup_vm} failed (qrexec-client exit code {code})"
