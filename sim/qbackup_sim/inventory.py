# SPDX-License-Identifier: GPL-2.0-or-later
"""The simulated dom0's qube inventory (`inventory.json` in a sim directory).

Format (JSON object):

    {"backup_vm": "backup",
     "qubes": {NAME: {"class": "AppVM", "label": "red", "template": "fedora",
                      "netvm": "sys-firewall", "properties": {...},
                      "features": {...}, "tags": [...],
                      "volumes": {VOL: {"pool": "varlibqubes", "size": BYTES,
                                        "path": "volumes/NAME/VOL.img",
                                        "rw": true, "save_on_stop": true,
                                        "snap_on_start": false,
                                        "revisions_to_keep": 1}}}}}

`label`, `template` and `netvm` are optional and join `properties`;
`"running": true` makes the qube run (default: halted); volume paths are
relative to the sim directory; a volume may say `"ephemeral": true`.
Optional per qube: `"firewall": [RULE, ...]` (admin.vm.firewall.Get lines;
default `["action=accept"]`, as qubesd) and `"devices": [{"class", "backend",
"ident", "options", "persistent"}]`. Optional at the top: `"system":
{"pools": [...], "default_pool", "default_template", "default_netvm",
"default_dispvm", "management_dispvm"}` (SYSTEM_DEFAULTS). Such volumes
are plain image files.

An optional top-level `"pools": {"varlibqubes": {"driver": "file-reflink",
"dir_path": "/abs/path"}}` makes the volumes of those pools live in a Qubes
file-reflink pool (on btrfs or xfs for reflinks), laid out as qubesd lays
them out: `DIR_PATH/appvms/NAME/VOL.img` (TemplateVMs: `vm-templates/`),
volume id `appvms/NAME/VOL`; a running qube's changes are in
`VOL-dirty.img` beside it. `create_sim(..., pool_dir=PATH)` makes one.
`create_sim` writes a new sim directory with sparse (all-zero) image files
of the given sizes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from qbackup.errors import QbackupError
from qbackup.qubes import (DEPENDENCIES, Device, QubeDetails, QubeInfo, VolumeInfo,
                           restorable_properties)

INVENTORY = "inventory.json"
CLASSES = ("AppVM", "TemplateVM", "StandaloneVM", "DispVM", "DispVMTemplate")
_QUBE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")
_VOLUME_NAME = re.compile(r"[a-z][a-z0-9_-]{0,30}")
_TOP_PROPERTIES = ("label", "template", "netvm")
POOL = "varlibqubes"
# qubesd's defaults in a fresh test bed: one pool, no default qubes.
SYSTEM_DEFAULTS: dict[str, Any] = {
    "pools": [POOL], "default_pool": POOL, "default_template": None,
    "default_netvm": None, "default_dispvm": None, "management_dispvm": None}
DEFAULT_FIREWALL = ["action=accept"]


class SimError(QbackupError):
    """A problem with the simulated dom0 (inventory, images, daemon)."""


def _check(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise SimError(f"sim inventory: {where}: {what}")


def volume_defaults(klass: str, volume: str) -> dict[str, Any]:
    """Volume flags as qubesd R4.2 sets them for a qube of class `klass` in a
    file-reflink pool (checked against qubesd by tests/dom0/test_backend_contract.py):
    every volume writable and keeping the pool's revisions_to_keep (1); root
    is the qube's own in TemplateVMs and StandaloneVMs, a snapshot of the
    template's otherwise; a DispVM's private is a snapshot of its template's."""
    own = ((volume == "private" and klass != "DispVM")
           or (volume == "root" and klass in ("TemplateVM", "StandaloneVM")))
    snapshot = (volume == "root" and not own) or (volume == "private" and klass == "DispVM")
    return {"pool": POOL, "rw": True, "save_on_stop": own,
            "snap_on_start": snapshot, "revisions_to_keep": 1, "ephemeral": False}


