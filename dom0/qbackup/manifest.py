# SPDX-License-Identifier: GPL-2.0-or-later
"""Snapshot manifest: what one backup holds, as a msgpack map (format 3).

The manifest names its repository, its own id, time, host and predecessor,
the chunk size, and per qube its settings (class, properties, features,
tags, the configuration of its volumes, firewall rules, device assignments
and the qubes it depends on) and per volume its size and chunk map root
and where its data came from (`source`: the last-shutdown or live state,
when dom0's copy was taken, and which copy). It is sealed with
crypto.seal_snapshot; decode() runs on authenticated plaintext only and
still checks every type and bound. Format 2 manifests (no `source`) and
format 1 manifests (no firewall, devices or dependencies either) still
decode, format 1 into the same shape with those marked as not recorded.
See docs/SNAPSHOTS.md.
"""

import math
import re
from dataclasses import dataclass

import msgpack

from qbackup import crypto
from qbackup.chunkmap import ID_SIZE, MAX_DEPTH, depth_for
from qbackup.errors import IntegrityError, QbackupError, RollbackError

FORMAT = "qbackup-manifest"
VERSION = 3
VERSIONS = (1, 2, 3)  # what decode() accepts
MAX_VALUE_DEPTH = 8
MAX_SIZE = 1 << 62
# A sealed manifest must fit the 4 MiB a snapshot may take (PROTOCOL §7),
# even stored raw: its plaintext may take that less the blob overhead.
MAX_PLAIN = (4 << 20) - crypto.max_blob_size(0)
QUBE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")
VOLUME_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
EXTRA_KEY = re.compile(r"[a-z][a-z0-9_]{0,31}")
QUBE_KEYS = {"class", "properties", "features", "tags", "volumes"}
# Formats 2 and 3: every qube entry has exactly these keys (firewall and devices
# may be nil: not recorded).
QUBE_KEYS_2 = QUBE_KEYS | {"volume_config", "firewall", "devices", "dependencies"}
PROPERTY_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Feature names, tags, device idents: characters a qrexec argument may hold.
QREXEC_ARG = re.compile(r"[A-Za-z0-9_.+-]{1,255}")
POOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
DEVICE_CLASS = re.compile(r"[a-z][a-z0-9_]{0,31}")
# qubesd's characters for device option names and values (admin.vm.device.*.Attach)
DEVICE_OPTION = re.compile(r"[A-Za-z0-9_.-]{1,64}")
DEVICE_VALUE = re.compile(r"[A-Za-z0-9_.,+:-]{0,255}")
FIREWALL_RULE = re.compile(r"[\x20-\x7e]{1,2048}")  # admin.vm.firewall.Get lines
MAX_STR = 4096  # a property value
MAX_FEATURE = 1 << 16  # a feature value (qubesd takes at most 64 KiB of payload)
MAX_RULES = 4096
MAX_DEVICES = 1024
MAX_OPTIONS = 64
# The properties that name the qubes a qube depends on.
DEPENDENCIES = ("template", "netvm", "default_dispvm", "audiovm", "guivm", "management_dispvm")
VOLUME_CONFIG = {"pool": str, "size": int, "rw": bool, "save_on_stop": bool,
                 "snap_on_start": bool, "revisions_to_keep": int, "ephemeral": bool}
DEVICE_KEYS = {"class", "backend", "ident", "options", "persistent"}
VOLUME_KEYS = {"size", "chunks", "root", "depth", "settings"}
SOURCE_KEY = "source"  # format 3: optional in a volume entry
SOURCE_KEYS = {"state", "taken", "copy"}
SOURCE_STATES = ("shutdown", "live")
COPY_ID_SIZE = 16
TOP_KEYS = {"format", "version", "repo_id", "snapshot_id", "time", "host", "predecessor",
            "chunk_size", "qubes"}


@dataclass
class Manifest:
    repo_id: bytes
    snapshot_id: bytes
    time: float
    host: str
    predecessor: bytes | None
    chunk_size: int
    qubes: dict  # qube name -> {class, properties, features, tags, volumes, ...} (docs/SNAPSHOTS.md §3)
    version: int = VERSION  # the format it was decoded from (encode writes VERSION)


class _Invalid(Exception):
    pass


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise _Invalid(what)


