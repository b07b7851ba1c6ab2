# SPDX-License-Identifier: GPL-2.0-or-later
"""Repository storage of the backup-qube daemon.

``Storage`` is a directory of repositories (``ROOT/NAME/``); a ``Repository``
is one opened repository.  The code is blocking: the server calls it from
worker threads, one ``Repository`` object from one thread at a time; several
objects may be open on one repository, in one process or several (one writer,
holding the writer lock, and any number of lock-free readers that see sealed
packs only).

Everything stored is opaque here: blobs, snapshots and the client config are
ciphertext, ids are 32-byte strings, refs are the clear edges a future
garbage collector follows.  Arguments are validated again at this layer
(``BadRequest``/``TooLarge``), and the files on disk are not trusted either:
every size read back is bounded before allocation.  On-disk format and
durability sequences: docs/FORMAT.md.
"""

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import sqlite3
import struct
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import pack
from .fsdir import Dir, UnsafeEntry
from .index import Index, IndexUnusable, is_corruption
from .lock import LockBusy, WriterLock

STORAGE_FORMAT = 1
ID_SIZE = 32
MAX_BLOB = 4 * 2**20 + 64 * 2**10
MAX_SNAPSHOT = 4 * 2**20
MAX_CONFIG = 64 * 2**10
MIN_PACK_SIZE = 8 * 2**20
MAX_PACK_SIZE = 512 * 2**20
DEFAULT_PACK_SIZE = 64 * 2**20
MAX_BATCH = 4096  # ids per have(), refs per put()
MAX_COMMIT_REFS = 65536  # refs per snapshot
MAX_LISTED_MISSING = 64  # ids named by a MissingRefs error
_OPEN_PACKS = 16  # pack file descriptors a Repository keeps open for get()
# Ids a writer session remembers HAVE reported missing (and not stored since):
# a put of one of them needs no index lookup. 32-byte ids: a few MiB at most.
_TOLD_MISSING = 1 << 16

# locate(): a blob's sort key is its pack's row number in the index times 2**32
# (record offsets stay below: packs are at most 512 MiB and one blob over) plus
# its record's offset; the writer's open pack comes after every sealed one.
_OFFSET_BITS = 32
_OPEN_PACK = (1 << 31) - 1
NOT_HELD = (1 << 63) - 1

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SHARD_RE = re.compile(r"[0-9a-f]{2}")
_PACK_NAME_RE = re.compile(r"[0-9a-f]{32}")
_SNAPSHOT_NAME_RE = re.compile(r"[0-9a-f]{64}")

_CONFIG_MAGIC = b"QBKREPO\x00"
_CONFIG_HEAD = struct.Struct(">8sIQI")  # magic, format, pack size, client config length
_SNAPSHOT_MAGIC = b"QBKSNAP\x00"
_SNAPSHOT_HEAD = struct.Struct(">8sI32sQII")  # magic, format, id, time, data length, ref count
_DIGEST = 32  # SHA-256 closing the config and snapshot files
_MAX_CONFIG_FILE = _CONFIG_HEAD.size + MAX_CONFIG + _DIGEST
_MAX_SNAPSHOT_FILE = _SNAPSHOT_HEAD.size + MAX_SNAPSHOT + MAX_COMMIT_REFS * ID_SIZE + _DIGEST

log = logging.getLogger(__name__)


class StorageError(Exception):
    """A storage operation failed; ``code`` is its protocol error code (PROTOCOL.md §6)."""

    code = "io"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class NotFound(StorageError):
    """Unknown snapshot ("not_found") or repository ("no_repository")."""

    code = "not_found"


class Exists(StorageError):
    code = "exists"


class Locked(StorageError):
    """Another writer holds the repository; ``holder`` = {pid, holder, time} or {}."""

    code = "locked"

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


class MissingRefs(StorageError):
    """Referenced ids not held; ``ids`` lists at most MAX_LISTED_MISSING of them."""

    code = "missing_refs"

    def __init__(self, ids: list[bytes]):
        super().__init__(f"{len(ids)} referenced ids are not in the repository (first: {ids[0].hex()})")
        self.ids = ids[:MAX_LISTED_MISSING]


class Conflict(StorageError):
    code = "conflict"


class ReadOnly(StorageError):
    code = "read_only"


class BadRequest(StorageError):
    code = "bad_request"


class TooLarge(StorageError):
    code = "too_large"


class BadRepoName(StorageError):
    code = "bad_repo_name"


class Corrupt(StorageError):
    """A file of the repository is damaged (bad checksum, bounds, layout)."""

    code = "io"


# --- argument validation -------------------------------------------------------


def _check_id(value: object, what: str) -> None:
    if type(value) is not bytes or len(value) != ID_SIZE:
        raise BadRequest(f"{what} must be {ID_SIZE} bytes")