def image_path(inventory: dict[str, Any], name: str, klass: str, volume: str, pool: str) -> str:
    """Where a new volume's image goes: in its file-reflink pool's directory
    as qubesd lays it out (dir_path_prefix: vm-templates/ or appvms/), or
    relative to the sim directory for a pool with no such entry."""
    pool_dir = inventory.get("pools", {}).get(pool, {}).get("dir_path")
    if pool_dir is None:
        return f"volumes/{name}/{volume}.img"
    subdir = "vm-templates" if klass == "TemplateVM" else "appvms"
    return str(Path(pool_dir) / subdir / name / f"{volume}.img")


def create_sim(directory: str | os.PathLike, qubes: dict[str, dict[str, Any]],
               backup_vm: str = "backup", pool_dir: str | os.PathLike | None = None) -> Path:
    """Create a sim directory holding `qubes` and the backup qube.

    Each qube is `{"class": ..., optional label/template/netvm/properties/
    features/tags/running, "volumes": {VOL: SIZE or full volume dict}}`;
    volume flags default to what qubesd uses for that class, and every qube
    is tagged `created-by-dom0`, as qubesd tags the qubes dom0 creates. Image files are created
    sparse (all zeros). The backup qube is added as an AppVM if not listed.
    With `pool_dir`, volumes of the default pool go to a file-reflink pool
    there, in qubesd's layout (module docstring).
    """
    root = Path(directory).absolute()
    if (root / INVENTORY).exists():
        raise SimError(f"{root} already holds a sim")
    qubes = dict(qubes)
    qubes.setdefault(backup_vm, {"class": "AppVM", "label": "black",
                                 "volumes": {"private": 1 << 20}})
    inventory: dict[str, Any] = {"backup_vm": backup_vm, "qubes": {}}
    if pool_dir is not None:
        inventory["pools"] = {POOL: {"driver": "file-reflink",
                                     "dir_path": str(Path(pool_dir).absolute())}}
    for name, spec in qubes.items():
        entry = {k: v for k, v in spec.items() if k != "volumes"}
        # as qvm-create: qubesd tags every qube dom0 creates
        entry["tags"] = sorted(set(spec.get("tags", [])) | {"created-by-dom0"})
        entry["volumes"] = {}
        for vol, value in spec.get("volumes", {}).items():
            settings = volume_defaults(spec.get("class", ""), vol)
            settings.update(value if isinstance(value, dict) else {"size": value})
            settings.setdefault("path", image_path(inventory, name, spec.get("class", ""), vol,
                                                   settings["pool"]))
            entry["volumes"][vol] = settings
        inventory["qubes"][name] = entry
    _validate(inventory)
    root.mkdir(parents=True, exist_ok=True)
    for entry in inventory["qubes"].values():
        for vol in entry["volumes"].values():
            image = root / vol["path"]
            image.parent.mkdir(parents=True, exist_ok=True)
            with open(image, "wb") as f:
                f.truncate(vol["size"])
    (root / "storage").mkdir(exist_ok=True)
    save_inventory(root, inventory)
    return root


