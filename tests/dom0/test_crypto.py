# SPDX-License-Identifier: GPL-2.0-or-later
"""qbackup.crypto: key file, keyed ids, blob sealing and every way to break them."""

import concurrent.futures
import hashlib
import hmac
import os
import struct
import tracemalloc

import msgpack
import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qbackup import crypto
from qbackup.crypto import (HEADER_LEN, TAG_LEN, TYPE_DATA, TYPE_TREE, Sealer,
                            create_keys, open_blob, open_snapshot, seal_snapshot, unwrap_keys,
                            wrap_keys)
from qbackup.errors import BadPassphrase, IntegrityError

CHUNK = 256 << 10
N = 2**14   # cheapest scrypt the key file accepts: keeps the tests fast


@pytest.fixture(scope="module")
def keys():
    return create_keys(CHUNK)


@pytest.fixture(scope="module")
def keyfile(keys):
    return wrap_keys(keys, b"correct horse", scrypt_n=N)


def seal(keys, plain, type=TYPE_DATA, **kw):
    blob_id = keys.chunk_id(plain, type)
    return blob_id, Sealer(keys).seal(type, blob_id, plain, **kw)


def seal_body(keys, type, blob_id, body: bytes) -> bytes:
    """Encrypt an arbitrary body (codec byte + payload) with the real key: what a
    bug, or an attacker holding the key, could produce."""
    salt, nonce = os.urandom(16), os.urandom(12)
    sealed = keys._aead(type, salt).encrypt(nonce, body, crypto.BLOB_AD + bytes([type]) + blob_id)
    return bytes([crypto.BLOB_VERSION]) + salt + nonce + sealed


# --- keys and key file ------------------------------------------------------------

def test_key_file_round_trip(keys, keyfile):
    assert len(keyfile) < 512
    opened = unwrap_keys(keyfile, b"correct horse")
    assert (opened.repo_id, opened.chunk_size, opened.created) == (
        keys.repo_id, keys.chunk_size, keys.created)
    assert opened.chunk_id(b"abc") == keys.chunk_id(b"abc")
    blob_id, blob = seal(keys, b"hello" * 100)
    assert open_blob(opened, TYPE_DATA, blob_id, blob, CHUNK) == b"hello" * 100
    assert wrap_keys(keys, b"correct horse", scrypt_n=N) != keyfile   # fresh salt and nonce
    rewrapped = wrap_keys(opened, b"new passphrase", scrypt_n=N)
    assert unwrap_keys(rewrapped, b"new passphrase").chunk_id(b"x") == keys.chunk_id(b"x")
    assert keys.repo_id.hex() in repr(keys) and keys._master.hex() not in repr(keys)


def test_default_scrypt_parameters(keys):
    fields = msgpack.unpackb(wrap_keys(keys, b"pw"))
    assert (fields["kdf"], fields["n"], fields["r"], fields["p"]) == ("scrypt", 2**17, 8, 1)
    assert len(fields["salt"]) == 16


def test_wrong_passphrase(keyfile):
    with pytest.raises(BadPassphrase, match="^wrong passphrase or corrupted key file$"):
        unwrap_keys(keyfile, b"correct horse!")


def test_create_keys_validates_chunk_size_and_is_random():
    for good in (64 << 10, 1 << 20, 4 << 20):
        assert create_keys(good).chunk_size == good
    for bad in (32 << 10, 8 << 20, 100_000, 0, -1, True, 2.0**18):
        with pytest.raises(ValueError, match="chunk size"):
            create_keys(bad)
    a, b = create_keys(CHUNK), create_keys(CHUNK)
    assert a.repo_id != b.repo_id and a._master != b._master


def test_wrap_keys_refuses_bad_arguments(keys):
    with pytest.raises(ValueError, match="empty passphrase"):
        wrap_keys(keys, b"")
    for n in (2**13, 2**23, 3 * 2**14):
        with pytest.raises(ValueError, match="scrypt"):
            wrap_keys(keys, b"pw", scrypt_n=n)


