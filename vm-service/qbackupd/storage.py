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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import pack
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


@dataclass(frozen=True)
class _Paths:
    """Where the parts of one repository live."""

    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "config"

    @property
    def lock(self) -> Path:
        return self.dir / "lock"

    @property
    def index(self) -> Path:
        return self.dir / "index.sqlite"

    @property
    def packs(self) -> Path:
        return self.dir / "packs"

    @property
    def staging(self) -> Path:
        return self.dir / "staging"

    @property
    def snapshots(self) -> Path:
        return self.dir / "snapshots"

    def pack(self, name: str) -> Path:
        return self.packs / name[:2] / f"{name}.pack"

    def snapshot(self, id: bytes) -> Path:
        return self.snapshots / id.hex()


@dataclass(frozen=True)
class _Config:
    format: int
    pack_size: int
    client: bytes  # the opaque client config


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist), write ``data``, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomically(staging: Path, final: Path, data: bytes) -> None:
    """Temp file in staging, fsync, rename over ``final``, fsync its directory."""
    tmp = staging / f"{secrets.token_hex(8)}.tmp"
    try:
        _write_new_file(tmp, data)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(final.parent)


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise Corrupt(f"{what}: {size} bytes, over the limit of {limit}")
        data = f.read(limit + 1)
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


def _read_config(paths: _Paths) -> _Config:
    return _decode_config(_read_bounded(paths.config, _MAX_CONFIG_FILE, "config file"))


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


def _read_snapshot_head(path: Path, id: bytes) -> tuple[int, int, int]:
    with open(path, "rb") as f:
        return _snapshot_head(f.read(_SNAPSHOT_HEAD.size), id, os.fstat(f.fileno()).st_size)


def _split_ids(raw: bytes) -> list[bytes]:
    return [raw[i : i + ID_SIZE] for i in range(0, len(raw), ID_SIZE)]


def _show(value: object) -> str:
    """An id (or whatever a damaged index holds instead) for a one-line message."""
    return value.hex() if isinstance(value, bytes) else ascii(value)


def _bounds(pack_size: int) -> pack.Bounds:
    """What a pack of a repository with this pack size may hold at most."""
    last_blob = pack.RECORD_HEADER_SIZE + MAX_BLOB + pack.ENTRY_SIZE + MAX_BATCH * ID_SIZE
    return pack.Bounds(max_data=MAX_BLOB, max_refs=MAX_BATCH, max_file=pack_size + last_blob)


def _scan_packs(paths: _Paths) -> tuple[dict[str, Path], list[str]]:
    """Pack files on disk (name -> path) and anything else found under packs/."""
    found: dict[str, Path] = {}
    unexpected: list[str] = []
    with os.scandir(paths.packs) as shards:
        for shard in sorted(shards, key=lambda e: e.name):
            if not (_SHARD_RE.fullmatch(shard.name) and shard.is_dir(follow_symlinks=False)):
                unexpected.append(f"packs/{shard.name!a}")
                continue
            with os.scandir(shard.path) as files:
                for f in files:
                    name = f.name.removesuffix(".pack")
                    if (
                        f.name.endswith(".pack")
                        and _PACK_NAME_RE.fullmatch(name)
                        and name.startswith(shard.name)
                        and f.is_file(follow_symlinks=False)
                    ):
                        found[name] = Path(f.path)
                    else:
                        unexpected.append(f"packs/{shard.name}/{f.name!a}")
    return found, unexpected


def _verify_pack(path: Path, bounds: pack.Bounds) -> pack.Trailer:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return pack.verify_pack(fd, bounds)
    finally:
        os.close(fd)


