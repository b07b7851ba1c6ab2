# SPDX-License-Identifier: GPL-2.0-or-later
"""Keys, keyed chunk ids and sealed blobs (docs/CRYPTO.md, format version 1).

The master key exists in the clear only in dom0's memory; the repository
holds it wrapped by a passphrase (scrypt, then AES-256-GCM). Three subkeys
are derived from it with HKDF-SHA256: one keys the chunk ids (HMAC-SHA256),
one seals data chunks, one seals metadata (chunk-map nodes and snapshots).

Every blob is sealed with AES-256-GCM under a per-session key, derived from
the data or metadata key and a random 16-byte session salt, with a counter
nonce: a (key, nonce) pair can never repeat. The associated data binds the
blob to its type and id, and after decryption the keyed id of the plaintext
is recomputed, so a blob cannot be moved, swapped or forged.
"""

import functools
import hashlib
import hmac
import os
import threading
import time

import msgpack
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import BadPassphrase, IntegrityError

ZERO_ID = bytes(32)  # id used in chunk maps for all-zero chunks
KEY_LEN = ID_LEN = 32
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 64 << 10, 4 << 20

# Blob types: the daemon stores them as opaque small integers.
TYPE_DATA, TYPE_TREE, TYPE_SNAPSHOT = 1, 2, 3
CONTENT_ADDRESSED = (TYPE_DATA, TYPE_TREE)   # id == chunk_id(plaintext)
MAX_PLAIN = 4 << 20                          # largest plaintext seal() accepts

# Blob layout: version | session salt | nonce | AES-256-GCM ciphertext + tag.
BLOB_VERSION = 1
SALT_LEN, NONCE_LEN, TAG_LEN = 16, 12, 16
HEADER_LEN = 1 + SALT_LEN + NONCE_LEN
BLOB_AD = b"qbackup blob v1"
CODEC_RAW, CODEC_ZSTD = 0, 1
ZSTD_LEVEL = 1  # chosen by bench/bench_compress.py (bench/README.md)
# A frame not smaller than this fraction of the plaintext is not worth
# decompressing on every restore: the plaintext is stored raw (bench/README.md).
RAW_THRESHOLD = 0.97
MAX_ZSTD_WINDOW = 8 << 20
SESSION_LIMIT = 1 << 32   # blobs per session key, then a new salt

# Key file.
KEYFILE_FORMAT, KEYFILE_VERSION = "qbackup-keys", 1
KEYFILE_AD = b"qbackup key file v1"
MAX_KEYFILE = 64 << 10
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
MIN_SCRYPT_N, MAX_SCRYPT_N, MAX_SCRYPT_R, MAX_SCRYPT_P = 2**14, 2**22, 32, 16
MAX_SCRYPT_MEM = 1 << 30             # 128 * n * r bytes
MAX_SCRYPT_WORK = 2**24              # n * r * p (default: 2**20)
# The largest cost a new wrapping may choose (--scrypt-n): with the default r
# and p, the work and memory bounds above limit n further.
MAX_CHOSEN_SCRYPT_N = min(MAX_SCRYPT_N, MAX_SCRYPT_WORK // (SCRYPT_R * SCRYPT_P),
                          MAX_SCRYPT_MEM // (128 * SCRYPT_R))
SCRYPT_SALT_LEN = 16
BAD_PASSPHRASE = "wrong passphrase or corrupted key file"

_LABEL_ID, _LABEL_TREE_ID = b"qbackup v1 chunk-id", b"qbackup v1 tree-id"
_LABEL_DATA, _LABEL_META = b"qbackup v1 data", b"qbackup v1 meta"
_LABEL_SESSION = b"qbackup v1 session"
_tls = threading.local()   # zstd contexts are not thread-safe: one per thread


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=salt, info=info).derive(key)


def _check_chunk_size(chunk_size: int) -> None:
    if (type(chunk_size) is not int or chunk_size & (chunk_size - 1)
            or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE):
        raise ValueError(f"chunk size must be a power of two in {MIN_CHUNK_SIZE}.."
                         f"{MAX_CHUNK_SIZE}, not {chunk_size}")


