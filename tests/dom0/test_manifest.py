# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests for qbackup.manifest: encoding, and decoding of hostile content."""

import copy
import os

import msgpack
import pytest

from qbackup import crypto, manifest
from qbackup.errors import IntegrityError, QbackupError, RollbackError
from qbackup.manifest import Manifest

REPO = os.urandom(32)
SNAP = os.urandom(32)
CS = 256 << 10


VOLUME_CONFIG = {"pool": "vm-pool", "size": 2 * CS + 1, "rw": True, "save_on_stop": True,
                 "snap_on_start": False, "revisions_to_keep": 1, "ephemeral": False}


def entry(klass: str = "AppVM", **fields) -> dict:
    """A format 2 qube entry: empty settings but `fields`."""
    return {"class": klass, "properties": {}, "features": {}, "tags": [], "volumes": {},
            "volume_config": {}, "firewall": None, "devices": None, "dependencies": {},
            **fields}


def sample() -> Manifest:
    qubes = {
        "work": entry(
            properties={"label": "blue", "netvm": "sys-firewall", "memory": 400, "debug": False,
                        "kernelopts": None},
            features={"service.cups": "1", "menu-items": "firefox.desktop org.gnome.Nautilus.desktop"},
            tags=["audio", "created-by-dom0"],
            volumes={"private": {"size": 2 * CS + 1, "chunks": 3, "root": os.urandom(32),
                                 "depth": 1, "settings": {"pool": "vm-pool", "rw": True},
                                 "source": {"state": "live", "taken": 1700000000.25,
                                            "copy": os.urandom(16)}}},
            volume_config={"private": VOLUME_CONFIG,
                           "volatile": {**VOLUME_CONFIG, "save_on_stop": False, "ephemeral": True}},
            firewall=["action=accept dst4=10.0.0.0/8 proto=tcp dstports=443-443",
                      "action=accept specialtarget=dns", "action=drop"],
            devices=[{"class": "block", "backend": "sys-usb", "ident": "sda",
                      "options": {"read-only": "yes", "frontend-dev": "xvdi"}, "persistent": True},
                     {"class": "pci", "backend": "dom0", "ident": "00_1f.6",
                      "options": {"no-strict-reset": "True"}, "persistent": False}],
            dependencies={"template": "fedora", "netvm": "sys-firewall", "default_dispvm": None,
                          "audiovm": "dom0", "guivm": "dom0", "management_dispvm": None}),
        "debian-12": entry(
            "TemplateVM",
            volumes={"root": {"size": 0, "chunks": 0, "root": crypto.ZERO_ID, "depth": 1,
                              "settings": {}},
                     "private": {"size": 1025 * CS, "chunks": 1025, "root": os.urandom(32),
                                 "depth": 2, "settings": {}}},
            firewall=[], devices=[]),
        "sys-net": entry(),
    }
    return Manifest(REPO, SNAP, 1700000000.5, "dom0", os.urandom(32), CS, qubes)


def sample_v1() -> dict:
    """A format 1 manifest as qbackup wrote it before format 2 (as a map)."""
    doc = raw(sample())
    doc["version"] = 1
    for qube in doc["qubes"].values():
        for key in ("firewall", "devices", "dependencies"):
            del qube[key]
        for config in qube["volume_config"].values():
            del config["ephemeral"]
        for vol in qube["volumes"].values():
            vol.pop("source", None)
    doc["qubes"]["work"]["notes"] = {"any": ["value", 1]}  # format 1 allowed extra keys
    return doc


def decode(plain, repo_id=REPO, snapshot_id=SNAP, chunk_size=CS):
    return manifest.decode(plain, repo_id=repo_id, snapshot_id=snapshot_id, chunk_size=chunk_size)


def raw(m: Manifest) -> dict:
    return msgpack.unpackb(manifest.encode(m), raw=False)


def test_round_trip():
    m = sample()
    assert decode(manifest.encode(m)) == m
    first = sample()
    first.predecessor = None
    assert decode(manifest.encode(first)) == first


def test_format_fields():
    doc = raw(sample())
    assert doc["format"] == "qbackup-manifest" and doc["version"] == 3
    assert set(doc) == {"format", "version", "repo_id", "snapshot_id", "time", "host", "predecessor",
                        "chunk_size", "qubes"}