def _check_value(value, where: str, depth: int = 0) -> None:
    """A generic metadata value: scalars, lists and str-keyed maps, bounded depth."""
    _check(depth <= MAX_VALUE_DEPTH, f"{where} is nested too deeply")
    if value is None or isinstance(value, (bool, str, bytes)):
        return
    if isinstance(value, int):
        _check(-(1 << 63) <= value < (1 << 64), f"{where} is out of range")
    elif isinstance(value, float):
        _check(math.isfinite(value), f"{where} is not finite")
    elif isinstance(value, list):
        for item in value:
            _check_value(item, where, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check(isinstance(key, str), f"{where} has a non-string key")
            _check_value(item, f"{where}.{key}", depth + 1)
    else:
        raise _Invalid(f"{where} has a value of type {type(value).__name__}")


def _check_map(value, where: str) -> None:
    _check(isinstance(value, dict), f"{where} is not a map")
    _check_value(value, where)


def _check_int(value, low: int, high: int, where: str) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
           f"{where} is not an integer in {low}..{high}")


def _check_id(value, where: str) -> None:
    _check(isinstance(value, bytes) and len(value) == ID_SIZE, f"{where} is not a {ID_SIZE}-byte id")


def _check_source(source, where: str) -> None:
    _check(isinstance(source, dict) and set(source) == SOURCE_KEYS,
           f"{where} does not have exactly {sorted(SOURCE_KEYS)}")
    _check(source["state"] in SOURCE_STATES, f"{where}.state is not one of {SOURCE_STATES}")
    _check(isinstance(source["taken"], float) and math.isfinite(source["taken"])
           and source["taken"] >= 0, f"{where}.taken is invalid")
    _check(source["copy"] is None or (isinstance(source["copy"], bytes)
                                      and len(source["copy"]) == COPY_ID_SIZE),
           f"{where}.copy is not nil or a {COPY_ID_SIZE}-byte id")