class Keys:
    """A repository's keys: chunk-id, data and metadata subkeys of the master."""

    def __init__(self, master: bytes, repo_id: bytes, chunk_size: int, created: int):
        if len(master) != KEY_LEN or len(repo_id) != ID_LEN:
            raise ValueError("master key and repository id must be 32 bytes")
        _check_chunk_size(chunk_size)
        self._master = master
        self.repo_id, self.chunk_size, self.created = repo_id, chunk_size, created
        # Data chunks and chunk-map nodes are keyed apart, so a data chunk that
        # happened to equal a node's plaintext could never share its id.
        self._id_keys = {TYPE_DATA: _hkdf(master, repo_id, _LABEL_ID),
                         TYPE_TREE: _hkdf(master, repo_id, _LABEL_TREE_ID)}
        self._kind_keys = {TYPE_DATA: _hkdf(master, repo_id, _LABEL_DATA),
                           TYPE_TREE: _hkdf(master, repo_id, _LABEL_META)}
        self._kind_keys[TYPE_SNAPSHOT] = self._kind_keys[TYPE_TREE]
        # Cached, so opening many blobs of one session runs HKDF once.
        self._aead = functools.lru_cache(maxsize=64)(self._derive_aead)

    def __repr__(self) -> str:
        return f"Keys(repo_id={self.repo_id.hex()}, chunk_size={self.chunk_size})"

    def chunk_id(self, plaintext: bytes, type: int = TYPE_DATA) -> bytes:
        """Keyed id: HMAC-SHA256 of the plaintext under the id key of its type
        (data chunk or chunk-map node)."""
        return hmac.digest(self._id_keys[type], plaintext, "sha256")

    def _derive_aead(self, type: int, salt: bytes) -> AESGCM:
        """The AEAD of one sealing session for blobs of this type."""
        return AESGCM(_hkdf(self._kind_keys[type], salt, _LABEL_SESSION))


def create_keys(chunk_size: int) -> Keys:
    """Fresh random master key and repository id."""
    return Keys(os.urandom(KEY_LEN), os.urandom(ID_LEN), chunk_size, int(time.time()))


# --- key file -------------------------------------------------------------------

def _scrypt(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p,
                          maxmem=MAX_SCRYPT_MEM + (1 << 20), dklen=KEY_LEN)


def _scrypt_ok(n: int, r: int, p: int) -> bool:
    """False for parameters that would make scrypt run too long or use too much memory."""
    return (n & (n - 1) == 0 and MIN_SCRYPT_N <= n <= MAX_SCRYPT_N and 1 <= r <= MAX_SCRYPT_R
            and 1 <= p <= MAX_SCRYPT_P and 128 * n * r <= MAX_SCRYPT_MEM
            and n * r * p <= MAX_SCRYPT_WORK)


def wrap_keys(keys: Keys, passphrase: bytes, *, scrypt_n: int = SCRYPT_N) -> bytes:
    """The key file (the repository's opaque client config): keys under a passphrase."""
    if not passphrase:
        raise ValueError("empty passphrase")
    if not _scrypt_ok(scrypt_n, SCRYPT_R, SCRYPT_P):
        raise ValueError(f"scrypt n={scrypt_n} out of bounds")
    salt, nonce = os.urandom(SCRYPT_SALT_LEN), os.urandom(NONCE_LEN)
    kek = _scrypt(passphrase, salt, scrypt_n, SCRYPT_R, SCRYPT_P)
    inner = msgpack.packb({"master": keys._master, "repo_id": keys.repo_id,
                           "chunk_size": keys.chunk_size, "created": keys.created})
    return msgpack.packb({
        "format": KEYFILE_FORMAT, "version": KEYFILE_VERSION,
        "kdf": "scrypt", "n": scrypt_n, "r": SCRYPT_R, "p": SCRYPT_P, "salt": salt,
        "nonce": nonce, "box": AESGCM(kek).encrypt(nonce, inner, KEYFILE_AD)})


