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