def tampered(keyfile, **changes):
    fields = msgpack.unpackb(keyfile)
    fields.update(changes)
    return msgpack.packb({k: v for k, v in fields.items() if v is not None})


def flip(data: bytes, i: int = 0) -> bytes:
    return data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]


def test_tampered_key_file_every_field(keyfile):
    f = msgpack.unpackb(keyfile)
    for change, error in [
        ({"format": "qbackup-keyz"}, IntegrityError),
        ({"version": 2}, IntegrityError),
        ({"kdf": "argon2id"}, IntegrityError),
        ({"n": 2**15}, BadPassphrase),
        ({"r": 7}, BadPassphrase),
        ({"p": 2}, BadPassphrase),
        ({"salt": flip(f["salt"])}, BadPassphrase),
        ({"nonce": flip(f["nonce"])}, BadPassphrase),
        ({"box": flip(f["box"], 3)}, BadPassphrase),
        ({"box": flip(f["box"], len(f["box"]) - 1)}, BadPassphrase),
        ({"box": f["box"][:-1]}, BadPassphrase),
        ({"box": b""}, BadPassphrase),
        ({"salt": None}, IntegrityError),
        ({"extra": 1}, IntegrityError),
        ({"version": "1"}, IntegrityError),
        ({"box": "text"}, IntegrityError),
        ({"salt": f["salt"][:15]}, IntegrityError),
        ({"nonce": f["nonce"] + b"x"}, IntegrityError),
    ]:
        with pytest.raises(error):
            unwrap_keys(tampered(keyfile, **change), b"correct horse")
    for garbage in (b"", b"\xc1", keyfile + b"\x00", msgpack.packb([1, 2]), bytes(70_000),
                    msgpack.packb({1: 2})):
        with pytest.raises(IntegrityError):
            unwrap_keys(garbage, b"correct horse")


@pytest.mark.parametrize("change", [
    {"n": 2**40}, {"n": 2**23}, {"n": 2**13}, {"n": 3 * 2**14}, {"n": 0}, {"n": -(2**17)},
    {"r": 0}, {"r": 33}, {"p": 0}, {"p": 17}, {"n": 2**20, "r": 16},
    {"n": 2**20, "r": 8, "p": 16}, {"n": True}, {"n": 2.0**17}, {"r": "8"},
    {"salt": b""}, {"salt": b"s" * 1000}, {"salt": b"s" * 5000}, {"salt": "salt" * 4},
])
def test_kdf_bounds_are_checked_before_scrypt_runs(keyfile, monkeypatch, change):
    def forbidden(*args, **kwargs):
        raise AssertionError("scrypt ran on hostile parameters")
    monkeypatch.setattr(crypto.hashlib, "scrypt", forbidden)
    with pytest.raises(IntegrityError, match="key file"):
        unwrap_keys(tampered(keyfile, **change), b"correct horse")


def test_scrypt_runs_with_bounded_memory_on_acceptable_parameters(keyfile, monkeypatch):
    calls = []
    real = hashlib.scrypt

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(crypto.hashlib, "scrypt", spy)
    with pytest.raises(BadPassphrase):
        unwrap_keys(tampered(keyfile, n=2**14, r=32, p=2), b"correct horse")
    assert calls[0]["n"] == 2**14 and calls[0]["maxmem"] <= (1 << 30) + (1 << 20)


def test_authenticated_but_malformed_key_file_content(keyfile):
    f = msgpack.unpackb(keyfile)
    kek = hashlib.scrypt(b"correct horse", salt=f["salt"], n=f["n"], r=f["r"], p=f["p"],
                         maxmem=64 << 20, dklen=32)
    good = {"master": bytes(32), "repo_id": bytes(32), "chunk_size": CHUNK, "created": 0}
    for inner in ({**good, "chunk_size": 1000}, {**good, "master": bytes(31)},
                  {**good, "extra": 1}, {**good, "created": "now"}):
        box = AESGCM(kek).encrypt(f["nonce"], msgpack.packb(inner), crypto.KEYFILE_AD)
        with pytest.raises(IntegrityError, match="key file content"):
            unwrap_keys(tampered(keyfile, box=box), b"correct horse")
    box = AESGCM(kek).encrypt(f["nonce"], msgpack.packb(good), crypto.KEYFILE_AD)
    assert unwrap_keys(tampered(keyfile, box=box), b"correct horse").repo_id == bytes(32)