def _check_volume(vol: dict, where: str, chunk_size: int, version: int) -> None:
    keys = set(vol) if isinstance(vol, dict) else set()
    allowed = VOLUME_KEYS | ({SOURCE_KEY} if version >= 3 else set())
    _check(isinstance(vol, dict) and VOLUME_KEYS <= keys <= allowed,
           f"{where} does not have exactly {sorted(VOLUME_KEYS)}"
           + (f" and optionally {SOURCE_KEY!r}" if version >= 3 else ""))
    if SOURCE_KEY in vol:
        _check_source(vol[SOURCE_KEY], f"{where}.{SOURCE_KEY}")
    _check_int(vol["size"], 0, MAX_SIZE, f"{where}.size")
    _check(vol["chunks"] == -(-vol["size"] // chunk_size), f"{where}.chunks does not match its size")
    _check_int(vol["depth"], 1, MAX_DEPTH, f"{where}.depth")
    _check(vol["depth"] == depth_for(vol["chunks"]), f"{where}.depth does not match its chunk count")
    _check_id(vol["root"], f"{where}.root")
    _check_map(vol["settings"], f"{where}.settings")


def _check_qube(qube: dict, where: str, chunk_size: int, version: int) -> None:
    if version == 1:
        _check(isinstance(qube, dict) and QUBE_KEYS <= set(qube), f"{where} lacks one of {sorted(QUBE_KEYS)}")
    else:
        _check(isinstance(qube, dict) and set(qube) == QUBE_KEYS_2,
               f"{where} does not have exactly {sorted(QUBE_KEYS_2)}")
    _check(isinstance(qube["class"], str) and qube["class"].isidentifier(), f"{where}.class is not a class name")
    _check(isinstance(qube["volumes"], dict), f"{where}.volumes is not a map")
    for name, vol in qube["volumes"].items():
        _check(isinstance(name, str) and VOLUME_NAME.fullmatch(name) is not None, f"{where} has a bad volume name")
        _check_volume(vol, f"{where}.volumes.{name}", chunk_size, version)
    if version == 1:
        _check_map(qube["properties"], f"{where}.properties")
        _check_map(qube["features"], f"{where}.features")
        _check(isinstance(qube["tags"], list) and all(isinstance(t, str) for t in qube["tags"]),
               f"{where}.tags is not a list of strings")
        for key in set(qube) - QUBE_KEYS:
            _check(isinstance(key, str) and EXTRA_KEY.fullmatch(key) is not None, f"{where} has a bad key")
            _check_value(qube[key], f"{where}.{key}")
        return
    _check_properties(qube["properties"], f"{where}.properties")
    _check_features(qube["features"], f"{where}.features")
    _check_tags(qube["tags"], f"{where}.tags")
    _check(isinstance(qube["volume_config"], dict), f"{where}.volume_config is not a map")
    for name, config in qube["volume_config"].items():
        _check(isinstance(name, str) and VOLUME_NAME.fullmatch(name) is not None,
               f"{where}.volume_config has a bad volume name")
        _check_volume_config(config, f"{where}.volume_config.{name}")
    if qube["firewall"] is not None:
        _check_firewall(qube["firewall"], f"{where}.firewall")
    if qube["devices"] is not None:
        _check_devices(qube["devices"], f"{where}.devices")
    _check_dependencies(qube["dependencies"], f"{where}.dependencies")


def _check_properties(props, where: str) -> None:
    _check(isinstance(props, dict), f"{where} is not a map")
    for name, value in props.items():
        _check(isinstance(name, str) and PROPERTY_NAME.fullmatch(name) is not None,
               f"{where} has a bad property name")
        _check(value is None or isinstance(value, (bool, str)) or
               (isinstance(value, int) and -(1 << 63) <= value < (1 << 63)),
               f"{where}.{name} is not nil, a boolean, an integer or a string")
        _check(not isinstance(value, str) or len(value) <= MAX_STR, f"{where}.{name} is too long")


def _check_features(features, where: str) -> None:
    _check(isinstance(features, dict), f"{where} is not a map")
    for name, value in features.items():
        _check(isinstance(name, str) and QREXEC_ARG.fullmatch(name) is not None,
               f"{where} has a bad feature name")
        _check(isinstance(value, str) and len(value) <= MAX_FEATURE,
               f"{where}.{name} is not a string of at most {MAX_FEATURE} characters")


def _check_tags(tags, where: str) -> None:
    _check(isinstance(tags, list) and all(isinstance(t, str) and QREXEC_ARG.fullmatch(t)
                                          for t in tags), f"{where} is not a list of tags")
    _check(len(set(tags)) == len(tags), f"{where} lists a tag twice")


def _check_volume_config(config, where: str) -> None:
    _check(isinstance(config, dict) and set(config) == set(VOLUME_CONFIG),
           f"{where} does not have exactly {sorted(VOLUME_CONFIG)}")
    for key, kind in VOLUME_CONFIG.items():
        _check(type(config[key]) is kind, f"{where}.{key} is not a {kind.__name__}")
    _check(POOL_NAME.fullmatch(config["pool"]) is not None, f"{where}.pool is not a pool name")
    _check_int(config["size"], 0, MAX_SIZE, f"{where}.size")
    _check_int(config["revisions_to_keep"], -1, 1 << 31, f"{where}.revisions_to_keep")


def _check_firewall(rules, where: str) -> None:
    _check(isinstance(rules, list) and len(rules) <= MAX_RULES,
           f"{where} is not a list of at most {MAX_RULES} rules")
    for rule in rules:
        _check(isinstance(rule, str) and FIREWALL_RULE.fullmatch(rule) is not None,
               f"{where} has a rule that is not one line of printable ASCII")


def _check_devices(devices, where: str) -> None:
    _check(isinstance(devices, list) and len(devices) <= MAX_DEVICES,
           f"{where} is not a list of at most {MAX_DEVICES} assignments")
    seen = set()
    for dev in devices:
        _check(isinstance(dev, dict) and set(dev) == DEVICE_KEYS,
               f"{where} has an assignment without exactly {sorted(DEVICE_KEYS)}")
        _check(isinstance(dev["class"], str) and DEVICE_CLASS.fullmatch(dev["class"]) is not None,
               f"{where} has a bad device class")
        _check(isinstance(dev["backend"], str) and QUBE_NAME.fullmatch(dev["backend"]) is not None,
               f"{where} has a bad backend qube")
        _check(isinstance(dev["ident"], str) and QREXEC_ARG.fullmatch(dev["ident"]) is not None,
               f"{where} has a bad device id")
        _check(isinstance(dev["persistent"], bool), f"{where} has a bad persistent flag")
        options = dev["options"]
        _check(isinstance(options, dict) and len(options) <= MAX_OPTIONS and all(
            isinstance(k, str) and DEVICE_OPTION.fullmatch(k) and k != "persistent" and
            isinstance(v, str) and DEVICE_VALUE.fullmatch(v) for k, v in options.items()),
            f"{where} has bad device options")
        key = (dev["class"], dev["backend"], dev["ident"])
        _check(key not in seen, f"{where} assigns a device twice")
        seen.add(key)


def _check_dependencies(deps, where: str) -> None:
    _check(isinstance(deps, dict), f"{where} is not a map")
    for prop, value in deps.items():
        _check(prop in DEPENDENCIES, f"{where} has a key that is not one of {', '.join(DEPENDENCIES)}")
        _check(value is None or (isinstance(value, str) and QUBE_NAME.fullmatch(value) is not None),
               f"{where}.{prop} is neither nil nor a qube name")


def _normalise_v1(qube: dict) -> dict:
    """A format 1 qube entry in the shape of format 2: its volume_config if
    it has format 2's shape (ephemeral was not recorded: None), firewall
    and devices not recorded (None), no dependencies; other extra keys
    dropped (format 1 wrote none)."""
    entry = {k: qube[k] for k in QUBE_KEYS}
    config = qube.get("volume_config")
    try:
        _check(isinstance(config, dict), "")
        for name, vol in config.items():
            _check(isinstance(name, str) and VOLUME_NAME.fullmatch(name) is not None, "")
            _check_volume_config({"ephemeral": False, **vol}, "")
        entry["volume_config"] = {n: {"ephemeral": None, **v} for n, v in config.items()}
    except (_Invalid, TypeError):
        entry["volume_config"] = {}
    entry.update(firewall=None, devices=None, dependencies={})
    return entry


def _check_qubes(qubes: dict, chunk_size: int, version: int = VERSION) -> None:
    _check(isinstance(qubes, dict), "qubes is not a map")
    for name, qube in qubes.items():
        _check(isinstance(name, str) and QUBE_NAME.fullmatch(name) is not None, "a qube has a bad name")
        _check_qube(qube, f"qube {name}", chunk_size, version)


def check_qubes(qubes: dict, chunk_size: int) -> None:
    """Raise QbackupError unless `qubes` is valid manifest content (our own input)."""
    try:
        _check_qubes(qubes, chunk_size)
    except _Invalid as e:
        raise QbackupError(f"invalid qube metadata: {e}") from None


def _to_map(m: Manifest) -> dict:
    return {"format": FORMAT, "version": VERSION, "repo_id": m.repo_id, "snapshot_id": m.snapshot_id,
            "time": m.time, "host": m.host, "predecessor": m.predecessor, "chunk_size": m.chunk_size,
            "qubes": m.qubes}


def _check_manifest(doc, repo_id: bytes, snapshot_id: bytes, chunk_size: int) -> None:
    _check(isinstance(doc, dict) and set(doc) == TOP_KEYS, "manifest does not have exactly the fields of its format")
    _check(doc["format"] == FORMAT and type(doc["version"]) is int and doc["version"] in VERSIONS,
           f"manifest is not of format {' or '.join(map(str, VERSIONS))}")
    _check_id(doc["repo_id"], "repo_id")
    if doc["repo_id"] != repo_id:
        raise RollbackError(f"snapshot {snapshot_id.hex()} belongs to repository {doc['repo_id'].hex()},"
                            f" not to this one ({repo_id.hex()})")
    _check_id(doc["snapshot_id"], "snapshot_id")
    _check(doc["snapshot_id"] == snapshot_id, "manifest names another snapshot id")
    _check(isinstance(doc["time"], float) and math.isfinite(doc["time"]) and doc["time"] >= 0, "time is invalid")
    _check(isinstance(doc["host"], str) and len(doc["host"]) <= 255 and doc["host"].isprintable(), "host is invalid")
    if doc["predecessor"] is not None:
        _check_id(doc["predecessor"], "predecessor")
    _check(doc["chunk_size"] == chunk_size, f"manifest chunk size is not {chunk_size}")
    _check_qubes(doc["qubes"], chunk_size, doc["version"])


def encode(m: Manifest) -> bytes:
    """Validated msgpack plaintext of a manifest (always format VERSION), at most MAX_PLAIN
    bytes."""
    doc = _to_map(m)
    try:
        _check_manifest(doc, m.repo_id, m.snapshot_id, m.chunk_size)
    except _Invalid as e:
        raise QbackupError(f"invalid manifest: {e}") from None
    plain = msgpack.packb(doc, use_bin_type=True)
    if len(plain) > MAX_PLAIN:
        sizes = {name: len(msgpack.packb(q, use_bin_type=True)) for name, q in m.qubes.items()}
        largest = max(sizes, key=lambda name: (sizes[name], name), default=None)
        worst = f"; qube {largest} alone takes {sizes[largest]} bytes" if largest else ""
        raise QbackupError(f"the snapshot's manifest would take {len(plain)} bytes, over the"
                           f" {MAX_PLAIN} a snapshot may hold{worst} (too many qubes in one"
                           " backup, or settings, features or notes too large)")
    return plain


def decode(plain: bytes, *, repo_id: bytes, snapshot_id: bytes, chunk_size: int) -> Manifest:
    """Manifest from authenticated plaintext.

    IntegrityError if it is not a valid manifest with this id; RollbackError
    if it names another repository (never acceptable, even on override).
    """
    try:
        doc = msgpack.unpackb(plain, raw=False, strict_map_key=True, use_list=True)
        _check_manifest(doc, repo_id, snapshot_id, chunk_size)
    except (_Invalid, ValueError, TypeError, msgpack.UnpackException) as e:
        raise IntegrityError(f"snapshot {snapshot_id.hex()}: bad manifest: {e}") from None
    qubes = doc["qubes"]
    if doc["version"] == 1:
        qubes = {name: _normalise_v1(qube) for name, qube in qubes.items()}
    return Manifest(doc["repo_id"], doc["snapshot_id"], doc["time"], doc["host"], doc["predecessor"],
                    doc["chunk_size"], qubes, doc["version"])
