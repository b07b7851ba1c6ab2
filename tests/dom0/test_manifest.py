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


def sample() -> Manifest:
    qubes = {
        "work": {"class": "AppVM",
                 "properties": {"label": "blue", "netvm": "sys-firewall", "memory": 400, "debug": False,
                                "kernelopts": None, "nested": {"a": [1, 2.5, b"x"]}},
                 "features": {"service.cups": "1"},
                 "tags": ["audio", "created-by-dom0"],
                 "volumes": {"private": {"size": 2 * CS + 1, "chunks": 3, "root": os.urandom(32),
                                         "depth": 1, "settings": {"pool": "vm-pool", "rw": True},
                                         "source": {"state": "live", "taken": 1700000000.25,
                                                    "copy": os.urandom(16)}}},
                 "firewall": [{"action": "accept", "dsthost": "example.org"}]},
        "debian-12": {"class": "TemplateVM", "properties": {}, "features": {}, "tags": [],
                      "volumes": {"root": {"size": 0, "chunks": 0, "root": crypto.ZERO_ID, "depth": 1,
                                           "settings": {}},
                                  "private": {"size": 1025 * CS, "chunks": 1025, "root": os.urandom(32),
                                              "depth": 2, "settings": {}}}},
        "sys-net": {"class": "AppVM", "properties": {}, "features": {}, "tags": [], "volumes": {}},
    }
    return Manifest(REPO, SNAP, 1700000000.5, "dom0", os.urandom(32), CS, qubes)


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
    assert doc["format"] == "qbackup-manifest" and doc["version"] == 2
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
    (("version",), 3),
    (("version",), 0),
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
    (("qubes", "bad name!"), {"class": "AppVM", "properties": {}, "features": {}, "tags": [], "volumes": {}}),
    (("qubes", "x" * 40), {"class": "AppVM", "properties": {}, "features": {}, "tags": [], "volumes": {}}),
    (("qubes", "work", "class"), 7),
    (("qubes", "work", "class"), "App VM"),
    (("qubes", "work", "tags"), ["ok", 3]),
    (("qubes", "work", "tags"), "audio"),
    (("qubes", "work", "properties"), []),
    (("qubes", "work", "features"), DELETE),
    (("qubes", "work", "volumes"), DELETE),
    (("qubes", "work", "Bad-Key"), 1),
    (("qubes", "work", "volumes", "../etc"), {}),
    (("qubes", "work", "properties", "label"), {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}),
    (("qubes", "work", "properties", "f"), float("inf")),
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
    doc["qubes"]["work"]["properties"]["x"] = msgpack.ExtType(1, b"a")
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


def test_version_1_manifests_are_still_read():
    """Format 1 had no `source` in volume entries; it still decodes, and a
    `source` is refused in it."""
    doc = raw(sample())
    doc["version"] = 1
    del doc["qubes"]["work"]["volumes"]["private"]["source"]
    m = decode(msgpack.packb(doc, use_bin_type=True))
    assert manifest.volume_source(m.qubes["work"]["volumes"]["private"]) is None
    doc["qubes"]["work"]["volumes"]["private"]["source"] = {"state": "live", "taken": 1.0,
                                                            "copy": None}
    with pytest.raises(IntegrityError, match="does not have exactly"):
        decode(msgpack.packb(doc, use_bin_type=True))


def test_source_is_optional_in_version_2():
    m = sample()
    del m.qubes["work"]["volumes"]["private"]["source"]
    assert decode(manifest.encode(m)) == m
    m.qubes["work"]["volumes"]["private"]["source"] = {"state": "shutdown", "taken": 0.0,
                                                       "copy": None}
    assert manifest.volume_source(decode(manifest.encode(m)).qubes["work"]["volumes"][
        "private"]) == {"state": "shutdown", "taken": 0.0, "copy": None}


def test_oversized_manifest_is_refused_naming_the_largest_qube():
    m = sample()
    m.qubes["work"]["features"]["huge"] = "x" * manifest.MAX_PLAIN
    with pytest.raises(QbackupError, match=f"over the {manifest.MAX_PLAIN} a snapshot may hold;"
                       " qube work alone takes"):
        manifest.encode(m)
    m.qubes["work"]["features"]["huge"] = "x" * (manifest.MAX_PLAIN - len(manifest.encode(sample())) - 20)
    assert len(manifest.encode(m)) <= manifest.MAX_PLAIN


def test_the_largest_manifest_fits_a_snapshot_even_uncompressed():
    from qbackup import proto
    assert manifest.MAX_PLAIN + crypto.max_blob_size(0) == proto.MAX_SNAPSHOT
    keys = crypto.create_keys(CS)
    sealed = crypto.seal_snapshot(keys, SNAP, os.urandom(manifest.MAX_PLAIN))
    assert len(sealed) == proto.MAX_SNAPSHOT