def _check_ids(values: object, limit: int, what: str) -> None:
    if not isinstance(values, (list, tuple)):
        raise BadRequest(f"{what} must be a list of ids")
    if len(values) > limit:
        raise BadRequest(f"{len(values)} {what}, over the limit of {limit}")
    for value in values:
        _check_id(value, f"each of {what}")


def _check_data(value: object, limit: int, what: str) -> None:
    if type(value) is not bytes:
        raise BadRequest(f"{what} must be bytes")
    if len(value) > limit:
        raise TooLarge(f"{what} of {len(value)} bytes is over the limit of {limit}")


def _check_type(value: object) -> None:
    if type(value) is not int or not 0 <= value <= 255:
        raise BadRequest("blob type must be an integer 0..255")


def _check_pack_size(value: object) -> None:
    if type(value) is not int or not MIN_PACK_SIZE <= value <= MAX_PACK_SIZE:
        raise BadRequest(f"pack size must be an integer {MIN_PACK_SIZE}..{MAX_PACK_SIZE}")


# --- files ---------------------------------------------------------------------

CONFIG = "config"
LOCK = "lock"
INDEX = "index.sqlite"
INDEX_FILES = (INDEX, INDEX + "-wal", INDEX + "-shm", INDEX + "-journal")


class _Tree:
    """The opened directories of one repository (docs/FORMAT.md §1).

    Every file below them is opened relative to these descriptors and never
    through a symbolic link (``fsdir``): a link, FIFO or hard link planted in
    the tree is refused, not followed.
    """

    def __init__(self, dir: Dir):
        self.dir = dir
        self.packs = self.staging = self.snapshots = None
        try:
            self.packs = dir.sub("packs")
            self.staging = dir.sub("staging")
            self.snapshots = dir.sub("snapshots")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for d in (self.packs, self.staging, self.snapshots, self.dir):
            if d is not None:
                d.close()

    @property
    def index(self) -> Path:
        """The index's path: SQLite opens its files by name (checked first, ``check_index_files``)."""
        return Path(self.dir.join(INDEX))

    def check_index_files(self) -> None:
        """Refuse a symlink, special file or hard link among SQLite's files."""
        for name in INDEX_FILES:
            self.dir.check_file(name)

    def shard(self, pack_name: str, create: bool = False) -> Dir:
        """The directory ``packs/XX`` of a pack (made, and packs/ fsynced, if ``create``)."""
        shard = pack_name[:2]
        if create and not self.packs.exists(shard):
            with contextlib.suppress(FileExistsError):
                self.packs.mkdir(shard)
            _fsync_dir(self.packs)
        return self.packs.sub(shard)

    def open_pack(self, name: str) -> int:
        """A read-only fd of a sealed pack (``FileNotFoundError`` if it is gone)."""
        with self.shard(name) as shard:
            return shard.open_file(f"{name}.pack")


def snapshot_name(id: bytes) -> str:
    return id.hex()


@dataclass(frozen=True)
class _Config:
    format: int
    pack_size: int
    client: bytes  # the opaque client config


def _fsync_dir(directory: Dir) -> None:
    directory.fsync()


def _replace_atomically(staging: Dir, final: Dir, name: str, data: bytes) -> None:
    """Temp file in staging, fsync, rename over ``final/name``, fsync ``final``."""
    tmp = f"{secrets.token_hex(8)}.tmp"
    try:
        staging.write_new(tmp, data)
        staging.replace(tmp, final, name)
    except BaseException:
        with contextlib.suppress(OSError):
            staging.unlink(tmp)
        raise
    _fsync_dir(final)


def _read_bounded(directory: Dir, name: str, limit: int, what: str) -> bytes:
    data, size = directory.read_bounded(name, limit)
    if size > limit:
        raise Corrupt(f"{what}: {size} bytes, over the limit of {limit}")
    if len(data) > limit:
        raise Corrupt(f"{what}: grew over the limit of {limit} bytes")
    return data