def test_other_repository_is_rollback_error():
    plain = manifest.encode(sample())
    with pytest.raises(RollbackError, match="belongs to repository"):
        decode(plain, repo_id=os.urandom(32))


def test_other_snapshot_id():
    with pytest.raises(IntegrityError, match="another snapshot id"):
        decode(manifest.encode(sample()), snapshot_id=os.urandom(32))


def test_other_chunk_size():
    with pytest.raises(IntegrityError, match="chunk size"):
        decode(manifest.encode(sample()), chunk_size=CS * 2)


def mutate(path, value):
    """Encode the sample with doc[path...] set to value (or deleted if value is DELETE)."""
    doc = raw(sample())
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return msgpack.packb(doc, use_bin_type=True)


DELETE = object()
VOL = ("qubes", "work", "volumes", "private")


@pytest.mark.parametrize("path,value", [
    (("format",), "something-else"),
    (("version",), 4),
    (("version",), 0),
    (("version",), 2.0),
    (("version",), True),
    (("extra",), 1),
    (("time",), DELETE),
    (("time",), 5),
    (("time",), float("nan")),
    (("time",), -1.0),
    (("host",), "a\x1bb"),
    (("host",), "h" * 300),
    (("host",), b"dom0"),
    (("predecessor",), b"short"),
    (("repo_id",), b"short"),
    (("snapshot_id",), None),
    (("qubes",), []),
    (("qubes", "bad name!"), entry()),
    (("qubes", "x" * 40), entry()),
    (("qubes", "work", "class"), 7),
    (("qubes", "work", "class"), "App VM"),
    (("qubes", "work", "tags"), ["ok", 3]),
    (("qubes", "work", "tags"), "audio"),
    (("qubes", "work", "properties"), []),
    (("qubes", "work", "features"), DELETE),
    (("qubes", "work", "volumes"), DELETE),
    (("qubes", "work", "Bad-Key"), 1),
    (("qubes", "work", "notes"), "format 2 has no further keys"),
    (("qubes", "work", "volumes", "../etc"), {}),
    (("qubes", "work", "properties", "label"), {"a": 1}),
    (("qubes", "work", "properties", "label"), ["blue"]),
    (("qubes", "work", "properties", "label"), b"blue"),
    (("qubes", "work", "properties", "f"), float("inf")),
    (("qubes", "work", "properties", "kernelopts"), "x" * 4097),
    (("qubes", "work", "properties", "Bad"), 1),
    (("qubes", "work", "properties", "memory"), 1 << 63),
    (("qubes", "work", "features", "service.cups"), 1),
    (("qubes", "work", "features", "service.cups"), None),
    (("qubes", "work", "features", "service.cups"), "x" * 65537),
    (("qubes", "work", "features", "bad name"), "1"),
    (("qubes", "work", "tags"), ["audio", "audio"]),
    (("qubes", "work", "tags"), ["with space"]),
    (("qubes", "work", "tags"), [""]),
    (("qubes", "work", "volume_config"), DELETE),
    (("qubes", "work", "volume_config"), []),
    (("qubes", "work", "volume_config", "../x"), VOLUME_CONFIG),
    (("qubes", "work", "volume_config", "private", "pool"), "a/b"),
    (("qubes", "work", "volume_config", "private", "pool"), ""),
    (("qubes", "work", "volume_config", "private", "size"), -1),
    (("qubes", "work", "volume_config", "private", "size"), 1.0),
    (("qubes", "work", "volume_config", "private", "rw"), 1),
    (("qubes", "work", "volume_config", "private", "ephemeral"), DELETE),
    (("qubes", "work", "volume_config", "private", "revisions_to_keep"), -2),
    (("qubes", "work", "volume_config", "private", "extra"), 1),
    (("qubes", "work", "firewall"), DELETE),
    (("qubes", "work", "firewall"), "action=accept"),
    (("qubes", "work", "firewall"), ["action=accept\naction=drop"]),
    (("qubes", "work", "firewall"), [""]),
    (("qubes", "work", "firewall"), ["caf\u00e9"]),
    (("qubes", "work", "firewall"), [b"action=accept"]),
    (("qubes", "work", "firewall"), ["action=drop"] * 4097),
    (("qubes", "work", "devices"), DELETE),
    (("qubes", "work", "devices"), {}),
    (("qubes", "work", "devices", 0, "class"), "Block"),
    (("qubes", "work", "devices", 0, "backend"), "bad name"),
    (("qubes", "work", "devices", 0, "ident"), "sys-usb+sda"[:0]),
    (("qubes", "work", "devices", 0, "ident"), "a b"),
    (("qubes", "work", "devices", 0, "persistent"), "yes"),
    (("qubes", "work", "devices", 0, "options"), {"persistent": "True"}),
    (("qubes", "work", "devices", 0, "options"), {"read-only": "yes no"}),
    (("qubes", "work", "devices", 0, "options"), {"bad key": "1"}),
    (("qubes", "work", "devices", 0, "options"), ["read-only"]),
    (("qubes", "work", "devices", 0, "extra"), 1),
    (("qubes", "work", "devices", 1), {"class": "block", "backend": "sys-usb", "ident": "sda",
                                       "options": {}, "persistent": False}),
    (("qubes", "work", "dependencies"), DELETE),
    (("qubes", "work", "dependencies"), None),
    (("qubes", "work", "dependencies", "kernel"), "x"),
    (("qubes", "work", "dependencies", "netvm"), "bad name!"),
    (("qubes", "work", "dependencies", "netvm"), 1),
    (VOL + ("size",), -1),
    (VOL + ("size",), 1 << 63),
    (VOL + ("size",), True),
    (VOL + ("size",), 10 * CS),  # chunk count no longer matches
    (VOL + ("chunks",), 4),
    (VOL + ("depth",), 2),
    (VOL + ("depth",), 0),
    (VOL + ("root",), b"\x00" * 31),
    (VOL + ("root",), None),
    (VOL + ("settings",), None),
    (VOL + ("extra",), 1),
    (VOL + ("chunks",), DELETE),
    (VOL + ("source",), None),
    (VOL + ("source",), {}),
    (VOL + ("source", "state"), "running"),
    (VOL + ("source", "taken"), 5),
    (VOL + ("source", "taken"), float("inf")),
    (VOL + ("source", "copy"), b"short"),
    (VOL + ("source", "copy"), "not bytes"),
    (VOL + ("source", "extra"), 1),
    (VOL + ("source", "taken"), DELETE),
])
def test_hostile_fields_rejected(path, value):
    with pytest.raises(IntegrityError, match=f"snapshot {SNAP.hex()}: bad manifest"):
        decode(mutate(path, value))