def _unpack_map(untrusted_data: bytes, fields: dict[str, type], what: str) -> dict:
    """A msgpack map with exactly these fields of these types (small limits)."""
    try:
        untrusted_map = msgpack.unpackb(
            untrusted_data, raw=False, strict_map_key=True, max_str_len=64,
            max_bin_len=1024, max_array_len=0, max_map_len=16, max_ext_len=0)
    except (ValueError, TypeError):
        raise IntegrityError(f"{what}: not a valid msgpack map") from None
    if type(untrusted_map) is not dict or set(untrusted_map) != set(fields):
        raise IntegrityError(f"{what}: missing or unknown fields")
    for name, kind in fields.items():
        if type(untrusted_map[name]) is not kind:
            raise IntegrityError(f"{what}: field {name} is not {kind.__name__}")
    return untrusted_map


def unwrap_keys(untrusted_config: bytes, passphrase: bytes) -> Keys:
    """Open a key file; BadPassphrase if the passphrase (or the box) is wrong."""
    if len(untrusted_config) > MAX_KEYFILE:
        raise IntegrityError(f"key file larger than {MAX_KEYFILE} bytes")
    f = _unpack_map(untrusted_config, {
        "format": str, "version": int, "kdf": str, "n": int, "r": int, "p": int,
        "salt": bytes, "nonce": bytes, "box": bytes}, "key file")
    if f["format"] != KEYFILE_FORMAT or f["version"] != KEYFILE_VERSION or f["kdf"] != "scrypt":
        raise IntegrityError("key file: unknown format, version or kdf")
    if len(f["salt"]) != SCRYPT_SALT_LEN or len(f["nonce"]) != NONCE_LEN:
        raise IntegrityError("key file: bad salt or nonce length")
    if not _scrypt_ok(f["n"], f["r"], f["p"]):   # checked before scrypt runs
        raise IntegrityError(f"key file: scrypt parameters n={f['n']} r={f['r']} p={f['p']} "
                             "out of bounds")
    kek = _scrypt(passphrase, f["salt"], f["n"], f["r"], f["p"])
    try:
        inner = AESGCM(kek).decrypt(f["nonce"], f["box"], KEYFILE_AD)
    except InvalidTag:
        raise BadPassphrase(BAD_PASSPHRASE) from None
    k = _unpack_map(inner, {"master": bytes, "repo_id": bytes, "chunk_size": int,
                            "created": int}, "key file content")
    try:
        return Keys(k["master"], k["repo_id"], k["chunk_size"], k["created"])
    except ValueError as exc:
        raise IntegrityError(f"key file content: {exc}") from None


# --- blobs ----------------------------------------------------------------------

def _check_type_id(type: int, id: bytes) -> None:
    if type not in (TYPE_DATA, TYPE_TREE, TYPE_SNAPSHOT) or len(id) != ID_LEN:
        raise ValueError(f"blob type must be 1..3 and id {ID_LEN} bytes")


def _ad(type: int, id: bytes) -> bytes:
    return BLOB_AD + bytes((type,)) + id


def _compressor() -> zstandard.ZstdCompressor:
    if not hasattr(_tls, "cctx"):
        _tls.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return _tls.cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_tls, "dctx"):
        _tls.dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
    return _tls.dctx


class Sealer:
    """Seals blobs for one backup session; thread-safe.

    Each Sealer draws a random session salt (a fresh session key per blob
    type) and numbers its nonces with a counter under a lock, so no nonce
    is used twice with one key; after SESSION_LIMIT blobs it draws a new salt.
    """

    session_limit = SESSION_LIMIT

    def __init__(self, keys: Keys):
        self._keys = keys
        self._lock = threading.Lock()
        self._salt, self._counter = os.urandom(SALT_LEN), 0

    def _next_nonce(self) -> tuple[bytes, bytes]:
        with self._lock:
            if self._counter >= self.session_limit:
                self._salt, self._counter = os.urandom(SALT_LEN), 0
            salt, counter = self._salt, self._counter
            self._counter += 1
        return salt, counter.to_bytes(NONCE_LEN, "big")

    def seal(self, type: int, id: bytes, plaintext: bytes, compress: bool = True) -> bytes:
        """The blob for `plaintext` under `type` and `id` (for data and tree blobs,
        `id` must be keys.chunk_id(plaintext): open_blob checks it)."""
        _check_type_id(type, id)
        if len(plaintext) > MAX_PLAIN:
            raise ValueError(f"plaintext of {len(plaintext)} bytes exceeds {MAX_PLAIN}")
        body = None
        if compress:
            packed = _compressor().compress(plaintext)
            if len(packed) < RAW_THRESHOLD * len(plaintext):
                body = bytes((CODEC_ZSTD,)) + packed
        if body is None:
            body = bytes((CODEC_RAW,)) + plaintext
        salt, nonce = self._next_nonce()
        sealed = self._keys._aead(type, salt).encrypt(nonce, body, _ad(type, id))
        return bytes((BLOB_VERSION,)) + salt + nonce + sealed