def _sealed(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def _unseal(raw: bytes, what: str) -> bytes:
    body = raw[:-_DIGEST]
    if hashlib.sha256(body).digest() != raw[-_DIGEST:]:
        raise Corrupt(f"{what}: checksum mismatch (SHA-256)")
    return body


def _encode_config(pack_size: int, client: bytes) -> bytes:
    return _sealed(_CONFIG_HEAD.pack(_CONFIG_MAGIC, STORAGE_FORMAT, pack_size, len(client)) + client)


def _decode_config(raw: bytes) -> _Config:
    what = "config file"
    if len(raw) < _CONFIG_HEAD.size + _DIGEST:
        raise Corrupt(f"{what}: truncated ({len(raw)} bytes)")
    magic, fmt, pack_size, length = _CONFIG_HEAD.unpack_from(raw)
    if magic != _CONFIG_MAGIC:
        raise Corrupt(f"{what}: bad magic")
    if fmt != STORAGE_FORMAT:
        raise Corrupt(f"{what}: unsupported storage format {fmt}")
    if length != len(raw) - _CONFIG_HEAD.size - _DIGEST:
        raise Corrupt(f"{what}: config length {length} does not match the file size")
    body = _unseal(raw, what)
    if not MIN_PACK_SIZE <= pack_size <= MAX_PACK_SIZE:
        raise Corrupt(f"{what}: pack size {pack_size} out of bounds")
    return _Config(fmt, pack_size, body[_CONFIG_HEAD.size :])


def _read_config(tree: _Tree) -> _Config:
    return _decode_config(_read_bounded(tree.dir, CONFIG, _MAX_CONFIG_FILE, "config file"))


def _encode_snapshot(id: bytes, when: int, data: bytes, refs: Sequence[bytes]) -> bytes:
    head = _SNAPSHOT_HEAD.pack(_SNAPSHOT_MAGIC, STORAGE_FORMAT, id, when, len(data), len(refs))
    return _sealed(head + data + b"".join(refs))


def _snapshot_head(raw: bytes, id: bytes, file_size: int) -> tuple[int, int, int]:
    """Check a snapshot file's header against its name and size: (time, data length, ref count)."""
    what = f"snapshot {id.hex()}"
    if len(raw) < _SNAPSHOT_HEAD.size:
        raise Corrupt(f"{what}: truncated ({len(raw)} bytes)")
    magic, fmt, got_id, when, length, nrefs = _SNAPSHOT_HEAD.unpack_from(raw)
    if magic != _SNAPSHOT_MAGIC or fmt != STORAGE_FORMAT:
        raise Corrupt(f"{what}: bad magic or format")
    if got_id != id:
        raise Corrupt(f"{what}: file holds snapshot {got_id.hex()}")
    if length > MAX_SNAPSHOT or nrefs > MAX_COMMIT_REFS:
        raise Corrupt(f"{what}: sizes out of bounds")
    if file_size != _SNAPSHOT_HEAD.size + length + nrefs * ID_SIZE + _DIGEST:
        raise Corrupt(f"{what}: file size {file_size} does not match its header")
    return when, length, nrefs


def _decode_snapshot(raw: bytes, id: bytes) -> tuple[bytes, list[bytes]]:
    _, length, nrefs = _snapshot_head(raw, id, len(raw))
    body = _unseal(raw, f"snapshot {id.hex()}")
    start = _SNAPSHOT_HEAD.size + length
    return body[_SNAPSHOT_HEAD.size : start], _split_ids(body[start:])


def _read_snapshot_head(tree: _Tree, id: bytes) -> tuple[int, int, int]:
    fd = tree.snapshots.open_file(snapshot_name(id))
    try:
        return _snapshot_head(os.pread(fd, _SNAPSHOT_HEAD.size, 0), id, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def read_snapshot(tree: _Tree, id: bytes) -> tuple[bytes, list[bytes]]:
    """(data, refs) of a snapshot file; ``FileNotFoundError`` if absent, ``Corrupt`` if damaged."""
    name = snapshot_name(id)
    return _decode_snapshot(_read_bounded(tree.snapshots, name, _MAX_SNAPSHOT_FILE, f"snapshot {name}"), id)


def snapshot_ids(tree: _Tree) -> tuple[list[bytes], list[str]]:
    """Ids of the snapshot files (sorted), and the names of anything else in snapshots/."""
    ids, unexpected = [], []
    for name, _ in sorted(tree.snapshots.names()):
        if _SNAPSHOT_NAME_RE.fullmatch(name):
            ids.append(bytes.fromhex(name))
        else:
            unexpected.append(name)
    return ids, unexpected


def _split_ids(raw: bytes) -> list[bytes]:
    return [raw[i : i + ID_SIZE] for i in range(0, len(raw), ID_SIZE)]


def _show(value: object) -> str:
    """An id (or whatever a damaged index holds instead) for a one-line message."""
    return value.hex() if isinstance(value, bytes) else ascii(value)


def _bounds(pack_size: int) -> pack.Bounds:
    """What a pack of a repository with this pack size may hold at most."""
    last_blob = pack.RECORD_HEADER_SIZE + MAX_BLOB + pack.ENTRY_SIZE + MAX_BATCH * ID_SIZE
    return pack.Bounds(max_data=MAX_BLOB, max_refs=MAX_BATCH, max_file=pack_size + last_blob)


def scan_packs(tree: _Tree) -> tuple[list[str], list[str]]:
    """Names of the pack files on disk (sorted), and anything else found under packs/."""
    found: list[str] = []
    unexpected: list[str] = []
    for shard, is_dir in sorted(tree.packs.names()):
        if not (_SHARD_RE.fullmatch(shard) and is_dir):
            unexpected.append(f"packs/{shard!a}")
            continue
        try:
            entries = tree.packs.sub(shard)
        except UnsafeEntry:  # replaced by a link since it was listed
            unexpected.append(f"packs/{shard!a}")
            continue
        with entries:
            for file, is_dir in sorted(entries.names()):
                name = file.removesuffix(".pack")
                well_named = file.endswith(".pack") and _PACK_NAME_RE.fullmatch(name) and name.startswith(shard)
                if well_named and not is_dir:
                    found.append(name)
                else:
                    unexpected.append(f"packs/{shard}/{file!a}")
    return found, unexpected


def _pack_to_index(tree: _Tree, name: str, bounds: pack.Bounds, synced: set[str]) -> pack.Trailer:
    """Read a pack found under packs/ for indexing, and make it durable first.

    A writer killed between its rename and the fsync of the shard directory
    leaves a pack whose name may not survive a power loss; the index must never
    name such a pack.  So fsync the file (cheap: a pack this daemon sealed is
    clean already), its shard directory and packs/ (each once per ``synced``).
    """
    with tree.shard(name) as shard:
        fd = shard.open_file(f"{name}.pack")
        try:
            trailer = pack.read_trailer(fd, bounds)
            os.fsync(fd)
        finally:
            os.close(fd)
        if shard.path not in synced:
            _fsync_dir(shard)
            synced.add(shard.path)
    if tree.packs.path not in synced:
        _fsync_dir(tree.packs)
        synced.add(tree.packs.path)
    return trailer


def install_pack(tree: _Tree, writer: pack.PackWriter) -> pack.Trailer:
    """Seal a pack written in a staging directory and move it into place, durably.

    Trailer and footer, fsync, rename into ``packs/XX/``, fsync that
    directory (FORMAT.md §8 steps 1-5).  The caller indexes it.  A failure
    before the rename removes the staging file.
    """
    name = writer.name.removesuffix(".tmp")
    try:
        trailer = writer.seal()
        shard = tree.shard(name, create=True)
    except BaseException:
        writer.abort()
        raise
    with shard:
        try:
            writer.directory.rename(writer.name, shard, f"{name}.pack")
        except BaseException:
            writer.abort()
            raise
        # From here the pack is in place; if what follows fails, the next
        # writer to open the repository indexes it from its trailer.
        _fsync_dir(shard)
    return trailer


def _clear_staging(tree: _Tree) -> None:
    """Remove what a dead writer left in staging (caller holds the writer lock)."""
    for name, is_dir in tree.staging.names():
        if not is_dir:
            tree.staging.unlink(name)  # a link is removed itself, never followed
            log.info("removed leftover staging file %s", tree.staging.join(name))


@contextlib.contextmanager
def _io(what: str) -> Iterator[None]:
    """Turn low-level failures into one-line StorageErrors."""
    try:
        yield
    except StorageError:
        raise
    except pack.PackError as e:
        raise Corrupt(f"{what}: {e}") from e
    except sqlite3.Error as e:
        hint = " (run `qbackupd reindex`)" if is_corruption(e) else ""
        raise StorageError(f"{what}: index error: {e}{hint}") from e
    except OSError as e:
        raise StorageError(f"{what}: {e}") from e


# --- index maintenance ---------------------------------------------------------


def _rebuild(name: str, tree: _Tree, bounds: pack.Bounds) -> tuple[Index, dict]:
    """Build a new index from the pack trailers alone (caller holds the writer lock)."""
    tree.check_index_files()
    index = Index.create(tree.index)
    try:
        names, _ = scan_packs(tree)
        packs = blobs = bad = 0
        synced: set[str] = set()
        for pack_name in names:
            try:
                trailer = _pack_to_index(tree, pack_name, bounds, synced)
            except (pack.PackError, OSError) as e:
                bad += 1
                log.warning("repository %s: skipping pack %s: %s", name, pack_name, e)
                continue
            blobs += index.add_pack(pack_name, trailer.file_size, trailer.entries)
            packs += 1
        dropped = drop_incomplete(index, index.iter_refs)
        if dropped:
            log.warning("repository %s: %d blobs left out of the index: they reference ids no pack holds",
                        name, dropped)
        index.mark_complete()
    except BaseException:
        index.close()
        raise
    return index, {"packs": packs, "blobs": blobs, "bad_packs": bad}


def drop_incomplete(index: Index, candidates: Callable[[], Iterable[tuple[bytes, bytes]]]) -> int:
    """Unindex the blobs among ``candidates()`` (id, refs) whose refs are not all indexed.

    The index never names a blob whose refs it does not all name (FORMAT.md
    §6): a client that is told such a blob exists would build a new
    snapshot on an incomplete tree.  Unindexing one may leave another
    incomplete, so this repeats until nothing changes.  Returns how many.
    """
    dropped = 0
    while True:
        bad = [id for id, refs in candidates() if index.missing(_split_ids(refs))]
        if not bad:
            return dropped
        index.remove_blobs(bad)
        dropped += len(bad)


def recover_orphans(name: str, tree: _Tree, index: Index, bounds: pack.Bounds) -> None:
    """Index sealed packs that a dead writer renamed into place but never indexed."""
    names, _ = scan_packs(tree)
    indexed = index.packs()
    synced: set[str] = set()
    for pack_name in names:
        if pack_name in indexed:
            continue
        try:
            trailer = _pack_to_index(tree, pack_name, bounds, synced)
        except (pack.PackError, OSError) as e:
            log.warning("repository %s: pack %s is not indexed and cannot be: %s", name, pack_name, e)
            continue
        index.add_pack(pack_name, trailer.file_size, trailer.entries)
        dropped = drop_incomplete(index, lambda: index.pack_nodes(pack_name))
        log.info("repository %s: re-indexed pack %s from its trailer", name, pack_name)
        if dropped:
            log.warning("repository %s: %d blobs of pack %s reference ids no pack holds: not indexed",
                        name, dropped, pack_name)


def open_index(tree: _Tree) -> Index:
    """Open the existing index (``IndexUnusable`` if it cannot be used)."""
    tree.check_index_files()
    return Index.open(tree.index)


def _writer_index(name: str, tree: _Tree, bounds: pack.Bounds) -> Index:
    """Open the index for a writer: rebuild it if unusable, else add orphan packs."""
    try:
        index = open_index(tree)
    except IndexUnusable as e:
        problem = str(e)
    else:
        try:
            problem = index.quick_check()
            if problem is None:
                index.upgrade()
                recover_orphans(name, tree, index, bounds)
                return index
        except BaseException:
            index.close()
            raise
        index.close()
    log.warning("repository %s: index %s; rebuilding it from the packs", name, problem)
    return _rebuild(name, tree, bounds)[0]


# --- public API ----------------------------------------------------------------


class Storage:
    """A directory of repositories, one subdirectory each."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @staticmethod
    def _check_name(name: str) -> None:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
            raise BadRepoName(f"invalid repository name {name!a}")

    def open_tree(self, name: str) -> _Tree:
        """Open an existing repository's directories (``NotFound`` if there is none)."""
        self._check_name(name)
        try:
            root = Dir.open_root(self.root)
        except FileNotFoundError:
            raise NotFound(f"no repository {name!a}", "no_repository") from None
        with root:
            try:
                directory = root.sub(name)
            except (FileNotFoundError, NotADirectoryError):
                raise NotFound(f"no repository {name!a}", "no_repository") from None
        try:
            return _Tree(directory)
        except BaseException:
            directory.close()
            raise

    def names(self) -> list[str]:
        """The repositories stored here, sorted: subdirectories of a valid name
        holding a config file (a symlink, or anything else, is left out)."""
        found = []
        with _io("listing the repositories"), Dir.open_root(self.root) as root:
            for name in sorted(os.listdir(root.fd)):
                if not _NAME_RE.fullmatch(name) or ".." in name:
                    continue
                try:
                    with root.sub(name) as directory:
                        if directory.check_file(CONFIG):
                            found.append(name)
                except (UnsafeEntry, FileNotFoundError):
                    continue
        return found

    def _tree(self, name: str, what: str) -> _Tree:
        with _io(f"{what} repository {name!a}"):
            return self.open_tree(name)

    def create(self, name: str, config: bytes, pack_size: int, holder: str) -> "Repository":
        """Create a repository and return it opened for writing.

        Built in a temporary directory (writer lock already held) and renamed
        into place, so a repository either exists complete or not at all.
        """
        self._check_name(name)
        _check_data(config, MAX_CONFIG, "config")
        _check_pack_size(pack_size)
        with _io(f"cannot create repository {name!a}"):
            self.root.mkdir(parents=True, exist_ok=True)
            with Dir.open_root(self.root) as root:
                if root.exists(name):
                    raise Exists(f"repository {name!a} already exists")
                tmp_name = os.path.basename(tempfile.mkdtemp(prefix=f".create-{name}.", dir=root.path))
                lock = None
                try:
                    with root.sub(tmp_name) as tmp:
                        lock = WriterLock.acquire(tmp, LOCK, holder)
                        for directory in ("packs", "staging", "snapshots"):
                            tmp.mkdir(directory)
                        tmp.write_new(CONFIG, _encode_config(pack_size, config))
                        index = Index.create(Path(tmp.join(INDEX)))
                        index.mark_complete()
                        index.close()
                        _fsync_dir(tmp)
                    try:
                        root.rename(tmp_name, root, name)
                    except OSError as e:
                        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                            raise Exists(f"repository {name!a} already exists") from None
                        raise
                    _fsync_dir(root)
                except BaseException:
                    if lock is not None:
                        lock.release()
                    shutil.rmtree(os.path.join(root.path, tmp_name), ignore_errors=True)
                    raise
        try:
            tree = self._tree(name, "cannot open")
        except BaseException:
            lock.release()
            raise
        return self._open_writer(name, tree, lock)

    def open(self, name: str, write: bool, holder: str) -> "Repository":
        """Open a repository: for writing (takes the writer lock) or for reading (no lock)."""
        if type(write) is not bool:
            raise BadRequest("write must be a boolean")
        tree = self._tree(name, "cannot open")
        if write:
            try:
                lock = _lock(name, tree, holder)
            except BaseException:
                tree.close()
                raise
            return self._open_writer(name, tree, lock)
        try:
            with _io(f"cannot open repository {name!a}"):
                config = _read_config(tree)
                index = self._reader_index(name, tree, config, holder)
        except BaseException:
            tree.close()
            raise
        return Repository(name, tree, config, index, None)

    def _open_writer(self, name: str, tree: _Tree, lock: WriterLock) -> "Repository":
        """Finish opening for writing: the Repository owns ``tree`` and ``lock`` (both released on failure)."""
        try:
            with _io(f"cannot open repository {name!a}"):
                config = _read_config(tree)
                _clear_staging(tree)
                index = _writer_index(name, tree, _bounds(config.pack_size))
        except BaseException:
            tree.close()
            lock.release()
            raise
        return Repository(name, tree, config, index, lock)

    def _reader_index(self, name: str, tree: _Tree, config: _Config, holder: str) -> Index:
        """A reader's index; an unusable one is rebuilt if no writer is at work."""
        try:
            return open_index(tree)
        except IndexUnusable as e:
            problem = str(e)
        try:
            lock = WriterLock.acquire(tree.dir, LOCK, f"{holder} (index rebuild)")
        except LockBusy:
            raise StorageError(
                f"index of repository {name!a} is unusable ({problem}) while a writer is at work; try again"
            ) from None
        try:
            try:
                return open_index(tree)  # a writer may have rebuilt it meanwhile
            except IndexUnusable:
                log.warning("repository %s: index %s; rebuilding it from the packs", name, problem)
                return _rebuild(name, tree, _bounds(config.pack_size))[0]
        finally:
            lock.release()

    def reindex(self, name: str) -> dict:
        """Rebuild the index from the pack trailers alone (no keys).

        Needs the writer lock (``Locked`` if a writer is at work).  Returns
        {"packs": int, "blobs": int, "bad_packs": int}; each unreadable pack
        is skipped with a logged warning (``check`` lists them too).
        """
        tree = self._tree(name, "cannot reindex")
        try:
            lock = _lock(name, tree, f"qbackupd reindex (pid {os.getpid()})")
            try:
                with _io(f"cannot reindex repository {name!a}"):
                    config = _read_config(tree)
                    _clear_staging(tree)
                    index, report = _rebuild(name, tree, _bounds(config.pack_size))
                    index.close()
            finally:
                lock.release()
        finally:
            tree.close()
        return report

    def check(self, name: str, read_data: bool = False, progress=None) -> list[str]:
        """List the problems found in a repository (one line each; [] = healthy); takes no lock.

        ``read_data`` also reads every byte of every pack (each record's
        CRC-32 and the pack's SHA-256).  ``check.check_repository`` gives the
        full report (damaged blobs and the snapshots they affect).
        """
        from .check import check_repository  # check builds on this module

        return check_repository(self, name, read_data=read_data, progress=progress).problems


def _lock(name: str, tree: _Tree, holder: str) -> WriterLock:
    try:
        return WriterLock.acquire(tree.dir, LOCK, holder)
    except LockBusy as e:
        raise Locked(f"repository {name!a} is {e}", e.holder) from None
    except OSError as e:
        raise StorageError(f"cannot lock repository {name!a}: {e}") from e


class Repository:
    """An opened repository; ``write`` says whether it holds the writer lock."""

    def __init__(self, name: str, tree: _Tree, config: _Config, index: Index, lock: WriterLock | None):
        self.name = name
        self.config = config.client
        self.pack_size = config.pack_size
        self.format = config.format
        self.write = lock is not None
        self._tree = tree
        self._index = index
        self._lock = lock
        self._writer: pack.PackWriter | None = None
        self._lost = False  # a pack sealed by put() failed: its blobs are gone
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._closed = False
        self._told_missing: set[bytes] = set()  # see have() and put()

    def __enter__(self) -> "Repository":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self, write: bool = False) -> None:
        if self._closed:
            raise StorageError("repository is closed", "internal")
        if write and not self.write:
            raise ReadOnly(f"repository {self.name!a} is open read-only")

    def _missing(self, ids: Sequence[bytes]) -> list[int]:
        """Indexes of the ids neither in this writer's open pack nor indexed."""
        if self._writer is None:
            return self._index.missing(ids)
        unwritten = [i for i, id in enumerate(ids) if self._writer.find(id) is None]
        if not unwritten:
            return []
        return [unwritten[i] for i in self._index.missing([ids[i] for i in unwritten])]

    def have(self, ids: list[bytes]) -> list[int]:
        """Indexes (ascending) into ``ids`` of the ids the repository does not hold.

        A writer remembers (up to ``_TOLD_MISSING``) the ids it answered
        missing, so that their puts skip the index lookup (``put``).
        """
        self._check_open()
        _check_ids(ids, MAX_BATCH, "ids")
        with _io("have"):
            missing = self._missing(ids)
        if self.write and len(self._told_missing) + len(missing) <= _TOLD_MISSING:
            self._told_missing.update(ids[i] for i in missing)
        return missing

    def locate(self, ids: list[bytes]) -> list[int]:
        """A sort key for each of ``ids``, 0..2**63-1: reading blobs in ascending
        key order reads the packs one after the other, each from its start
        (PROTOCOL §5 ``locate``). ``NOT_HELD`` for an id not held, or whose
        index row is out of bounds (``get`` reports that one)."""
        self._check_open()
        _check_ids(ids, MAX_BATCH, "ids")
        with _io("locate"):
            found = self._index.positions(ids)
        keys = []
        for id in ids:
            entry = self._writer.find(id) if self._writer is not None else None
            pack_number, offset = (_OPEN_PACK, entry.offset) if entry else found.get(id, (None, None))
            in_bounds = (type(pack_number) is int and type(offset) is int
                         and 0 <= pack_number <= _OPEN_PACK and 0 <= offset < 1 << _OFFSET_BITS)
            keys.append(pack_number << _OFFSET_BITS | offset if in_bounds else NOT_HELD)
        return keys

    def put(self, id: bytes, type: int, data: bytes, refs: list[bytes] | None) -> bool:
        """Store a blob; False (nothing written) if the id is already held."""
        self._check_open(write=True)
        _check_id(id, "id")
        _check_type(type)
        _check_data(data, MAX_BLOB, "blob")
        refs = [] if refs is None else refs
        _check_ids(refs, MAX_BATCH, "refs")
        with _io("put"):
            # An id this session was told is missing, and has not stored since,
            # is still missing: only this session writes while it holds the
            # writer lock. (Were another row to appear meanwhile, the record
            # would merely be a duplicate: the index keeps an id's first row.)
            if id not in self._told_missing and not self._missing([id]):
                return False
            missing = self._missing(refs)
            if missing:
                raise MissingRefs([refs[i] for i in missing])
            if self._writer is None:
                self._writer = pack.PackWriter(self._tree.staging, f"{secrets.token_hex(16)}.tmp")
            self._writer.add(id, type, data, b"".join(refs))
            self._told_missing.discard(id)
            if self._writer.size >= self.pack_size or len(self._writer) >= pack.MAX_ENTRIES:
                try:
                    self._seal()
                except BaseException:
                    self._lost = True
                    raise
        return True

    def _seal(self) -> None:
        """Seal the open pack: trailer, fsync, rename into its shard, fsync dir, index."""
        writer, self._writer = self._writer, None
        trailer = install_pack(self._tree, writer)
        self._index.add_pack(writer.name.removesuffix(".tmp"), trailer.file_size, trailer.entries)

    def flush(self) -> None:
        """Seal the open pack now (no-op if empty): every blob put so far is durable and indexed."""
        self._check_open(write=True)
        with _io("flush"):
            if self._lost:
                self._lost = False
                raise StorageError("a pack failed to seal during an earlier put; blobs put before it were lost")
            if self._writer is not None:
                self._seal()

    def commit(self, id: bytes, data: bytes, refs: list[bytes]) -> None:
        """Seal, check every ref is held, then store the snapshot atomically."""
        self._check_open(write=True)
        _check_id(id, "snapshot id")
        _check_data(data, MAX_SNAPSHOT, "snapshot")
        _check_ids(refs, MAX_COMMIT_REFS, "refs")
        self.flush()
        with _io("commit"):
            name = snapshot_name(id)
            if self._tree.snapshots.exists(name):
                raise Exists(f"snapshot {name} already exists")
            missing = self._index.missing(refs)
            if missing:
                raise MissingRefs([refs[i] for i in missing])
            raw = _encode_snapshot(id, int(time.time()), data, refs)
            _replace_atomically(self._tree.staging, self._tree.snapshots, name, raw)

    def list_snapshots(self) -> list[tuple[bytes, int, int]]:
        """(id, data size, store time) of every readable snapshot, oldest first."""
        self._check_open()
        found = []
        with _io("list"):
            ids, _ = snapshot_ids(self._tree)
            for id in ids:
                try:
                    when, size, _ = _read_snapshot_head(self._tree, id)
                except FileNotFoundError:
                    continue  # deleted meanwhile
                except (Corrupt, OSError) as e:  # one unreadable file must not hide the others
                    log.warning("repository %s: not listing snapshot %s: %s", self.name, id.hex(), e)
                    continue
                found.append((id, size, when))
        found.sort(key=lambda s: (s[2], s[0]))
        return found

    def get_snapshot(self, id: bytes) -> tuple[bytes, list[bytes]]:
        """(data, refs) of a snapshot; ``NotFound`` if unknown."""
        self._check_open()
        _check_id(id, "snapshot id")
        with _io("get_snapshot"):
            try:
                return read_snapshot(self._tree, id)
            except FileNotFoundError:
                raise NotFound(f"no snapshot {id.hex()}") from None

    def get(self, id: bytes) -> tuple[int, bytes] | None:
        """(type, data) of a blob, None if not held; ``Corrupt`` if it fails its checks."""
        self._check_open()
        _check_id(id, "id")
        with _io(f"get {id.hex()}"):
            if self._writer is not None and (entry := self._writer.find(id)) is not None:
                return entry.type, self._writer.read(entry)
            # A garbage collector may move the blob to a new pack and delete the
            # old one between the lookup and the open: look it up once more then.
            for attempt in (1, 2):
                found = self._index.lookup(id)
                if found is None:
                    return None
                untrusted_name, offset, length, blob_type = found
                if not (
                    isinstance(untrusted_name, str)
                    and _PACK_NAME_RE.fullmatch(untrusted_name)
                    and all(type(v) is int for v in (offset, length, blob_type))
                    and offset >= pack.HEADER_SIZE
                    and 0 <= length <= MAX_BLOB
                    and 0 <= blob_type <= 255
                ):
                    raise Corrupt(f"index entry of blob {id.hex()} is out of bounds (run `qbackupd reindex`)")
                try:
                    fd = self._pack_fd(untrusted_name)
                except FileNotFoundError:
                    if attempt == 1:
                        continue
                    raise Corrupt(f"pack {untrusted_name} named by the index is missing") from None
                return blob_type, pack.read_blob(fd, id, blob_type, offset, length)
            raise AssertionError("unreachable")

    def _pack_fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is not None:
            self._fds.move_to_end(name)
            return fd
        fd = self._tree.open_pack(name)
        self._fds[name] = fd
        if len(self._fds) > _OPEN_PACKS:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def delete_snapshot(self, id: bytes) -> None:
        """Remove a snapshot (its blobs stay until a garbage collector runs)."""
        self.delete_snapshots([id])

    def delete_snapshots(self, ids: list[bytes]) -> None:
        """Remove several snapshots: all of them, or (``NotFound``) none if one is unknown.

        The blobs stay until a garbage collection (gc.py) removes those no
        snapshot reaches any more.  Each file is unlinked, then the directory
        fsynced once; a crash in between leaves some of them deleted.
        """
        self._check_open(write=True)
        _check_ids(ids, MAX_BATCH, "snapshot ids")
        if not ids:
            raise BadRequest("no snapshot ids given")
        if len(set(ids)) != len(ids):
            raise BadRequest("a snapshot id is listed twice")
        with _io("delete_snapshots"):
            names = [snapshot_name(id) for id in ids]
            unknown = [id for id, name in zip(ids, names) if not self._tree.snapshots.exists(name)]
            if unknown:
                more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
                raise NotFound(f"no snapshot {unknown[0].hex()}{more}")
            for name in names:
                self._tree.snapshots.unlink(name)
            _fsync_dir(self._tree.snapshots)

    def set_config(self, config: bytes, expect: bytes) -> None:
        """Replace the client config atomically, only if the stored one equals ``expect``."""
        self._check_open(write=True)
        _check_data(config, MAX_CONFIG, "config")
        _check_data(expect, MAX_CONFIG, "expected config")
        with _io("set_config"):
            current = _read_config(self._tree)
            if current.client != expect:
                raise Conflict("the stored config is not the expected one")
            raw = _encode_config(current.pack_size, config)
            _replace_atomically(self._tree.staging, self._tree.dir, CONFIG, raw)
        self.config = config

    def stats(self) -> dict:
        """{packs, blobs, bytes, snapshots, pack_bytes} of the sealed, indexed
        packs, and {fs_size, fs_free}: the size of the file system holding
        the repository and the space left to an unprivileged writer."""
        self._check_open()
        with _io("stats"):
            stats = self._index.stats()
            stats["snapshots"] = len(snapshot_ids(self._tree)[0])
            fs = os.fstatvfs(self._tree.snapshots.fd)
            stats["fs_size"], stats["fs_free"] = fs.f_frsize * fs.f_blocks, fs.f_frsize * fs.f_bavail
        return stats

    def close(self) -> None:
        """Seal the open pack, release the lock (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._writer is not None:
                with _io("close"):
                    self._seal()
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._index.close()
            self._tree.close()
            if self._lock is not None:
                self._lock.release()