def _pack_to_index(paths: _Paths, path: Path, bounds: pack.Bounds, synced: set[Path]) -> pack.Trailer:
    """Read a pack found under packs/ for indexing, and make it durable first.

    A writer killed between its rename and the fsync of the shard directory
    leaves a pack whose name may not survive a power loss; the index must never
    name such a pack.  So fsync the file (cheap: a pack this daemon sealed is
    clean already), its shard directory and packs/ (each once per ``synced``).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        trailer = pack.read_trailer(fd, bounds)
        os.fsync(fd)
    finally:
        os.close(fd)
    for directory in (path.parent, paths.packs):
        if directory not in synced:
            _fsync_dir(directory)
            synced.add(directory)
    return trailer


def _clear_staging(paths: _Paths) -> None:
    """Remove what a dead writer left in staging (caller holds the writer lock)."""
    with os.scandir(paths.staging) as entries:
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)
                log.info("removed leftover staging file %s", entry.path)


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


def _rebuild(name: str, paths: _Paths, bounds: pack.Bounds) -> tuple[Index, dict]:
    """Build a new index from the pack trailers alone (caller holds the writer lock)."""
    index = Index.create(paths.index)
    try:
        files, _ = _scan_packs(paths)
        packs = blobs = bad = 0
        synced: set[Path] = set()
        for pack_name, path in sorted(files.items()):
            try:
                trailer = _pack_to_index(paths, path, bounds, synced)
            except (pack.PackError, OSError) as e:
                bad += 1
                log.warning("repository %s: skipping pack %s: %s", name, pack_name, e)
                continue
            blobs += index.add_pack(pack_name, trailer.file_size, trailer.entries)
            packs += 1
        index.mark_complete()
    except BaseException:
        index.close()
        raise
    return index, {"packs": packs, "blobs": blobs, "bad_packs": bad}


def _recover_orphans(name: str, paths: _Paths, index: Index, bounds: pack.Bounds) -> None:
    """Index sealed packs that a dead writer renamed into place but never indexed."""
    files, _ = _scan_packs(paths)
    synced: set[Path] = set()
    for pack_name in sorted(files.keys() - index.packs().keys()):
        try:
            trailer = _pack_to_index(paths, files[pack_name], bounds, synced)
        except (pack.PackError, OSError) as e:
            log.warning("repository %s: pack %s is not indexed and cannot be: %s", name, pack_name, e)
            continue
        index.add_pack(pack_name, trailer.file_size, trailer.entries)
        log.info("repository %s: re-indexed pack %s from its trailer", name, pack_name)


def _writer_index(name: str, paths: _Paths, bounds: pack.Bounds) -> Index:
    """Open the index for a writer: rebuild it if unusable, else add orphan packs."""
    try:
        index = Index.open(paths.index)
    except IndexUnusable as e:
        problem = str(e)
    else:
        try:
            problem = index.quick_check()
            if problem is None:
                _recover_orphans(name, paths, index, bounds)
                return index
        except BaseException:
            index.close()
            raise
        index.close()
    log.warning("repository %s: index %s; rebuilding it from the packs", name, problem)
    return _rebuild(name, paths, bounds)[0]


# --- check ---------------------------------------------------------------------


def _check_repository(paths: _Paths) -> list[str]:
    problems = []
    try:
        pack_size = _read_config(paths).pack_size
    except (StorageError, OSError) as e:
        problems.append(f"config: {e}")
        pack_size = MAX_PACK_SIZE
    index = None
    try:
        index = Index.open(paths.index)
        if (problem := index.quick_check()) is not None:
            index.close()
            index = None
            raise IndexUnusable(f"damaged ({problem})")
    except IndexUnusable as e:
        problems.append(f"index: {e} (run reindex); index entries and refs not checked")
    try:
        problems += _check_packs(paths, index, _bounds(pack_size))
        problems += _check_snapshots(paths, index)
        if index is not None:
            problems += _check_blob_refs(index)
    finally:
        if index is not None:
            index.close()
    return problems


def _check_packs(paths: _Paths, index: Index | None, bounds: pack.Bounds) -> list[str]:
    files, unexpected = _scan_packs(paths)
    problems = [f"unexpected file {u}" for u in unexpected]
    indexed = index.packs() if index is not None else {}
    for name, path in sorted(files.items()):
        try:
            trailer = _verify_pack(path, bounds)
        except (pack.PackError, OSError) as e:
            problems.append(f"pack {name}: {e}")
            continue
        if index is not None:
            problems += _check_pack_index(index, name, trailer, indexed.get(name))
    for name in sorted(indexed.keys() - files.keys(), key=ascii):  # a damaged index may hold non-text names
        if not (isinstance(name, str) and _PACK_NAME_RE.fullmatch(name)):
            problems.append(f"index names an invalid pack {name!a}")
        elif not paths.pack(name).exists():  # else sealed by a writer meanwhile
            problems.append(f"index names pack {name!a}, which is missing")
    return problems


def _check_pack_index(index: Index, name: str, trailer: pack.Trailer, indexed_size: int | None) -> list[str]:
    if indexed_size is None and not index.has_pack(name):
        return [f"pack {name} is not in the index (open the repository for writing, or reindex)"]
    problems = []
    if indexed_size is not None and indexed_size != trailer.file_size:
        problems.append(f"pack {name}: index says {indexed_size!a} bytes, the file has {trailer.file_size}")
    listed = {e.id: (e.offset, e.length, e.type) for e in trailer.entries}
    rows = index.pack_entries(name)
    wrong = [id for id, place in rows.items() if listed.get(id) != place]
    if wrong:
        problems.append(f"pack {name}: {len(wrong)} index entries point nowhere (first {_show(wrong[0])})")
    unindexed = [id for id in listed if id not in rows]
    lost = [unindexed[i] for i in index.missing(unindexed)]
    if lost:
        problems.append(f"pack {name}: {len(lost)} blobs are not in the index (first {lost[0].hex()})")
    return problems


def _check_snapshots(paths: _Paths, index: Index | None) -> list[str]:
    problems = []
    with os.scandir(paths.snapshots) as entries:
        names = sorted(e.name for e in entries)
    for name in names:
        if not _SNAPSHOT_NAME_RE.fullmatch(name):
            problems.append(f"unexpected file snapshots/{name!a}")
            continue
        id = bytes.fromhex(name)
        try:
            raw = _read_bounded(paths.snapshot(id), _MAX_SNAPSHOT_FILE, f"snapshot {name}")
            _, refs = _decode_snapshot(raw, id)
        except FileNotFoundError:
            continue  # deleted meanwhile
        except (StorageError, OSError) as e:
            problems.append(str(e) if isinstance(e, Corrupt) else f"snapshot {name}: {e}")
            continue
        missing = index.missing(refs) if index is not None else []
        if missing:
            first = refs[missing[0]].hex()
            problems.append(f"snapshot {name} references {len(missing)} missing ids (first {first})")
    return problems


def _check_blob_refs(index: Index) -> list[str]:
    problems = []
    for id, untrusted_refs in index.iter_refs():
        size = len(untrusted_refs) if type(untrusted_refs) is bytes else -1
        if size < 0 or size % ID_SIZE or size > MAX_BATCH * ID_SIZE:
            problems.append(f"index: bad ref list of blob {_show(id)}")
            continue
        refs = _split_ids(untrusted_refs)
        missing = index.missing(refs)
        if missing:
            first = refs[missing[0]].hex()
            problems.append(f"blob {_show(id)} references {len(missing)} missing ids (first {first})")
    return problems


# --- public API ----------------------------------------------------------------


class Storage:
    """A directory of repositories, one subdirectory each."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _paths(self, name: str) -> _Paths:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
            raise BadRepoName(f"invalid repository name {name!a}")
        return _Paths(self.root / name)

    def _existing(self, name: str) -> _Paths:
        paths = self._paths(name)
        if not paths.dir.is_dir():
            raise NotFound(f"no repository {name!a}", "no_repository")
        return paths

    def create(self, name: str, config: bytes, pack_size: int, holder: str) -> "Repository":
        """Create a repository and return it opened for writing.

        Built in a temporary directory (writer lock already held) and renamed
        into place, so a repository either exists complete or not at all.
        """
        paths = self._paths(name)
        _check_data(config, MAX_CONFIG, "config")
        _check_pack_size(pack_size)
        if paths.dir.exists():
            raise Exists(f"repository {name!a} already exists")
        with _io(f"cannot create repository {name!a}"):
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = _Paths(Path(tempfile.mkdtemp(prefix=f".create-{name}.", dir=self.root)))
            lock = None
            try:
                lock = WriterLock.acquire(tmp.lock, holder)
                for directory in (tmp.packs, tmp.staging, tmp.snapshots):
                    directory.mkdir(mode=0o700)
                _write_new_file(tmp.config, _encode_config(pack_size, config))
                index = Index.create(tmp.index)
                index.mark_complete()
                index.close()
                _fsync_dir(tmp.dir)
                try:
                    os.rename(tmp.dir, paths.dir)
                except OSError as e:
                    if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        raise Exists(f"repository {name!a} already exists") from None
                    raise
                _fsync_dir(self.root)
            except BaseException:
                if lock is not None:
                    lock.release()
                shutil.rmtree(tmp.dir, ignore_errors=True)
                raise
        return self._open_writer(name, paths, lock)

    def open(self, name: str, write: bool, holder: str) -> "Repository":
        """Open a repository: for writing (takes the writer lock) or for reading (no lock)."""
        if type(write) is not bool:
            raise BadRequest("write must be a boolean")
        paths = self._existing(name)
        if write:
            return self._open_writer(name, paths, _lock(name, paths, holder))
        with _io(f"cannot open repository {name!a}"):
            config = _read_config(paths)
            index = self._reader_index(name, paths, config, holder)
        return Repository(name, paths, config, index, None)

    def _open_writer(self, name: str, paths: _Paths, lock: WriterLock) -> "Repository":
        try:
            with _io(f"cannot open repository {name!a}"):
                config = _read_config(paths)
                _clear_staging(paths)
                index = _writer_index(name, paths, _bounds(config.pack_size))
        except BaseException:
            lock.release()
            raise
        return Repository(name, paths, config, index, lock)

    def _reader_index(self, name: str, paths: _Paths, config: _Config, holder: str) -> Index:
        """A reader's index; an unusable one is rebuilt if no writer is at work."""
        try:
            return Index.open(paths.index)
        except IndexUnusable as e:
            problem = str(e)
        try:
            lock = WriterLock.acquire(paths.lock, f"{holder} (index rebuild)")
        except LockBusy:
            raise StorageError(
                f"index of repository {name!a} is unusable ({problem}) while a writer is at work; try again"
            ) from None
        try:
            try:
                return Index.open(paths.index)  # a writer may have rebuilt it meanwhile
            except IndexUnusable:
                log.warning("repository %s: index %s; rebuilding it from the packs", name, problem)
                return _rebuild(name, paths, _bounds(config.pack_size))[0]
        finally:
            lock.release()

    def reindex(self, name: str) -> dict:
        """Rebuild the index from the pack trailers alone (no keys).

        Needs the writer lock (``Locked`` if a writer is at work).  Returns
        {"packs": int, "blobs": int, "bad_packs": int}; each unreadable pack
        is skipped with a logged warning (``check`` lists them too).
        """
        paths = self._existing(name)
        lock = _lock(name, paths, f"qbackupd reindex (pid {os.getpid()})")
        try:
            with _io(f"cannot reindex repository {name!a}"):
                config = _read_config(paths)
                _clear_staging(paths)
                index, report = _rebuild(name, paths, _bounds(config.pack_size))
                index.close()
        finally:
            lock.release()
        return report

    def check(self, name: str) -> list[str]:
        """Read everything and list the problems found (one line each; [] = healthy).

        Finds bad or truncated packs (every byte is checked against the pack's
        SHA-256 and each record's CRC), index entries pointing nowhere, packs
        or blobs missing from the index, damaged snapshot files, and snapshots
        or blobs referencing ids the repository does not hold.  Takes no lock.
        """
        paths = self._existing(name)
        with _io(f"cannot check repository {name!a}"):
            return _check_repository(paths)


