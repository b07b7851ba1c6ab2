# SPDX-License-Identifier: GPL-2.0-or-later
"""The one adapter between qbackup and Qubes OS.

Everything qbackup learns about qubes (classes, properties, features, tags,
volumes and where to read them) and the qrexec call to the backup qube go
through a `Backend`. On a real system that is `QubesAdminBackend`, the only
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
    """One volume of a qube; `path` is the readable committed image or device,
    or None when qbackup cannot read this pool's volumes."""
    name: str
    pool: str
    size: int
    path: str | None
    rw: bool
    save_on_stop: bool
    snap_on_start: bool
    revisions_to_keep: int

    def settings(self) -> dict[str, Any]:
        """The volume's configuration as recorded in a snapshot (no path:
        where it lives is a property of this machine, not of the qube)."""
        return {"pool": self.pool, "size": self.size, "rw": self.rw,
                "save_on_stop": self.save_on_stop,
                "snap_on_start": self.snap_on_start,
                "revisions_to_keep": self.revisions_to_keep}


@dataclass(frozen=True)
class QubeInfo:
    """A qube's settings as they are to be restored, and its volumes."""
    name: str
    klass: str
    properties: dict[str, Any] = field(default_factory=dict)
    features: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    volumes: dict[str, VolumeInfo] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        """The qube's settings as recorded in a snapshot's manifest; the
        configuration of every volume, backed up or not (a volatile
        volume's size, say), is under `volume_config`."""
        return {"class": self.klass, "properties": dict(self.properties),
                "features": dict(self.features), "tags": list(self.tags),
                "volume_config": {n: v.settings() for n, v in sorted(self.volumes.items())}}


class Backend(Protocol):
    """What qbackup needs from dom0: the qube inventory and a qrexec call."""

    def list_qubes(self) -> list[QubeInfo]: ...

    def connect(self, backup_vm: str, repo: str) -> Transport: ...


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


def _plain(value: Any) -> Any:
    """A property value as plain data: qubes and labels become their names."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


class QubesAdminBackend:
    """The backend for a real dom0, through qubesadmin (Admin API).

    Untested here (no Qubes): see docs/CLI.md, "What is not tested".
    """

    def __init__(self) -> None:
        try:
            import qubesadmin  # only present in a Qubes dom0
        except ImportError:
            raise QbackupError("qubesadmin is not installed: qbackup runs in a Qubes "
                               "dom0") from None
        import qubesadmin.exc
        self._app = qubesadmin.Qubes()
        self._error = qubesadmin.exc.QubesException

    def list_qubes(self) -> list[QubeInfo]:
        try:
            return self._list_qubes()
        except self._error as e:
            raise QbackupError(f"reading the qubes failed: {e}") from None

    def _list_qubes(self) -> list[QubeInfo]:
        qubes = []
        for vm in self._app.domains:
            if vm.klass == "AdminVM":  # dom0 itself: no volumes to read this way
                continue
            properties = {
                name: _plain(getattr(vm, name)) for name in vm.property_list()
                if name not in DERIVED_PROPERTIES and not vm.property_is_default(name)}
            volumes = {name: self._volume_info(name, vol)
                       for name, vol in vm.volumes.items()}
            qubes.append(QubeInfo(
                name=vm.name, klass=vm.klass, properties=properties,
                features=dict(vm.features.items()), tags=sorted(vm.tags),
                volumes=volumes))
        return sorted(qubes, key=lambda q: q.name)

    def _volume_info(self, name: str, vol: Any) -> VolumeInfo:
        return VolumeInfo(
            name=name, pool=vol.pool, size=vol.size,
            path=self._volume_path(vol.pool, vol.vid), rw=vol.rw,
            save_on_stop=vol.save_on_stop, snap_on_start=vol.snap_on_start,
            revisions_to_keep=vol.revisions_to_keep)

    def _volume_path(self, pool_name: str, vid: str) -> str | None:
        """The committed image of a volume (QUBES_FACTS "Volumes"): for file
        pools `{dir_path}/{vid}.img` (vid is `appvms/NAME/VOL` or
        `vm-templates/NAME/VOL`; never the `-dirty` image a running qube
        writes), for lvm_thin `/dev/{vid}`; None for other drivers."""
        pool = self._app.pools[pool_name]
        if pool.driver in ("file-reflink", "file"):
            return os.path.join(pool.config["dir_path"], vid + ".img")
        if pool.driver == "lvm_thin":
            return "/dev/" + vid
        return None

    def connect(self, backup_vm: str, repo: str) -> Transport:
        service = f"{SERVICE}+{check_repo_name(repo)}"
        try:
            if backup_vm not in self._app.domains:
                raise QbackupError(f"backup qube {backup_vm!r} does not exist")
            # Starts the backup qube if needed. filter_esc must stay off (it
            # would rewrite binary data); bufsize=0 so reads return what has
            # arrived.
            proc = self._app.domains[backup_vm].run_service(
                service, filter_esc=False, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=None, bufsize=0)
        except self._error as e:
            raise QbackupError(f"calling {service} in {backup_vm} failed: {e}") from None
        return ProcessTransport(proc)