def save_inventory(directory: str | os.PathLike, inventory: dict[str, Any]) -> None:
    """Validate and atomically write `inventory` into `directory`."""
    _validate(inventory)
    path = Path(directory) / INVENTORY
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(inventory, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_inventory(directory: str | os.PathLike) -> dict[str, Any]:
    """The validated inventory of the sim in `directory`."""
    path = Path(directory) / INVENTORY
    try:
        inventory = json.loads(path.read_text())
    except FileNotFoundError:
        raise SimError(f"{directory} is not a sim directory (no {INVENTORY}); "
                       f"create one with: python -m qbackup_sim create DIR") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SimError(f"cannot read {path}: {e}") from None
    _validate(inventory)
    return inventory


def _validate(inventory: Any) -> None:
    _check(isinstance(inventory, dict), "top level", "not an object")
    _check({"backup_vm", "qubes"} <= set(inventory) <= {"backup_vm", "qubes", "system", "pools"},
           "top level", "needs exactly the keys backup_vm and qubes (and may have system and pools)")
    system = inventory.get("system", {})
    _check(isinstance(system, dict) and set(system) <= set(SYSTEM_DEFAULTS), "system",
           f"may only have the keys {', '.join(SYSTEM_DEFAULTS)}")
    pools = inventory.get("pools", {})
    _check(isinstance(pools, dict), "pools", "not an object")
    for name, pool in pools.items():
        _check(isinstance(pool, dict) and set(pool) == {"driver", "dir_path"}
               and pool["driver"] == "file-reflink" and isinstance(pool["dir_path"], str)
               and os.path.isabs(pool["dir_path"]), f"pools.{name}",
               'must be {"driver": "file-reflink", "dir_path": ABSOLUTE PATH}')
    _check(isinstance(inventory["qubes"], dict), "qubes", "not an object")
    for name, qube in inventory["qubes"].items():
        _validate_qube(name, qube)
    _check(isinstance(inventory["backup_vm"], str)
           and inventory["backup_vm"] in inventory["qubes"], "backup_vm",
           f"{inventory['backup_vm']!r} is not a qube of the inventory")


def _validate_qube(name: str, qube: Any) -> None:
    _check(bool(_QUBE_NAME.fullmatch(name)), repr(name), "invalid qube name")
    _check(isinstance(qube, dict), name, "not an object")
    allowed = {"class", "volumes", "properties", "features", "tags", "running",
               "firewall", "devices", *_TOP_PROPERTIES}
    _check(set(qube) <= allowed, name, f"unknown keys {sorted(set(qube) - allowed)}")
    _check(qube.get("class") in CLASSES, name, f"class must be one of {', '.join(CLASSES)}")
    _check(isinstance(qube.get("properties", {}), dict), name, "properties not an object")
    features = qube.get("features", {})
    _check(isinstance(features, dict) and all(isinstance(v, str) for v in features.values()),
           name, "features must map names to strings")
    tags = qube.get("tags", [])
    _check(isinstance(tags, list) and all(isinstance(t, str) for t in tags),
           name, "tags must be a list of strings")
    _check(isinstance(qube.get("running", False), bool), name, "running must be true or false")
    firewall = qube.get("firewall", [])
    _check(isinstance(firewall, list) and all(isinstance(r, str) for r in firewall),
           name, "firewall must be a list of strings")
    devices = qube.get("devices", [])
    _check(isinstance(devices, list) and all(
        isinstance(d, dict) and set(d) == {"class", "backend", "ident", "options", "persistent"}
        for d in devices), name, "devices must be a list of assignments")
    volumes = qube.get("volumes", {})
    _check(isinstance(volumes, dict), name, "volumes not an object")
    for vol, settings in volumes.items():
        where = f"{name}.{vol}"
        _check(bool(_VOLUME_NAME.fullmatch(vol)), where, "invalid volume name")
        _check(isinstance(settings, dict), where, "not an object")
        expected = {"pool": str, "size": int, "path": str, "rw": bool,
                    "save_on_stop": bool, "snap_on_start": bool, "revisions_to_keep": int}
        _check(set(expected) <= set(settings) <= set(expected) | {"ephemeral"}, where,
               f"needs exactly the keys {', '.join(sorted(expected))} (and may have ephemeral)")
        _check(isinstance(settings.get("ephemeral", False), bool), where,
               "ephemeral must be bool")
        for key, kind in expected.items():
            _check(type(settings[key]) is kind, where, f"{key} must be {kind.__name__}")
        _check(settings["size"] >= 0, where, "negative size")


def _usage(image: Path) -> int:
    """What an image file holds, as a file-reflink pool reports it."""
    try:
        return image.stat().st_blocks * 512
    except OSError:
        return 0


def _volume_info(root: Path, inventory: dict[str, Any], qube: dict[str, Any], vol: str,
                 s: dict[str, Any]) -> VolumeInfo:
    """A volume as the adapter reports it: a plain image file, or one in a
    file-reflink pool (driver, vid, and the -dirty.img of a running qube),
    as qubes.volume_path and qubes.live_path compute them for qubesd."""
    path = str(root / s["path"])
    pool = inventory.get("pools", {}).get(s["pool"])
    driver = vid = ""
    live = None
    if pool is not None:
        dir_path = os.path.normpath(pool["dir_path"])
        if not path.startswith(dir_path + os.sep) or not path.endswith(".img"):
            raise SimError(f"sim inventory: volume {path} is not in pool {s['pool']}'s "
                           f"directory {dir_path}")
        driver, vid = pool["driver"], path[len(dir_path) + 1:-len(".img")]
        if qube.get("running", False) and s["save_on_stop"]:
            live = path[:-len(".img")] + "-dirty.img"
    return VolumeInfo(name=vol, pool=s["pool"], size=s["size"], path=path, rw=s["rw"],
                      save_on_stop=s["save_on_stop"], snap_on_start=s["snap_on_start"],
                      revisions_to_keep=s["revisions_to_keep"], usage=_usage(Path(path)),
                      ephemeral=s.get("ephemeral", False), driver=driver, vid=vid,
                      live_path=live)


def qube_infos(directory: str | os.PathLike, inventory: dict[str, Any]) -> list[QubeInfo]:
    """The inventory's qubes as the client sees them (derived properties
    dropped, volume paths made absolute)."""
    root = Path(directory).absolute()
    qubes = []
    for name, qube in sorted(inventory["qubes"].items()):
        properties = dict(qube.get("properties", {}))
        properties.update({k: qube[k] for k in _TOP_PROPERTIES if k in qube})
        volumes = {vol: _volume_info(root, inventory, qube, vol, s)
                   for vol, s in sorted(qube.get("volumes", {}).items())}
        qubes.append(QubeInfo(name=name, klass=qube["class"],
                              properties=restorable_properties(properties),
                              features=dict(qube.get("features", {})),
                              tags=sorted(qube.get("tags", [])), volumes=volumes,
                              running=qube.get("running", False)))
    return qubes


def system_settings(inventory: dict[str, Any]) -> dict[str, Any]:
    """The sim's global settings: SYSTEM_DEFAULTS, as the inventory overrides them."""
    return {**SYSTEM_DEFAULTS, **inventory.get("system", {})}


def qube_dependencies(inventory: dict[str, Any], name: str) -> dict[str, str | None]:
    """What each of DEPENDENCIES of a qube is, set or default, as qubesd R4.2
    answers: `template` only for classes that have one; a template's netvm
    defaults to none, any other qube's to the system's default_netvm;
    audiovm and guivm default to dom0."""
    qube = inventory["qubes"][name]
    system = system_settings(inventory)
    explicit = dict(qube.get("properties", {}))
    explicit.update({k: qube[k] for k in _TOP_PROPERTIES if k in qube})
    defaults = {"netvm": None if qube["class"] == "TemplateVM" else system["default_netvm"],
                "default_dispvm": system["default_dispvm"], "audiovm": "dom0",
                "guivm": "dom0", "management_dispvm": system["management_dispvm"]}
    if qube["class"] in ("AppVM", "DispVM"):
        defaults["template"] = None
    return {p: explicit.get(p, defaults[p]) for p in DEPENDENCIES if p in defaults}


def qube_details(inventory: dict[str, Any], name: str) -> QubeDetails:
    """A qube's firewall rules, device assignments and dependencies."""
    qube = inventory["qubes"][name]
    devices = [Device(d["class"], d["backend"], d["ident"], dict(d["options"]), d["persistent"])
               for d in qube.get("devices", [])]
    return QubeDetails(list(qube.get("firewall", DEFAULT_FIREWALL)), devices,
                       qube_dependencies(inventory, name))