# --- keyed ids --------------------------------------------------------------------

def test_chunk_ids_are_keyed(keys):
    plain = os.urandom(1000)
    assert keys.chunk_id(plain) == keys.chunk_id(bytes(plain))
    assert keys.chunk_id(plain) != keys.chunk_id(plain + b"\0")
    assert create_keys(CHUNK).chunk_id(plain) != keys.chunk_id(plain)
    assert keys.chunk_id(plain) != hashlib.sha256(plain).digest()
    assert keys.chunk_id(plain) == hmac.new(keys._id_keys[TYPE_DATA], plain, "sha256").digest()
    # A data chunk and a chunk-map node with the same bytes get different ids.
    assert keys.chunk_id(plain, TYPE_TREE) != keys.chunk_id(plain, TYPE_DATA)
    assert len(keys.chunk_id(b"")) == 32 and keys.chunk_id(b"") != crypto.ZERO_ID


# --- blobs ------------------------------------------------------------------------

@pytest.mark.parametrize("name, plain", [
    ("empty", b""), ("one byte", b"x"), ("compressible", b"abcdefgh" * (CHUNK // 8)),
    ("incompressible", os.urandom(CHUNK)), ("zeros", bytes(CHUNK)),
])
@pytest.mark.parametrize("type", [TYPE_DATA, TYPE_TREE])
def test_round_trip(keys, name, plain, type):
    blob_id, blob = seal(keys, plain, type)
    assert open_blob(keys, type, blob_id, blob, CHUNK) == plain
    raw_len = HEADER_LEN + 1 + len(plain) + TAG_LEN
    if name in ("compressible", "zeros"):
        assert len(blob) < raw_len // 10
    else:
        assert len(blob) == raw_len
    blob_id, blob = seal(keys, plain, type, compress=False)
    assert len(blob) == raw_len
    assert open_blob(keys, type, blob_id, blob, CHUNK) == plain


def test_round_trip_max_size():
    keys = create_keys(4 << 20)
    for plain in (os.urandom(4 << 20), b"0123456789abcdef" * (1 << 18)):
        blob_id, blob = seal(keys, plain)
        assert open_blob(keys, TYPE_DATA, blob_id, blob, 4 << 20) == plain
    with pytest.raises(ValueError, match="exceeds"):
        seal(keys, bytes((4 << 20) + 1))


def test_seal_refuses_bad_type_or_id(keys):
    for type, blob_id in ((0, bytes(32)), (4, bytes(32)), (1, bytes(31))):
        with pytest.raises(ValueError):
            Sealer(keys).seal(type, blob_id, b"x")
        with pytest.raises(ValueError):
            open_blob(keys, type, blob_id, bytes(100), 100)


def test_flipped_bit_anywhere_is_detected(keys):
    for plain, compress in ((b"some data " * 10, True), (os.urandom(100), False)):
        blob_id, blob = seal(keys, plain, compress=compress)
        for i in range(len(blob)):
            for bit in range(8):
                bad = blob[:i] + bytes([blob[i] ^ (1 << bit)]) + blob[i + 1:]
                with pytest.raises(IntegrityError):
                    open_blob(keys, TYPE_DATA, blob_id, bad, CHUNK)
        for cut in range(len(blob)):
            with pytest.raises(IntegrityError):
                open_blob(keys, TYPE_DATA, blob_id, blob[:cut], CHUNK)
        with pytest.raises(IntegrityError):
            open_blob(keys, TYPE_DATA, blob_id, blob + b"\0", CHUNK)


def test_blob_cannot_move_to_another_id_type_or_repository(keys):
    blob_id, blob = seal(keys, b"chunk one")
    other_id = keys.chunk_id(b"chunk two")
    with pytest.raises(IntegrityError, match="authentication failed"):
        open_blob(keys, TYPE_DATA, other_id, blob, CHUNK)
    with pytest.raises(IntegrityError, match="authentication failed"):
        open_blob(keys, TYPE_TREE, blob_id, blob, CHUNK)
    with pytest.raises(IntegrityError, match="authentication failed"):
        open_snapshot(keys, blob_id, blob)
    with pytest.raises(IntegrityError, match="authentication failed"):
        open_blob(create_keys(CHUNK), TYPE_DATA, blob_id, blob, CHUNK)
    tree_id, tree = seal(keys, b"tree node", TYPE_TREE)
    with pytest.raises(IntegrityError, match="authentication failed"):
        open_blob(keys, TYPE_DATA, tree_id, tree, CHUNK)
    # Tree nodes and snapshots share the metadata key: only the type in the
    # associated data tells a node served as a snapshot apart.
    with pytest.raises(IntegrityError, match="authentication failed"):
        open_snapshot(keys, tree_id, tree)


def test_data_and_metadata_keys_are_separate(keys):
    """A blob sealed under the data key cannot pass for a chunk-map node even
    with the node's associated data and a plaintext matching its tree id:
    the keys alone must tell them apart."""
    plain = b"qbm1\x00" + os.urandom(64)
    tree_id = keys.chunk_id(plain, TYPE_TREE)
    salt, nonce = os.urandom(16), os.urandom(12)
    sealed = keys._aead(TYPE_DATA, salt).encrypt(nonce, b"\x00" + plain,
                                                 crypto.BLOB_AD + bytes([TYPE_TREE]) + tree_id)
    blob = bytes([crypto.BLOB_VERSION]) + salt + nonce + sealed
    with pytest.raises(IntegrityError, match="authentication failed"):
        open_blob(keys, TYPE_TREE, tree_id, blob, CHUNK)
    assert open_blob(keys, TYPE_TREE, tree_id, seal_body(keys, TYPE_TREE, tree_id, b"\x00" + plain),
                     CHUNK) == plain


def test_plaintext_must_match_its_id(keys):
    wrong_id = keys.chunk_id(b"something else")
    blob = Sealer(keys).seal(TYPE_DATA, wrong_id, b"content")
    with pytest.raises(IntegrityError, match="content does not match its id"):
        open_blob(keys, TYPE_DATA, wrong_id, blob, CHUNK)


def test_snapshots(keys):
    snap_id, other = os.urandom(32), os.urandom(32)
    manifest = b'{"qubes": []}' * 1000
    blob = seal_snapshot(keys, snap_id, manifest)
    assert open_snapshot(keys, snap_id, blob) == manifest
    with pytest.raises(IntegrityError, match="authentication failed"):
        open_snapshot(keys, other, blob)
    with pytest.raises(IntegrityError, match="authentication failed"):
        open_blob(keys, TYPE_TREE, snap_id, blob, CHUNK)
    with pytest.raises(IntegrityError):
        open_snapshot(keys, snap_id, flip(blob, len(blob) // 2))
    assert seal_snapshot(keys, snap_id, manifest)[1:17] != blob[1:17]   # fresh session


def zstd_frame_declaring(size: int, actual: bytes) -> bytes:
    """A zstd frame of `actual` whose header claims `size` bytes."""
    frame = bytearray(zstandard.ZstdCompressor(level=3).compress(actual))
    fhd = frame[4]
    single, dict_flag, fcs_flag = (fhd >> 5) & 1, fhd & 3, fhd >> 6
    offset = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single else 0, 2, 4, 8)[fcs_flag]
    assert width == 4, "the sizes used here need a 4-byte size field"
    struct.pack_into("<I", frame, offset, size)
    return bytes(frame)


def test_decompression_bombs_inside_valid_aead(keys):
    limit = 64 << 10
    big = bytes(64 << 20)
    no_size = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(big)
    cases = [
        (zstandard.ZstdCompressor(level=3).compress(big), "declares size 67108864"),
        (no_size, "declares size -1"),
        (zstd_frame_declaring(limit, bytes(2 * limit)), "bad zstd frame"),
        (zstd_frame_declaring(10, b"a" * 100_000), "bad zstd frame"),
        (zstandard.ZstdCompressor().compress(b"x" * 100) + b"junk", "bad zstd frame"),
        (b"\x28\xb5\x2f\xfd" + bytes(20), "declares size -1"),
        (b"\x28\xb5\x2f\xfd\x20\x05" + b"\xff" * 20, "bad zstd frame"),
        (b"", "bad zstd frame"),
    ]
    tracemalloc.start()
    try:
        for payload, match in cases:
            blob_id = keys.chunk_id(b"whatever")
            blob = seal_body(keys, TYPE_DATA, blob_id, b"\x01" + payload)
            tracemalloc.reset_peak()
            with pytest.raises(IntegrityError, match=match):
                open_blob(keys, TYPE_DATA, blob_id, blob, limit)
            assert tracemalloc.get_traced_memory()[1] < 4 * limit
    finally:
        tracemalloc.stop()


def test_unknown_codec_and_version(keys):
    blob_id = keys.chunk_id(b"x")
    with pytest.raises(IntegrityError, match="unknown codec 2"):
        open_blob(keys, TYPE_DATA, blob_id, seal_body(keys, TYPE_DATA, blob_id, b"\x02x"), 100)
    _, blob = seal(keys, b"x")
    with pytest.raises(IntegrityError, match="unknown blob version 2"):
        open_blob(keys, TYPE_DATA, blob_id, b"\x02" + blob[1:], 100)


def test_raw_blob_over_max_plain_is_refused_before_decrypting(keys, monkeypatch):
    blob_id, blob = seal(keys, os.urandom(1000), compress=False)
    trapped = create_keys(CHUNK)
    trapped.__dict__.update(keys.__dict__)

    def no_decryption(type, salt):
        raise AssertionError("an oversized blob reached the decryption")
    monkeypatch.setattr(trapped, "_aead", no_decryption)
    for size in (len(blob), len(blob) + 1, 1 << 20):
        with pytest.raises(IntegrityError, match=f"size {size} out of bounds"):
            open_blob(trapped, TYPE_DATA, blob_id, blob.ljust(size, b"\0"), 999)
    for size in (0, 45):  # too short to hold a header and a tag
        with pytest.raises(IntegrityError, match=f"size {size} out of bounds"):
            open_blob(trapped, TYPE_DATA, blob_id, blob[:size], 999)
    compressible = b"a" * 1000
    blob_id, blob = seal(keys, compressible)
    with pytest.raises(IntegrityError, match="declares size 1000, limit 999"):
        open_blob(keys, TYPE_DATA, blob_id, blob, 999)


def test_nonces_never_repeat_across_threads(keys):
    sealer = Sealer(keys)
    plains = [b"%d" % i * 50 for i in range(4000)]

    def work(part: int) -> list[tuple[bytes, bytes, bytes]]:
        out = []
        for plain in plains[part::4]:
            blob = sealer.seal(TYPE_DATA, keys.chunk_id(plain), plain)
            out.append((blob[1:17], blob[17:29], plain, blob))
        return out

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = [r for part in pool.map(work, range(4)) for r in part]
    pairs = {(salt, nonce) for salt, nonce, _, _ in results}
    assert len(pairs) == len(plains)
    assert len({salt for salt, _ in pairs}) == 1
    assert sorted(int.from_bytes(n, "big") for _, n in pairs) == list(range(len(plains)))
    for _, _, plain, blob in results[::97]:
        assert open_blob(keys, TYPE_DATA, keys.chunk_id(plain), blob, CHUNK) == plain
    assert Sealer(keys).seal(1, bytes(32), b"")[1:17] != Sealer(keys).seal(1, bytes(32), b"")[1:17]


def test_session_salt_rotates_at_the_limit(keys):
    sealer = Sealer(keys)
    sealer.session_limit = 3
    blobs = [sealer.seal(TYPE_TREE, keys.chunk_id(b"%d" % i, TYPE_TREE), b"%d" % i) for i in range(7)]
    salts = [b[1:17] for b in blobs]
    nonces = [int.from_bytes(b[17:29], "big") for b in blobs]
    assert nonces == [0, 1, 2, 0, 1, 2, 0]
    assert salts[0] == salts[2] != salts[3] == salts[5] != salts[6] != salts[0]
    for i, b in enumerate(blobs):
        assert open_blob(keys, TYPE_TREE, keys.chunk_id(b"%d" % i, TYPE_TREE), b, 10) == b"%d" % i


def test_session_keys_are_cached(keys, keyfile):
    opener = unwrap_keys(keyfile, b"correct horse")
    sealer = Sealer(keys)
    plains = [os.urandom(64) for _ in range(10)]
    blobs = [sealer.seal(TYPE_DATA, keys.chunk_id(p), p) for p in plains]
    for p, b in zip(plains, blobs):
        assert open_blob(opener, TYPE_DATA, opener.chunk_id(p), b, 100) == p
    info = opener._aead.cache_info()
    assert (info.misses, info.hits) == (1, 9)


# --- test vectors (docs/CRYPTO.md §4) --------------------------------------------

VECTOR_KEYS = crypto.Keys(hashlib.sha256(b"qbackup test vector master").digest(),
                          hashlib.sha256(b"qbackup test vector repository").digest(), 64 << 10, 0)
VECTOR_SALT = bytes(range(16))
# 512 random bytes and 30 zeros: the zstd frame is 97..100 % of the plaintext
VECTOR_BAND = hashlib.shake_256(b"qbackup test vector").digest(512) + bytes(30)
VECTOR_TEXT = b"qbackup " * 64
# Sealed under VECTOR_KEYS, session salt VECTOR_SALT, nonces 0, 1, 2:
VECTOR_RAW = bytes.fromhex(  # VECTOR_BAND, codec 0 (raw): what the sealer writes now
    "01000102030405060708090a0b0c0d0e0f00000000000000000000000047333d79304468f917ced6cdfbc9c0"
    "f82c60767f8921d78d045127655a6c7c1a29ad7c23adae77e768e8b38f42e5724b769ced74d6807d759f0125"
    "1ca0b200711dbe9e0ec98b7759502881960de1c9c20167b9dff34e396596abe8fdc09efc13d6a5909d7247a7"
    "cca173fce58c1f7bad642578474de314eb8f34915e97b424864f0f19e6cad54f31050930c92d56e416f9f57a"
    "f2a9d32f89bf24a0f82f865a308cb8a934d70f072ed0730826e542a4b38eb0a083d1a976f741a35870b68a83"
    "d8336b35abf495df67b6030f64476a60c85a3dc74bf66bac7605442dd74b1acc7bd8f67c98d42951d3ef5368"
    "96a43a66f07d2d8c217ba38c53db00106f1321b9dadd139cb33d78c8d715cc7696ac40568979efe3ef89f797"
    "8cc7f5ac76ea8737142a9ba1ce34def37c83033a39c3e1611f0441c4a0441ca359c67c8ffac691093d56f5c0"
    "baac2da8e38099f3a8cfc69012d5a0b8ad7e66a835184af23f378d23e5515a22cb52fbcbfbd3bb497617e29f"
    "e15d3b5c967f51eafe7a76a03b902910979c4d0cfd3a84e1801cd2979d49bbf02ccb8009a2e70a97ee59131c"
    "ef87fcd9b764fd6d14bf4e580a20ae1a672b7acdd946f0c874a38a9a0e808e260cd1df0545d6c43dd4db2ca7"
    "e622026c48bfa88b461faaada2c2f85da822489e4872c535120ebecd2abf1b19734b868a40e424392d71f9fe"
    "b33e4ea9d2f9d9782a3b8d6ff6b7aa24ac872e5498e31f9e518a64c982b7418be384fc968a4c6d63ea75e7d4"
    "6e7dcbb4b474956ea356a163d2332de6")
VECTOR_OLD_ZSTD = bytes.fromhex(  # VECTOR_BAND, codec 1: as sealers before RAW_THRESHOLD wrote it
    "01000102030405060708090a0b0c0d0e0f000000000000000000000001d1a66b5f1e72470aab517c384d29e3"
    "c3da90d8144d4c9c8608c9607de5eceb7d9ef142e6ea9e9fa8bb0b4a5f1f4a372b60d90af377c7b2f17d5020"
    "04e99a2b424e55ae1317ac04c073e3c5ec480a767883f972e48034dfe64e0ff8badd740b07da6be499539f95"
    "d948e300f8d9d954dffcdaefb3a92ff9ac00ceb9e84c5c70598e3917ac52404e29ccd70f3a1b866d84feeb0b"
    "a1fb77e1cd4b4f92635d60b2f14d2eb0b16b14f1a9ec85e722036095921f311393844ea140178698717adfb1"
    "e42c42570aad9b8f535eab07ce30ff74ba56dc890515b7f891d6abc0c25cbb28d1d19085b0acf6cd2b721f49"
    "03b65a90f5efa7784b08b80c2825f347a1e998b09fe628f92280911498121b014c326655995d4518b57a6184"
    "d3c342ed0731a9cbfa103134d71efef5ce1d9712e7a57f82d4f4f7bb0882917db3713163cce47f6e16b94405"
    "82c674759457b465fd191dcec8dc88c8dca4a039fbc0a27a22b4bb6d0dae05e6d476f0dba25326b78c3ed9b7"
    "51ed3a6b0fe518991351a108dda1acc6290b5636165f8ca4d8d335c2b14e6929a8981d554dad49ce7cd1cdb3"
    "ad1a346e30ba5e0aaaa6147fd28f422d956f1f207906f7f0a19a3df834a218a56dd8b18ff7cd2d898d7428dc"
    "a9b419af834337473ccdc690207209f6b61a85ea4d9c90d15c4232d0ec1b8ca04301ea591044af1b555850c8"
    "84bc44526fe156ca08d8655657d2b49f6a84204f8e52e798d4b8bc5e58954b218ddf07df119bb25207308839"
    "ed9936db91a0")
VECTOR_ZSTD = bytes.fromhex(  # VECTOR_TEXT, codec 1
    "01000102030405060708090a0b0c0d0e0f000000000000000000000002972bf2bc30d1afd03fc1f0dde20539"
    "f0ef2a2f9e5cd6eb56fee24d3bdbcf8ca9ae6926455097da9a9ea1")


def test_vectors_open():
    """Pinned blobs of both codecs open, the zstd frame of a chunk now
    stored raw included (blobs written before the 97 % rule)."""
    for blob, plain in ((VECTOR_RAW, VECTOR_BAND), (VECTOR_OLD_ZSTD, VECTOR_BAND),
                        (VECTOR_ZSTD, VECTOR_TEXT)):
        chunk_id = VECTOR_KEYS.chunk_id(plain)
        assert crypto.open_blob(VECTOR_KEYS, crypto.TYPE_DATA, chunk_id, blob, 64 << 10) == plain
    assert VECTOR_KEYS.chunk_id(VECTOR_BAND).hex() == (
        "ca5ca356afdc45872df4454b432da05e438412c50dd4dd8fca6e856f829f1c64")


def test_a_frame_over_the_raw_threshold_is_stored_raw():
    """The sealer stores raw what zstd shrinks by less than 3 %: exactly
    VECTOR_RAW (codec 0, deterministic); the codec byte is inside the AEAD,
    so the backup qube cannot change it (test_flipped_bit_anywhere_is_detected)."""
    frame = zstandard.ZstdCompressor(level=crypto.ZSTD_LEVEL).compress(VECTOR_BAND)
    assert crypto.RAW_THRESHOLD * len(VECTOR_BAND) <= len(frame) < len(VECTOR_BAND)
    sealer = crypto.Sealer(VECTOR_KEYS)
    sealer._salt = VECTOR_SALT
    chunk_id = VECTOR_KEYS.chunk_id(VECTOR_BAND)
    assert sealer.seal(crypto.TYPE_DATA, chunk_id, VECTOR_BAND) == VECTOR_RAW
    assert len(sealer.seal(crypto.TYPE_DATA, VECTOR_KEYS.chunk_id(VECTOR_TEXT), VECTOR_TEXT)) < 100