def max_blob_size(max_plain: int) -> int:
    """The largest blob that can open to at most `max_plain` bytes."""
    return HEADER_LEN + 1 + max_plain + TAG_LEN


def open_blob(keys: Keys, type: int, id: bytes, untrusted_blob: bytes, max_plain: int) -> bytes:
    """Authenticate, decrypt, decompress (at most `max_plain` bytes) and, for data
    and tree blobs, check the plaintext's keyed id; IntegrityError on any failure."""
    _check_type_id(type, id)
    what = f"blob {id.hex()[:16]} (type {type})"
    size = len(untrusted_blob)
    if not max_blob_size(0) <= size <= max_blob_size(max_plain):
        raise IntegrityError(f"{what}: size {size} out of bounds")
    if untrusted_blob[0] != BLOB_VERSION:
        raise IntegrityError(f"{what}: unknown blob version {untrusted_blob[0]}")
    salt = bytes(untrusted_blob[1:1 + SALT_LEN])
    nonce = bytes(untrusted_blob[1 + SALT_LEN:HEADER_LEN])
    # One copy of the ciphertext: cryptography 37 (Qubes R4.2 dom0) takes only
    # bytes here, not a memoryview (measured: ~11 us per 256 KiB, about 3% of
    # opening an incompressible chunk, 0.5% of a compressed one).
    sealed = bytes(memoryview(untrusted_blob)[HEADER_LEN:])
    try:
        body = keys._aead(type, salt).decrypt(nonce, sealed, _ad(type, id))
    except InvalidTag:
        raise IntegrityError(f"{what}: authentication failed (forged, corrupted "
                             "or stored under another id or type)") from None
    payload = memoryview(body)[1:]
    if body[0] == CODEC_RAW:
        plain = bytes(payload)
    elif body[0] == CODEC_ZSTD:
        plain = _decompress(payload, max_plain, what)
    else:
        raise IntegrityError(f"{what}: unknown codec {body[0]}")
    if type in CONTENT_ADDRESSED and not hmac.compare_digest(keys.chunk_id(plain, type), id):
        raise IntegrityError(f"{what}: content does not match its id")
    return plain


def _decompress(payload: memoryview, max_plain: int, what: str) -> bytes:
    """One zstd frame that declares its size, at most `max_plain`, nothing after it."""
    try:
        # This check is the bound: python-zstandard (0.19 as 0.25) allocates and
        # returns what a frame declares, whatever max_output_size says.
        declared = zstandard.frame_content_size(payload)
        if declared < 0 or declared > max_plain:
            raise IntegrityError(f"{what}: zstd frame declares size {declared}, "
                                 f"limit {max_plain}")
        plain = _decompressor().decompress(payload, max_output_size=max_plain,
                                           allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{what}: bad zstd frame ({exc})") from None
    if len(plain) != declared:
        raise IntegrityError(f"{what}: zstd frame size mismatch")
    return plain


def seal_snapshot(keys: Keys, snapshot_id: bytes, manifest_plain: bytes) -> bytes:
    """A snapshot blob: metadata key, type 3, bound to `snapshot_id`."""
    return Sealer(keys).seal(TYPE_SNAPSHOT, snapshot_id, manifest_plain)


def open_snapshot(keys: Keys, snapshot_id: bytes, untrusted_blob: bytes) -> bytes:
    return open_blob(keys, TYPE_SNAPSHOT, snapshot_id, untrusted_blob, MAX_PLAIN)