@pytest.mark.parametrize("plain", [
    b"",
    b"\xc1",  # never-used msgpack byte
    msgpack.packb([1, 2, 3]),
    msgpack.packb({"format": "qbackup-manifest"}),
    msgpack.packb({1: 2}),
    msgpack.packb(msgpack.ExtType(5, b"xx")),
    b"\x91" * 100_000,  # deeply nested arrays
    b"\xdd\xff\xff\xff\xff",  # array claiming 4G items
    b"\xdb\xff\xff\xff\xff",  # string claiming 4G bytes
])
def test_garbage_rejected(plain):
    with pytest.raises(IntegrityError):
        decode(plain)


def test_trailing_bytes_rejected():
    with pytest.raises(IntegrityError):
        decode(manifest.encode(sample()) + b"\x00")


def test_ext_type_inside_rejected():
    doc = raw(sample())
    doc["qubes"]["work"]["features"]["x"] = msgpack.ExtType(1, b"a")
    with pytest.raises(IntegrityError):
        decode(msgpack.packb(doc, use_bin_type=True))


def test_encode_validates_our_input():
    m = sample()
    m.qubes = copy.deepcopy(m.qubes)
    m.qubes["work"]["properties"]["bad"] = object()
    with pytest.raises(QbackupError, match="invalid manifest"):
        manifest.encode(m)


def test_check_qubes():
    qubes = sample().qubes
    manifest.check_qubes(qubes, CS)
    with pytest.raises(QbackupError, match="invalid qube metadata: qube work.volumes.private.chunks"):
        manifest.check_qubes(qubes, CS * 2)