def _lock(name: str, paths: _Paths, holder: str) -> WriterLock:
    try:
        return WriterLock.acquire(paths.lock, holder)
    except LockBusy as e:
        raise Locked(f"repository {name!a} is {e}", e.holder) from None
    except OSError as e:
        raise StorageError(f"cannot lock repository {name!a}: {e}") from e


class Repository:
    """An opened repository; ``write`` says whether it holds the writer lock."""

    def __init__(self, name: str, paths: _Paths, config: _Config, index: Index, lock: WriterLock | None):
        self.name = name
        self.config = config.client
        self.pack_size = config.pack_size
        self.format = config.format
        self.write = lock is not None
        self._paths = paths
        self._index = index
        self._lock = lock
        self._writer: pack.PackWriter | None = None
        self._lost = False  # a pack sealed by put() failed: its blobs are gone
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._closed = False

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
        """Indexes of the ids neither indexed nor in this writer's open pack."""
        missing = self._index.missing(ids)
        if self._writer is not None:
            missing = [i for i in missing if self._writer.find(ids[i]) is None]
        return missing

    def have(self, ids: list[bytes]) -> list[int]:
        """Indexes (ascending) into ``ids`` of the ids the repository does not hold."""
        self._check_open()
        _check_ids(ids, MAX_BATCH, "ids")
        with _io("have"):
            return self._missing(ids)

    def put(self, id: bytes, type: int, data: bytes, refs: list[bytes] | None) -> bool:
        """Store a blob; False (nothing written) if the id is already held."""
        self._check_open(write=True)
        _check_id(id, "id")
        _check_type(type)
        _check_data(data, MAX_BLOB, "blob")
        refs = [] if refs is None else refs
        _check_ids(refs, MAX_BATCH, "refs")
        with _io("put"):
            if not self._missing([id]):
                return False
            missing = self._missing(refs)
            if missing:
                raise MissingRefs([refs[i] for i in missing])
            if self._writer is None:
                self._writer = pack.PackWriter(self._paths.staging / f"{secrets.token_hex(16)}.tmp")
            self._writer.add(id, type, data, b"".join(refs))
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
        name = writer.path.stem
        dest = self._paths.pack(name)
        try:
            trailer = writer.seal()
            if not dest.parent.is_dir():
                dest.parent.mkdir(mode=0o700, exist_ok=True)
                _fsync_dir(self._paths.packs)
            os.rename(writer.path, dest)
        except BaseException:
            writer.abort()
            raise
        # From here the pack is in place; if what follows fails, the next
        # writer to open the repository indexes it from its trailer.
        _fsync_dir(dest.parent)
        self._index.add_pack(name, trailer.file_size, trailer.entries)

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
            path = self._paths.snapshot(id)
            if path.exists():
                raise Exists(f"snapshot {id.hex()} already exists")
            missing = self._index.missing(refs)
            if missing:
                raise MissingRefs([refs[i] for i in missing])
            _replace_atomically(self._paths.staging, path, _encode_snapshot(id, int(time.time()), data, refs))

    def list_snapshots(self) -> list[tuple[bytes, int, int]]:
        """(id, data size, store time) of every readable snapshot, oldest first."""
        self._check_open()
        found = []
        with _io("list"):
            with os.scandir(self._paths.snapshots) as entries:
                names = [e.name for e in entries if _SNAPSHOT_NAME_RE.fullmatch(e.name)]
            for name in names:
                id = bytes.fromhex(name)
                try:
                    when, size, _ = _read_snapshot_head(self._paths.snapshot(id), id)
                except FileNotFoundError:
                    continue  # deleted meanwhile
                except (Corrupt, OSError) as e:  # one unreadable file must not hide the others
                    log.warning("repository %s: not listing snapshot %s: %s", self.name, name, e)
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
                raw = _read_bounded(self._paths.snapshot(id), _MAX_SNAPSHOT_FILE, f"snapshot {id.hex()}")
            except FileNotFoundError:
                raise NotFound(f"no snapshot {id.hex()}") from None
            return _decode_snapshot(raw, id)

    def get(self, id: bytes) -> tuple[int, bytes] | None:
        """(type, data) of a blob, None if not held; ``Corrupt`` if it fails its checks."""
        self._check_open()
        _check_id(id, "id")
        with _io(f"get {id.hex()}"):
            if self._writer is not None and (entry := self._writer.find(id)) is not None:
                return entry.type, self._writer.read(entry)
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
            return blob_type, pack.read_blob(self._pack_fd(untrusted_name), id, blob_type, offset, length)

    def _pack_fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is not None:
            self._fds.move_to_end(name)
            return fd
        try:
            fd = os.open(self._paths.pack(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Corrupt(f"pack {name} named by the index is missing") from None
        self._fds[name] = fd
        if len(self._fds) > _OPEN_PACKS:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def delete_snapshot(self, id: bytes) -> None:
        """Remove a snapshot (its blobs stay until a garbage collector runs)."""
        self._check_open(write=True)
        _check_id(id, "snapshot id")
        with _io("delete_snapshot"):
            try:
                self._paths.snapshot(id).unlink()
            except FileNotFoundError:
                raise NotFound(f"no snapshot {id.hex()}") from None
            _fsync_dir(self._paths.snapshots)

    def set_config(self, config: bytes, expect: bytes) -> None:
        """Replace the client config atomically, only if the stored one equals ``expect``."""
        self._check_open(write=True)
        _check_data(config, MAX_CONFIG, "config")
        _check_data(expect, MAX_CONFIG, "expected config")
        with _io("set_config"):
            current = _read_config(self._paths)
            if current.client != expect:
                raise Conflict("the stored config is not the expected one")
            raw = _encode_config(current.pack_size, config)
            _replace_atomically(self._paths.staging, self._paths.config, raw)
        self.config = config

    def stats(self) -> dict:
        """{packs, blobs, bytes, snapshots, pack_bytes} of the sealed, indexed
        packs, and {fs_size, fs_free}: the size of the file system holding
        the repository and the space left to an unprivileged writer."""
        self._check_open()
        with _io("stats"):
            stats = self._index.stats()
            with os.scandir(self._paths.snapshots) as entries:
                stats["snapshots"] = sum(1 for e in entries if _SNAPSHOT_NAME_RE.fullmatch(e.name))
            fs = os.statvfs(self._paths.snapshots)
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
            if self._lock is not None:
                self._lock.release()
