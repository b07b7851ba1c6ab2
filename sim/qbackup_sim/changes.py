# SPDX-License-Identifier: GPL-2.0-or-later
"""The changes restore makes, on the simulated dom0: what qubesd R4.2 does
for each Admin API call `qbackup.qubes.Backend` makes, on the sim's
inventory and image files (checked against qubesd by
tests/dom0/test_backend_contract.py; where they differ, qubesd is right).

Creating a qube makes its volumes as qubesd makes them in a file-reflink
pool (sparse images, qubesd's default sizes, a snapshot volume's size and
pool from its origin). Importing a volume is admin.vm.volume.ImportWithSize
as its R4.2 script does it: the data goes to `VOL-import.img`, written
sparse (all-zero 128 KiB blocks skipped, as `dd conv=sparse`), and becomes
the volume only if exactly the announced number of bytes came; otherwise the
import file is removed and the volume is unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from qbackup.qubes import (DEPENDENCIES, FILE_MANAGER_COMMAND, QUBE_VOLUMES, RESTORE_IN_PROGRESS,
                           Device, SystemInfo, VolumeInfo)
from qbackup_sim.inventory import (SimError, image_path, save_inventory, system_settings,
                                   volume_defaults)

LABELS = ("red", "orange", "yellow", "green", "gray", "blue", "purple", "black")
DEFAULT_SIZES = {"root": 10 << 30, "private": 2 << 30, "volatile": 10 << 30}
IMPORT_BLOCK = 128 << 10  # the import script's dd bs=128K
QREXEC_LOG = "qrexec.log"  # services called in the sim's qubes (browse's file manager)
_PROPERTY = re.compile(r"[a-z][a-z0-9_]{0,63}")
_TOP_PROPERTIES = ("label", "template", "netvm")


class SimChanges:
    """Backend methods for restore, mixed into SimBackend."""

    directory: Path
    inventory: dict[str, Any]

    # -- helpers

    def _save(self) -> None:
        save_inventory(self.directory, self.inventory)

    def _qube(self, name: str, what: str) -> dict[str, Any]:
        try:
            return self.inventory["qubes"][name]
        except KeyError:
            raise SimError(f"{what}: No such domain: {name!r}") from None

    def _explicit(self, name: str) -> dict[str, Any]:
        qube = self.inventory["qubes"][name]
        props = dict(qube.get("properties", {}))
        props.update({k: qube[k] for k in _TOP_PROPERTIES if k in qube})
        return props

    def _halted(self, name: str, what: str) -> dict[str, Any]:
        qube = self._qube(name, what)
        if qube.get("running", False):
            raise SimError(f"{what}: Domain is not powered off: {name!r}")
        return qube

    # -- reading

    def system(self) -> SystemInfo:
        qubes = {"dom0": "AdminVM", **{n: q["class"] for n, q in self.inventory["qubes"].items()}}
        running = {"dom0"} | {n for n, q in self.inventory["qubes"].items() if q.get("running")}
        settings = system_settings(self.inventory)
        defaults = {k: v for k, v in settings.items() if k != "pools"}
        return SystemInfo(qubes, frozenset(running), tuple(settings["pools"]), LABELS, defaults)

    def qube_tags(self, name: str) -> list[str]:
        return sorted(self._qube(name, f"{name}: listing tags failed").get("tags", []))

    def volume_config(self, name: str) -> dict[str, VolumeInfo]:
        qube = self._qube(name, f"{name}: reading its volumes failed")
        return {vol: VolumeInfo(name=vol, pool=s["pool"], size=s["size"],
                                path=str(self.directory / s["path"]), rw=s["rw"],
                                save_on_stop=s["save_on_stop"], snap_on_start=s["snap_on_start"],
                                revisions_to_keep=s["revisions_to_keep"],
                                ephemeral=s.get("ephemeral", False))
                for vol, s in sorted(qube["volumes"].items()) if vol in QUBE_VOLUMES}

    # -- creating and removing qubes

    def create_qube(self, name: str, klass: str, label: str, template: str | None,
                    pools: dict[str, str]) -> None:
        what = f"creating {name} failed"
        qubes = self.inventory["qubes"]
        if name in qubes or name == "dom0":
            raise SimError(f"{what}: VM {name} already exists")
        if klass not in ("AppVM", "TemplateVM", "StandaloneVM", "DispVM"):
            raise SimError(f"{what}: no such class {klass!r}")
        if label not in LABELS:
            raise SimError(f"{what}: Label does not exist: {label!r}")
        origin = None
        if klass in ("AppVM", "DispVM"):
            if template is None:
                raise SimError(f"{what}: {klass} needs a template")
            origin = self._qube(template, what)
            wanted = "TemplateVM" if klass == "AppVM" else "AppVM"
            if origin["class"] != wanted or (klass == "DispVM" and not origin.get(
                    "properties", {}).get("template_for_dispvms")):
                raise SimError(f"{what}: {template} cannot be the template of a {klass}")
        elif template is not None:
            raise SimError(f"{what}: {klass} cannot be based on template")
        system = system_settings(self.inventory)
        volumes = {}
        for vol in QUBE_VOLUMES:
            settings = volume_defaults(klass, vol)
            snapshot = settings["snap_on_start"]
            if vol in pools and pools[vol] not in system["pools"]:
                raise SimError(f"{what}: Pool {pools[vol]} does not exist")
            if snapshot and vol in pools:
                raise SimError(f"{what}: Snapshot volume {vol} must be in the same pool as its "
                               f"origin")
            if snapshot:
                source = origin["volumes"][vol]
                settings.update(pool=source["pool"], size=source["size"])
            else:
                settings.update(pool=pools.get(vol, system["default_pool"]),
                                size=DEFAULT_SIZES[vol])
            settings["path"] = image_path(self.inventory, name, klass, vol, settings["pool"])
            volumes[vol] = settings
        entry: dict[str, Any] = {"class": klass, "label": label,
                                 "tags": ["created-by-dom0"], "volumes": volumes}
        if template is not None:
            entry["template"] = template
        for settings in volumes.values():
            image = self.directory / settings["path"]
            image.parent.mkdir(parents=True, exist_ok=True)
            with open(image, "wb") as f:
                f.truncate(settings["size"])
        qubes[name] = entry
        self._save()

    def remove_qube(self, name: str) -> None:
        what = f"removing {name} failed"
        self._halted(name, what)
        for other in self.inventory["qubes"]:
            explicit = self._explicit(other)
            uses = [p for p in DEPENDENCIES if explicit.get(p) == name and other != name]
            uses += [f"device {d['ident']}" for d in self.inventory["qubes"][other].get(
                "devices", []) if d["backend"] == name]
            if uses:
                raise SimError(f"{what}: Domain is in use: {name!r} ({other}: {uses[0]})")
        if name in system_settings(self.inventory).values():
            raise SimError(f"{what}: Domain is in use: {name!r} (a system default)")
        volumes = self.inventory["qubes"].pop(name)["volumes"]
        self._save()
        for settings in volumes.values():  # as qubesd: its images, then their directory if empty
            image = self.directory / settings["path"]
            image.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                image.parent.rmdir()
        shutil.rmtree(self.directory / "volumes" / name, ignore_errors=True)

    def kill_qube(self, name: str) -> None:
        qube = self._qube(name, f"stopping {name} failed")
        if not qube.get("running", False):
            raise SimError(f"stopping {name} failed: Domain is powered off: {name!r}")
        qube["running"] = False
        self._save()

    def run_file_manager(self, name: str) -> None:
        qube = self._qube(name, f"{name} failed to start")
        if not qube.get("running", False):
            if RESTORE_IN_PROGRESS in qube.get("tags", []):
                raise SimError(f"{name} failed to start: Restore of this domain in progress, "
                               "cannot start")
            qube["running"] = True
            self._save()
        with open(self.directory / QREXEC_LOG, "a") as log:
            log.write(json.dumps({"qube": name, "service": "qubes.VMShell",
                                  "stdin": FILE_MANAGER_COMMAND.decode()}) + "\n")

    # -- settings

    def set_property(self, name: str, prop: str, value: Any) -> None:
        what = f"{name}: setting {prop} failed"
        qube = self._qube(name, what)
        if not _PROPERTY.fullmatch(prop):
            raise SimError(f"{what}: Invalid property name")
        if prop in DEPENDENCIES and value is not None:
            target = "dom0" if value == "dom0" else None
            if target is None:
                other = self._qube(value, what)
                if prop == "netvm" and (value == name or not other.get(
                        "properties", {}).get("provides_network")):
                    raise SimError(f"{what}: VM {value} does not provide network")
        if prop == "label" and value not in LABELS:
            raise SimError(f"{what}: Label does not exist: {value!r}")
        if prop in _TOP_PROPERTIES:
            qube[prop] = value
        else:
            qube.setdefault("properties", {})[prop] = value
        self._save()

    def set_feature(self, name: str, feature: str, value: str) -> None:
        self._qube(name, f"{name}: setting feature {feature} failed").setdefault(
            "features", {})[feature] = value
        self._save()

    def add_tag(self, name: str, tag: str) -> None:
        qube = self._qube(name, f"{name}: adding tag {tag} failed")
        qube["tags"] = sorted(set(qube.get("tags", [])) | {tag})
        self._save()

    def remove_tag(self, name: str, tag: str) -> None:
        qube = self._qube(name, f"{name}: removing tag {tag} failed")
        if tag not in qube.get("tags", []):
            raise SimError(f"{name}: removing tag {tag} failed: Tag not found: {tag!r}")
        qube["tags"].remove(tag)
        self._save()

    def set_firewall(self, name: str, rules: list[str]) -> None:
        self._qube(name, f"{name}: setting the firewall failed")["firewall"] = list(rules)
        self._save()

    def attach_device(self, name: str, device: Device) -> None:
        what = f"{name}: attaching {device.devclass} device {device.backend}:{device.ident} failed"
        qube = self._qube(name, what)
        if device.backend != "dom0":
            self._qube(device.backend, what)
        if not device.persistent and not qube.get("running", False):
            raise SimError(f"{what}: VM not running, can only attach device with persistent flag")
        devices = qube.setdefault("devices", [])
        if any((d["class"], d["backend"], d["ident"]) ==
               (device.devclass, device.backend, device.ident) for d in devices):
            raise SimError(f"{what}: device already attached")
        devices.append(device.settings())
        self._save()

    def set_volume(self, name: str, volume: str, key: str, value: Any) -> None:
        what = f"{name}: setting {key} of volume {volume} failed"
        qube = self._qube(name, what)
        if key not in ("revisions_to_keep", "rw", "ephemeral") or volume not in qube["volumes"]:
            raise SimError(f"{what}: invalid volume or setting")
        if key != "revisions_to_keep" and qube.get("running", False):
            raise SimError(f"{what}: Domain is not powered off: {name!r}")
        qube["volumes"][volume][key] = value
        self._save()

    def resize_volume(self, name: str, volume: str, size: int) -> None:
        what = f"{name}: resizing volume {volume} failed"
        settings = self._qube(name, what)["volumes"][volume]
        if size < settings["size"]:
            raise SimError(f"{what}: For your own safety, shrinking of {volume} is disabled")
        with open(self.directory / settings["path"], "r+b") as f:
            f.truncate(size)
        settings["size"] = size
        self._save()

    def import_volume(self, name: str, volume: str, stream: Any, size: int) -> None:
        what = f"{name}: importing volume {volume} failed"
        try:
            qube = self._halted(name, what)
            settings = qube["volumes"].get(volume)
            if settings is None or not settings["save_on_stop"]:
                raise SimError(f"{what}: Cannot import_data: {volume} is not save_on_stop")
            image = self.directory / settings["path"]
            partial = image.with_name(f"{volume}-import.img")
            error, failure = _write_import(partial, stream, size)
            if error:
                partial.unlink(missing_ok=True)
                if failure is not None:
                    raise failure
                raise SimError(f"{what}: Data import failed: {error}")
            os.replace(partial, image)
            settings["size"] = size
            self._save()
        finally:
            stream.close()


def _write_import(path: Path, stream: Any, size: int) -> tuple[str, BaseException | None]:
    """Write exactly `size` bytes of `stream` to a new sparse file at `path`:
    (why not, or "", the exception the stream raised, if any)."""
    copied = 0
    failure = None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        while copied < size:
            try:
                block = stream.read(min(IMPORT_BLOCK, size - copied))
            except BaseException as e:  # the import script sees EOF
                failure = e
                break
            if not block:
                break
            if block.count(0) != len(block):
                os.pwrite(fd, block, copied)
            copied += len(block)
        if failure is None and copied < size:
            return f"not enough data (copied {copied} bytes, expected {size} bytes)", None
        if failure is None:
            try:
                extra = stream.read(1)
            except BaseException as e:
                failure, extra = e, b""
            if extra:
                return f"too much data (expected {size} bytes)", None
        if failure is not None:
            return "error copying data", failure
        os.fsync(fd)
        return "", None
    finally:
        os.close(fd)