def test_format_1_still_decodes():
    """A manifest written before format 2 decodes into format 2's shape:
    firewall and devices not recorded (None), no dependencies, the volume
    configuration kept without ephemeral (not recorded: None), other extra
    keys dropped."""
    doc = sample_v1()
    m = decode(msgpack.packb(doc, use_bin_type=True))
    assert m.version == 1
    work, expected = m.qubes["work"], doc["qubes"]["work"]
    assert set(work) == manifest.QUBE_KEYS_2
    assert (work["firewall"], work["devices"], work["dependencies"]) == (None, None, {})
    assert work["volume_config"]["private"] == {**VOLUME_CONFIG, "ephemeral": None}
    assert "notes" not in work
    for key in ("class", "properties", "features", "tags", "volumes"):
        assert work[key] == expected[key]


def test_format_1_keeps_its_looser_checks():
    """Format 1 decodes as it always did (any extra key, any nested value);
    a volume_config that is not in format 2's shape is dropped, not trusted."""
    doc = sample_v1()
    doc["qubes"]["work"]["properties"]["nested"] = {"a": [1, 2.5, b"x"]}
    doc["qubes"]["work"]["volume_config"]["private"]["size"] = "big"
    m = decode(msgpack.packb(doc, use_bin_type=True))
    assert m.qubes["work"]["volume_config"] == {}
    assert m.qubes["work"]["properties"]["nested"] == {"a": [1, 2.5, b"x"]}
    doc["qubes"]["work"]["Bad-Key"] = 1
    with pytest.raises(IntegrityError, match="bad key"):
        decode(msgpack.packb(doc, use_bin_type=True))


def huge_features(total: int) -> dict[str, str]:
    """Features of about `total` bytes in all, each within format 2's bound."""
    n, rest = divmod(total, 60000)
    return {**{f"huge{i}": "x" * 60000 for i in range(n)}, "huge-rest": "x" * rest}


def test_format_2_still_decodes_without_source():
    """Format 2 had no `source` in volume entries: it still decodes as it
    is, and a `source` is refused in it."""
    doc = raw(sample())
    doc["version"] = 2
    del doc["qubes"]["work"]["volumes"]["private"]["source"]
    m = decode(msgpack.packb(doc, use_bin_type=True))
    assert m.version == 2 and "source" not in m.qubes["work"]["volumes"]["private"]
    assert m.qubes["work"]["firewall"] == sample().qubes["work"]["firewall"]
    doc["qubes"]["work"]["volumes"]["private"]["source"] = {"state": "live", "taken": 1.0,
                                                            "copy": None}
    with pytest.raises(IntegrityError, match="does not have exactly"):
        decode(msgpack.packb(doc, use_bin_type=True))


def test_source_is_optional_in_format_3():
    m = sample()
    del m.qubes["work"]["volumes"]["private"]["source"]
    assert decode(manifest.encode(m)) == m
    m.qubes["work"]["volumes"]["private"]["source"] = {"state": "shutdown", "taken": 0.0,
                                                       "copy": None}
    assert decode(manifest.encode(m)).qubes["work"]["volumes"]["private"]["source"] == {
        "state": "shutdown", "taken": 0.0, "copy": None}

def test_oversized_manifest_is_refused_naming_the_largest_qube():
    m = sample()
    m.qubes["work"]["features"].update(huge_features(manifest.MAX_PLAIN))
    with pytest.raises(QbackupError, match=f"over the {manifest.MAX_PLAIN} a snapshot may hold;"
                       " qube work alone takes"):
        manifest.encode(m)
    m = sample()
    m.qubes["work"]["features"].update(huge_features(
        manifest.MAX_PLAIN - len(manifest.encode(sample())) - 2000))
    assert len(manifest.encode(m)) <= manifest.MAX_PLAIN


def test_the_largest_manifest_fits_a_snapshot_even_uncompressed():
    from qbackup import proto
    assert manifest.MAX_PLAIN + crypto.max_blob_size(0) == proto.MAX_SNAPSHOT
    keys = crypto.create_keys(CS)
    sealed = crypto.seal_snapshot(keys, SNAP, os.urandom(manifest.MAX_PLAIN))
    assert len(sealed) == proto.MAX_SNAPSHOT
