# SPDX-License-Identifier: GPL-2.0-or-later
"""Reading snapshots back: history, verify, restore, delete.

load_history authenticates every manifest and applies the rollback rules
(qbackup.state). verify and restore stream chunk maps and chunks through
Session.get with bounded memory and no scratch files: every chunk is
authenticated, decrypted, decompressed (bounded), re-identified and
length-checked (on a pool of threads) before anything is done with it.
verify_snapshots walks the maps of all the snapshots it checks and reads
each distinct chunk once. restore writes a regular file target as
PATH.qbackup-partial from a writer thread (zero chunks and zero 4 KiB
blocks stay holes) and renames it into place only once the whole volume is
verified; a block device target is written in place, zeros included.
VolumeStream gives a volume's plaintext
in order, as a file to read, for admin.vm.volume.ImportWithSize: it stops
short at the first bad chunk, so qubesd never commits a volume that was not
wholly authenticated (docs/RESTORE.md).
"""

import collections
import contextlib
import errno
import hashlib
import os
import queue
import re
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass

from qbackup import chunkmap, crypto, manifest, threads
from qbackup.chunkmap import Leaf
from qbackup.crypto import ZERO_ID
from qbackup.errors import IntegrityError, QbackupError, RemoteError, RollbackError
from qbackup.proto import CLOSING_CODES
from qbackup.volume import fd_size

DATA_TYPE = crypto.TYPE_DATA
MAX_ERRORS = 100
GET_BYTES = 16 << 20  # chunk data fetched ahead while verifying or restoring
# VolumeStream: opened chunks kept to serve a chunk that comes again in the
# same leaf (repeats further away are fetched again), so memory stays bounded.
STREAM_CACHE = 8
PARTIAL_SUFFIX = ".qbackup-partial"
SNAPSHOT_PREFIX = re.compile(r"[0-9a-f]{8,64}")


@dataclass
class SnapshotInfo:
    id: bytes
    time: float
    host: str
    predecessor: bytes | None
    qubes: dict  # the manifest's qubes map (see docs/SNAPSHOTS.md)
    bytes_total: int
    version: int = manifest.VERSION  # the manifest's format


@dataclass
class CheckResult:
    ok: bool
    errors: list[str]
    chunks: int  # stored chunks authenticated (and, for restore, written)
    bytes: int  # their plaintext bytes
    skipped: int = 0  # stored chunks left out of a sample (verify --sample)


class Sample:
    """A random subset of the distinct chunk ids: each is in it with
    probability `fraction`, decided by a keyed hash under a secret salt drawn
    for this run, so an id is sampled everywhere or nowhere in the run and
    the backup qube cannot know beforehand which ones will be read."""

    def __init__(self, fraction: float):
        if not 0 < fraction <= 1:
            raise ValueError("a sample is a fraction in (0, 1]")
        self.fraction = fraction
        self._threshold = int(fraction * 2**64)
        self._salt = os.urandom(16)

    def __contains__(self, chunk_id: bytes) -> bool:
        digest = hashlib.blake2b(chunk_id, key=self._salt, digest_size=8).digest()
        return int.from_bytes(digest, "big") < self._threshold


@dataclass
class Damaged:
    """A listed snapshot whose manifest cannot be fetched or fails authentication."""
    id: bytes
    reason: str


class History(list):
    """The authenticated snapshots of a repository, oldest first (a list of
    SnapshotInfo); `damaged` names the listed ones that could not be read."""

    def __init__(self, snapshots: Sequence[SnapshotInfo] = (), damaged: Sequence[Damaged] = ()):
        super().__init__(snapshots)
        self.damaged = list(damaged)


def _read_snapshot(session, keys: crypto.Keys, untrusted_id: bytes) -> SnapshotInfo:
    """One snapshot's manifest, fetched and authenticated (QbackupError if not)."""
    untrusted_blob = session.get_snapshot(untrusted_id)
    try:
        plain = crypto.open_snapshot(keys, untrusted_id, untrusted_blob)
    except IntegrityError as e:
        raise IntegrityError(f"fails authentication: {e}") from None
    m = manifest.decode(plain, repo_id=keys.repo_id, snapshot_id=untrusted_id, chunk_size=keys.chunk_size)
    total = sum(v["size"] for q in m.qubes.values() for v in q["volumes"].values())
    return SnapshotInfo(m.snapshot_id, m.time, m.host, m.predecessor, m.qubes, total, m.version)


def load_history(session, keys: crypto.Keys, state, *, allow_rollback: bool = False) -> History:
    """Every snapshot of the repository, authenticated, oldest first.

    A snapshot whose manifest cannot be fetched or fails authentication or
    validation is left out and named in `damaged`: it hides none of the
    others. RollbackError if the history contradicts the local state.
    """
    snapshots, damaged = [], []
    for untrusted_id, _size, _time in session.list():
        try:
            snapshots.append(_read_snapshot(session, keys, untrusted_id))
        except RemoteError as e:
            if e.code in CLOSING_CODES:  # the session is dead: no snapshot can be read
                raise
            damaged.append(Damaged(untrusted_id, str(e)))
        except (IntegrityError, RollbackError) as e:  # RollbackError: names another repository
            damaged.append(Damaged(untrusted_id, str(e)))
    snapshots.sort(key=lambda s: (s.time, s.id))
    replayed = state.accept(keys.repo_id, snapshots, damaged=[d.id for d in damaged],
                            allow_rollback=allow_rollback)
    return History([s for s in snapshots if s.id not in replayed],
                   [d for d in damaged if d.id not in replayed])


def resolve_snapshot(history: list[SnapshotInfo], spec: str) -> SnapshotInfo:
    """The snapshot named by a full hex id, a unique prefix of 8+ hex digits, or "latest"."""
    if spec == "latest":
        if not history:
            raise QbackupError("the repository holds no snapshots")
        return history[-1]
    prefix = spec.lower()
    if not SNAPSHOT_PREFIX.fullmatch(prefix):
        raise QbackupError(f"invalid snapshot {spec!r}: give 8 to 64 hex digits of its id, or 'latest'")
    matches = [s for s in history if s.id.hex().startswith(prefix)]
    if not matches:
        raise QbackupError(f"no snapshot {prefix} in the repository")
    if len(matches) > 1:
        raise QbackupError(f"snapshot prefix {prefix} is ambiguous: {len(matches)} snapshots match")
    return matches[0]


def delete_snapshots(session, keys: crypto.Keys, state, victims: Sequence[SnapshotInfo],
                     history: Sequence[SnapshotInfo]) -> None:
    """Delete snapshots of `history` (from load_history), in order, recording
    each once the backup qube confirmed it, so its absence is not taken for a
    rollback (and, if it was the newest, the newest one left may not
    disappear). They are marked as being deleted first: if dom0 stops in
    between, the next listing tells which ones went. A daemon of protocol
    version 2 deletes up to `max_batch` of them per request, all or none
    (`delete_snapshots`); one of version 1, one per request. This is the one
    place dom0 asks the backup qube to delete snapshots."""
    state.record_deleting(keys.repo_id, [v.id for v in victims])
    batch = session.max_batch if session.version >= 2 else 1
    for start in range(0, len(victims), batch):
        done = victims[start:start + batch]
        if session.version >= 2:
            session.delete_snapshots([v.id for v in done])
        else:
            session.delete_snapshot(done[0].id)
        for victim in done:
            state.record_deleted(keys.repo_id, victim.id, history)


@dataclass(frozen=True)
class Affected:
    """A volume of a snapshot that reaches a damaged blob, per the backup qube."""
    snapshot: bytes
    qube: str | None      # None: the backup qube named a ref the manifest does not have
    volume: str | None


def affected_volumes(history: Iterable, untrusted_report: dict) -> list[Affected]:
    """Map a `check` answer's (snapshot id, refs) to the qubes and volumes of
    dom0's authenticated `history` (load_history's History, or a list of
    SnapshotInfo). A snapshot the report names but the history lacks is left
    out (the history is dom0's truth); one listed without refs (damage too
    wide to attribute) is reported for each of its volumes; a snapshot file
    the report calls damaged, with no qube or volume, if dom0 lists it or
    found it damaged too."""
    by_id = {snap.id: snap for snap in history}
    found: list[Affected] = []
    for snapshot_id, untrusted_roots in untrusted_report["affected"]:
        snap = by_id.get(snapshot_id)
        if snap is None:
            continue
        volumes = {(qube, name): entry["root"]
                   for qube, info in snap.qubes.items()
                   for name, entry in info["volumes"].items()}
        roots = set(untrusted_roots)
        named = [(q, v) for (q, v), root in sorted(volumes.items()) if not roots or root in roots]
        found += [Affected(snapshot_id, q, v) for q, v in named]
        if roots - set(volumes.values()):
            found.append(Affected(snapshot_id, None, None))
    damaged = {d.id for d in getattr(history, "damaged", ())}   # dom0 could not read them either
    for snapshot_id in untrusted_report["bad_snapshots"]:
        if snapshot_id in by_id or snapshot_id in damaged:
            found.append(Affected(snapshot_id, None, None))
    return found


class _Errors:
    """Error lines, capped at MAX_ERRORS (the rest only counted)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.dropped = 0

    def add(self, line: str) -> None:
        if len(self.lines) < MAX_ERRORS:
            self.lines.append(line)
        else:
            self.dropped += 1

    def result(self) -> list[str]:
        return self.lines + ([f"... and {self.dropped} more errors"] if self.dropped else [])

    def reporter(self, label: str, *, stop: bool) -> Callable[[int, str], None]:
        """fail(offset, reason) for one volume; with `stop`, it also raises _Stop."""
        def fail(offset: int, reason: str) -> None:
            self.add(f"{label} at offset {offset}: {reason}")
            if stop:
                raise _Stop()
        return fail


class _Stop(Exception):
    """Restore gives up on a volume at its first bad chunk."""


def _open_chunk(keys: crypto.Keys, chunk_id: bytes, untrusted_type: int | None,
                untrusted_data: bytes | None) -> bytes | str:
    """The authenticated plaintext of a chunk, or why there is none."""
    if untrusted_type is None:
        return "chunk missing from the repository"
    if untrusted_type != DATA_TYPE:
        return f"blob has type {untrusted_type}, not a data chunk"
    try:
        return crypto.open_blob(keys, DATA_TYPE, chunk_id, untrusted_data, keys.chunk_size)
    except IntegrityError as e:
        return f"chunk fails authentication: {e}"


def _opened(session, keys: crypto.Keys, ids: Iterable[bytes], pool: Executor
            ) -> Iterator[tuple[bytes, bytes | str]]:
    """(id, authenticated plaintext or why there is none) for each of `ids`,
    in order. `ids` is taken lazily, as the fetch window (GET_BYTES) makes
    room; each chunk is opened on `pool` while the next ones arrive, so
    every core opens chunks and at most about two windows of chunks are
    held at once."""
    cs = keys.chunk_size
    window = max(4, GET_BYTES // cs)
    pending: collections.deque[tuple[bytes, Future]] = collections.deque()
    for want, untrusted_type, untrusted_data, error in chunkmap.get_each(
            session, ids, window, crypto.max_blob_size(cs)):
        if error is not None:
            opened: Future = Future()
            opened.set_result(f"cannot fetch chunk: {error}")
        else:
            opened = pool.submit(_open_chunk, keys, want, untrusted_type, untrusted_data)
        pending.append((want, opened))
        if len(pending) >= window:
            want, opened = pending.popleft()
            yield want, opened.result()
    while pending:
        want, opened = pending.popleft()
        yield want, opened.result()


def _open_pool() -> Executor:
    """Threads that open chunks: cryptography and zstandard release the GIL."""
    return threads.pool(os.cpu_count() or 1, "qbackup-open")


def _wrong_length(actual: int, expected: int) -> str | None:
    """Why an authentic chunk of `actual` bytes cannot be at a place that needs `expected`."""
    if actual != expected:
        return f"chunk has {actual} bytes, expected {expected}"
    return None


def _volumes(snapshot: SnapshotInfo) -> list[tuple[str, dict]]:
    return [(f"{q}:{v}", snapshot.qubes[q]["volumes"][v])
            for q in sorted(snapshot.qubes) for v in sorted(snapshot.qubes[q]["volumes"])]


def _leaves(session, keys: crypto.Keys, vol: dict) -> Iterator[Leaf]:
    return chunkmap.iter_leaves(session, keys, vol["root"], vol["depth"], vol["chunks"])


# --- verify ---------------------------------------------------------------------

CONFLICT = -1  # _Plan.expected: the uses of a chunk need different lengths


def _read_order(session, ids: Iterable[bytes]) -> Iterable[bytes]:
    """The order verify fetches the distinct chunks in. A daemon of protocol
    version 3 gives each a sort key (`locate`, asked in pipelined batches):
    sorted by key, ties in first-seen order, the daemon reads its packs in
    sequence. The keys are untrusted and decide only the order: the same
    ids, each once, are fetched whatever they are. An older daemon gets the
    ids as they first come in the chunk maps, oldest snapshot first, about
    the order they were stored in."""
    if session.version < 3:
        return ids
    ids, n = list(ids), session.max_batch
    batches = [session.locate(ids[i:i + n]) for i in range(0, len(ids), n)]
    keys = [key for batch in batches for key in batch.result()]
    return [ids[i] for i in sorted(range(len(ids)), key=keys.__getitem__)]


class _Plan:
    """What verify reads: every distinct chunk the snapshots use (in
    `sample`, if given), each with the plaintext length all its places in
    the volumes need, and per snapshot what a clean read would count."""

    def __init__(self, sample: Sample | None):
        self.sample = sample
        self.expected: dict[bytes, int] = {}   # id -> length (or CONFLICT); insertion order
        self.counts: list[list[int]] = []      # per snapshot: chunks, bytes, skipped
        self.damaged = False                   # a chunk map node could not be read

    def add(self, session, keys: crypto.Keys, snapshot: SnapshotInfo) -> None:
        cs, expected = keys.chunk_size, self.expected
        chunks = nbytes = skipped = 0
        for _, vol in _volumes(snapshot):
            size = vol["size"]
            for leaf in _leaves(session, keys, vol):
                if leaf.ids is None:
                    self.damaged = True
                    continue
                for index, chunk_id in enumerate(leaf.ids, leaf.start):
                    if chunk_id == ZERO_ID:
                        continue
                    if self.sample is not None and chunk_id not in self.sample:
                        skipped += 1
                        continue
                    length = min(cs, size - index * cs)
                    if expected.setdefault(chunk_id, length) != length:
                        expected[chunk_id] = CONFLICT
                    chunks, nbytes = chunks + 1, nbytes + length
        self.counts.append([chunks, nbytes, skipped])


def verify_snapshots(session, keys: crypto.Keys, snapshots: Sequence[SnapshotInfo], *,
                     progress=None, sample: Sample | None = None) -> list[CheckResult]:
    """Check snapshots as a whole, reading each distinct chunk once: one
    CheckResult per snapshot, as if each had been verified alone.

    Every chunk map node of every snapshot is fetched, authenticated and
    validated; then each distinct data chunk they use (only those in
    `sample`, if given) is fetched, authenticated and length-checked once,
    on every core. If anything failed, the chunk maps are walked again to
    report every place of every bad chunk (volume and offset) in every
    snapshot that uses it. Memory: the distinct ids (about 100 bytes each,
    about 200 while they are sorted by where the daemon holds them) plus the
    fetch window.
    """
    plan = _Plan(sample)
    for snapshot in snapshots:
        plan.add(session, keys, snapshot)
    expected = plan.expected
    bad: dict[bytes, str] = {}        # id -> why it cannot be used
    lengths: dict[bytes, int] = {}    # id -> its length, where that is not what its places need
    if progress is not None:
        progress.total = sum(max(0, n) for n in expected.values())
        progress.start(f"{len(expected)} distinct chunks", progress.total)
    try:
        with _open_pool() as pool:
            for chunk_id, plain in _opened(session, keys, _read_order(session, expected), pool):
                if isinstance(plain, str):
                    bad[chunk_id] = plain
                    continue
                if len(plain) != expected[chunk_id]:
                    lengths[chunk_id] = len(plain)
                if progress is not None:
                    progress.advance(len(plain))
    finally:
        if progress is not None:
            progress.done()
    if not (plan.damaged or bad or lengths):
        return [CheckResult(True, [], c, n, s) for c, n, s in plan.counts]
    return [_report(session, keys, snapshot, expected, bad, lengths, sample)
            for snapshot in snapshots]


def _report(session, keys: crypto.Keys, snapshot: SnapshotInfo, expected: dict[bytes, int],
            bad: dict[bytes, str], lengths: dict[bytes, int], sample: Sample | None) -> CheckResult:
    """One snapshot's result, its chunk maps walked again: every unreadable
    node and every place of a bad chunk, with its volume and offset."""
    cs = keys.chunk_size
    errors = _Errors()
    chunks = nbytes = skipped = 0
    for label, vol in _volumes(snapshot):
        fail, size = errors.reporter(label, stop=False), vol["size"]
        for leaf in _leaves(session, keys, vol):
            if leaf.ids is None:
                fail(leaf.start * cs, leaf.error)
                continue
            for index, chunk_id in enumerate(leaf.ids, leaf.start):
                if chunk_id == ZERO_ID:
                    continue
                if sample is not None and chunk_id not in sample:
                    skipped += 1
                    continue
                length = min(cs, size - index * cs)
                if chunk_id in bad:
                    why = bad[chunk_id]
                elif chunk_id not in expected:  # its node failed on the first walk only
                    why = "chunk not read: its chunk map node could not be read at first"
                else:
                    why = _wrong_length(lengths.get(chunk_id, expected[chunk_id]), length)
                if why is not None:
                    fail(index * cs, why)
                else:
                    chunks, nbytes = chunks + 1, nbytes + length
    lines = errors.result()
    return CheckResult(not lines, lines, chunks, nbytes, skipped)


def verify(session, keys: crypto.Keys, snapshot: SnapshotInfo, *, progress=None,
           sample: Sample | None = None) -> CheckResult:
    """Fetch and authenticate every chunk map node and chunk of a snapshot
    (only the chunks in `sample`, if given); write nothing."""
    [result] = verify_snapshots(session, keys, [snapshot], progress=progress, sample=sample)
    return result


# --- restore --------------------------------------------------------------------

BLOCK = 4096        # all-zero blocks of this size inside a chunk stay holes in a file
WRITE_QUEUE = 16    # authenticated chunks waiting for the writer thread
FLUSH_BYTES = 64 << 20  # written between two background fdatasync
_ZERO_BLOCK = bytes(BLOCK)


def _zero_blocks(data: bytes) -> list[int]:
    """Indexes of the all-zero BLOCKs of `data` (a partial last block never counts).
    Only blocks whose first, middle and last bytes are zero are compared."""
    n = len(data) // BLOCK
    first, middle, last = data[:n * BLOCK:BLOCK], data[BLOCK // 2::BLOCK], data[BLOCK - 1::BLOCK]
    found, k = [], first.find(0)
    while k >= 0:
        if middle[k] == 0 and last[k] == 0 and data[k * BLOCK:(k + 1) * BLOCK] == _ZERO_BLOCK:
            found.append(k)
        k = first.find(0, k + 1)
    return found


def _pwrite(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        view = view[os.pwrite(fd, view, offset + len(data) - len(view)):]


class _Writer:
    """Writes authenticated chunks to a restore target on a thread of its
    own, while the next ones are fetched and opened. A new file (sparse)
    gets only the non-zero BLOCKs of each chunk: zero chunks and zero blocks
    inside chunks stay holes. A device gets every byte, zeros included. At
    most WRITE_QUEUE chunks wait; `close` waits for them and raises the
    first write error. Every FLUSH_BYTES written, another thread starts
    fdatasync, so the disk writes while chunks are opened and the final
    fsync has little left to do."""

    def __init__(self, fd: int, device: bool):
        self._fd, self._device = fd, device
        self._queue: queue.Queue = queue.Queue(WRITE_QUEUE)
        self._error: OSError | None = None
        self._discard = self._closing = False
        self._zeros = b""
        self._unflushed = 0
        self._flush = threading.Event()
        self._threads = [threads.start(self._run, "qbackup-write"),
                         threads.start(self._flusher, "qbackup-flush")]

    def chunk(self, offset: int, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((offset, data))

    def zeros(self, offset: int, length: int) -> None:
        """Zero chunks: a hole in a file, written on a device."""
        if self._device:
            if len(self._zeros) < length:
                self._zeros = bytes(length)
            self.chunk(offset, self._zeros[:length])

    def close(self, discard: bool = False) -> None:
        """Wait until every chunk is written (or, with `discard`, dropped)."""
        self._discard = discard
        self._queue.put(None)
        self._threads[0].join()
        self._closing = True
        self._flush.set()
        self._threads[1].join()
        if self._error is not None and not discard:
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None and not self._discard:
                try:
                    self._write(*item)
                except OSError as e:
                    self._error = e

    def _flusher(self) -> None:
        while True:
            self._flush.wait()
            self._flush.clear()
            if self._closing:
                return
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                self._error = self._error or e

    def _write(self, offset: int, data: bytes) -> None:
        if self._device:
            _pwrite(self._fd, data, offset)
        else:
            start, view = 0, memoryview(data)
            for k in _zero_blocks(data) + [len(data) // BLOCK + 1]:
                end = min(k * BLOCK, len(data))
                if end > start:
                    _pwrite(self._fd, view[start:end], offset + start)
                start = end + BLOCK
        self._unflushed += len(data)
        if self._unflushed >= FLUSH_BYTES:
            self._unflushed = 0
            self._flush.set()


def _restore_volume(session, keys: crypto.Keys, label: str, vol: dict, writer: _Writer,
                    fail: Callable[[int, str], None], progress) -> tuple[int, int]:
    """Fetch, authenticate and write every chunk of a volume: (chunks, bytes)
    written. The chunk map is walked as the fetch window moves on; each
    distinct chunk of a leaf is fetched once and written at all its places."""
    cs, size = keys.chunk_size, vol["size"]
    # In volume order: (offset, error) of unreadable nodes, (id, indexes) of chunks.
    plan: collections.deque[tuple] = collections.deque()

    def wanted() -> Iterator[bytes]:
        for leaf in _leaves(session, keys, vol):
            if leaf.ids is None:
                plan.append((leaf.start * cs, leaf.error))
                continue
            places: dict[bytes, list[int]] = {}
            for index, chunk_id in enumerate(leaf.ids, leaf.start):
                if chunk_id == ZERO_ID:
                    length = min(cs, size - index * cs)
                    writer.zeros(index * cs, length)
                    if progress is not None:
                        progress.advance(length)
                else:
                    places.setdefault(chunk_id, []).append(index)
            for chunk_id, indexes in places.items():
                plan.append((chunk_id, indexes))
                yield chunk_id

    good = nbytes = 0
    if progress is not None:
        progress.start(label, size)
    try:
        with _open_pool() as pool:
            for chunk_id, plain in _opened(session, keys, wanted(), pool):
                while type(plan[0][0]) is int:
                    fail(*plan.popleft())
                want, indexes = plan.popleft()
                assert want == chunk_id
                for index in indexes:
                    expected = min(cs, size - index * cs)
                    why = plain if isinstance(plain, str) else _wrong_length(len(plain), expected)
                    if why is not None:
                        fail(index * cs, why)
                    else:
                        writer.chunk(index * cs, plain)
                        good, nbytes = good + 1, nbytes + expected
                        if progress is not None:
                            progress.advance(expected)
            while plan:
                fail(*plan.popleft())
    finally:
        if progress is not None:
            progress.done()
    return good, nbytes


def _check_partial(partial: str) -> None:
    """A restore may replace only a regular file with no other name (left
    by an interrupted restore) at PATH.qbackup-partial, nothing else."""
    try:
        st = os.lstat(partial)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        kind = "a file with other hard links" if stat.S_ISREG(st.st_mode) else "not a regular file"
        raise QbackupError(f"{partial} exists and is {kind}: refusing to use it")


def _open_device(path: str, size: int) -> int:
    """Open a block device target once, exclusively (a mounted or claimed
    device is refused), and check it on that descriptor."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_EXCL | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise QbackupError(f"{path} is in use (mounted?): refusing to write to it") from None
        raise QbackupError(f"cannot open {path}: {e.strerror}") from None
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            raise QbackupError(f"{path} is no longer a block device")
        os.set_blocking(fd, True)
        device_size = fd_size(fd, path)
        if device_size < size:
            raise QbackupError(f"{path} holds {device_size} bytes, the volume needs {size}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_target(path: str, size: int, force: bool) -> int | None:
    """Check a restore target before anything is written: an open descriptor
    for a block device (written in place), None for a file (written as
    PATH.qbackup-partial, then renamed)."""
    if os.path.lexists(path):
        if not force:
            raise QbackupError(f"{path} exists: refusing to overwrite it without --force")
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:  # a dangling symlink: replaced by the file
            mode = stat.S_IFREG
        if stat.S_ISBLK(mode):
            return _open_device(path, size)
        if not stat.S_ISREG(mode):
            raise QbackupError(f"{path} is neither a regular file nor a block device")
    _check_partial(path + PARTIAL_SUFFIX)
    return None


def _target_key(path: str) -> tuple:
    """What a target names: a block device, or a name in a (real) directory.
    A file target replaces the name itself, never what a symlink points to."""
    try:
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode):
            return ("device", st.st_rdev)
    except OSError:
        pass
    return ("name", os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))


def _check_aliases(paths: Sequence[str]) -> None:
    """Refuse two targets that are one file or device (out.img, ./out.img,
    a symlinked directory, two device nodes), or one's partial the other."""
    keys = [_target_key(p) for p in paths]
    partials = {k[:2] + (k[2] + PARTIAL_SUFFIX,) for k in keys if k[0] == "name"}
    if len(set(keys)) != len(keys) or partials & set(keys):
        raise QbackupError("two volumes cannot be restored to the same path")


def _restore_file(session, keys, label: str, vol: dict, path: str, fail, progress) -> tuple[int, int]:
    partial = path + PARTIAL_SUFFIX
    _check_partial(partial)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial)  # a regular file an interrupted restore left
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, vol["size"])
        result = _write_volume(session, keys, label, vol, fd, False, fail, progress)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(partial)
        raise
    os.close(fd)
    os.replace(partial, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return result


def _write_volume(session, keys, label: str, vol: dict, fd: int, device: bool, fail,
                  progress) -> tuple[int, int]:
    """_restore_volume through a _Writer on `fd`; every chunk handed to the
    writer is written before this returns (or raises)."""
    writer = _Writer(fd, device)
    try:
        result = _restore_volume(session, keys, label, vol, writer, fail, progress)
    except _Stop:
        writer.close()  # what was authenticated before the bad chunk is written
        raise
    except BaseException:
        writer.close(discard=True)
        raise
    writer.close()
    return result


def _restore_device(session, keys, label: str, vol: dict, fd: int, fail, progress) -> tuple[int, int]:
    result = _write_volume(session, keys, label, vol, fd, True, fail, progress)
    os.fsync(fd)
    return result


def restore(session, keys: crypto.Keys, snapshot: SnapshotInfo, targets: dict[tuple[str, str], str], *,
            force: bool = False, progress=None) -> CheckResult:
    """Restore volumes of a snapshot: targets = {(qube, volume): path}.

    Every target is checked first (exists without force → QbackupError,
    nothing written). A volume that fails is reported in the result: its
    partial file is removed (a device is left partly written, and said so).
    """
    _check_aliases(list(targets.values()))
    errors = _Errors()
    chunks = nbytes = 0
    with contextlib.ExitStack() as stack:
        plan = []
        for (qube, name), path in sorted(targets.items()):
            vol = snapshot.qubes.get(qube, {}).get("volumes", {}).get(name)
            if vol is None:
                raise QbackupError(f"snapshot {snapshot.id.hex()} has no volume {qube}:{name}")
            fd = _open_target(path, vol["size"], force)
            if fd is not None:
                stack.callback(os.close, fd)
            plan.append((f"{qube}:{name}", vol, path, fd))
        for label, vol, path, fd in plan:
            fail = errors.reporter(label, stop=True)
            try:
                if fd is None:
                    good, n = _restore_file(session, keys, label, vol, path, fail, progress)
                else:
                    good, n = _restore_device(session, keys, label, vol, fd, fail, progress)
            except _Stop:
                if fd is not None:
                    errors.add(f"{label}: {path} is left partly written")
                continue
            except QbackupError as e:
                errors.add(f"{label}: {e}")
                continue
            except OSError as e:
                errors.add(f"{label}: cannot write {path}: {e.strerror}")
                continue
            chunks, nbytes = chunks + good, nbytes + n
    lines = errors.result()
    return CheckResult(not lines, lines, chunks, nbytes)


class VolumeStream:
    """The plaintext of one volume of a snapshot, in order, as a file object
    (`read`, `close`) for `admin.vm.volume.ImportWithSize`.

    Every chunk is fetched, authenticated, decrypted, decompressed (bounded),
    re-identified and length-checked before any of its bytes is returned;
    zero chunks come out as zeros. At the first chunk map node or chunk that
    fails, the stream ends early (EOF before `size` bytes) and `error` says
    where and why: the importer then has fewer bytes than it was told, and
    fails without committing anything. Protocol errors (the session is
    dead) are raised. Memory: the fetch window (GET_BYTES) plus
    STREAM_CACHE chunks kept for repeats within a leaf.
    """

    def __init__(self, session, keys: crypto.Keys, label: str, vol: dict, *, progress=None):
        self._session, self._keys, self._label, self._vol = session, keys, label, vol
        self._progress = progress
        self._piece = memoryview(b"")
        self._pieces = self._generate()
        self.size: int = vol["size"]
        self.error: str | None = None
        self.chunks = 0  # stored chunks authenticated and handed out (per position)
        self.bytes = 0   # bytes handed out, zeros included

    def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (all that is left if n < 0); b"" at the end, or early
        after a failure (see `error`)."""
        n = self.size if n is None or n < 0 else n
        parts = []
        while n > 0:
            if not self._piece:
                piece = next(self._pieces, None)
                if piece is None:
                    break
                self._piece = piece
            part, self._piece = self._piece[:n], self._piece[n:]
            parts.append(part)
            n -= len(part)
        data = b"".join(parts)
        self.bytes += len(data)
        return data

    def close(self) -> None:
        self._pieces.close()

    @property
    def complete(self) -> bool:
        """Every byte was handed out, each one authenticated."""
        return self.error is None and self.bytes == self.size

    def _generate(self) -> Iterator[memoryview]:
        cs, vol = self._keys.chunk_size, self._vol
        if self._progress is not None:
            self._progress.start(self._label, vol["size"])
        pool = _open_pool()
        try:
            for leaf in _leaves(self._session, self._keys, vol):
                if leaf.ids is None:
                    self._fail(leaf.start * cs, leaf.error)
                    return
                pieces = self._leaf(leaf, pool)
                try:
                    for piece in pieces:
                        if piece is None:
                            return
                        yield piece
                        if self._progress is not None:
                            self._progress.advance(len(piece))
                finally:
                    pieces.close()
        finally:
            pool.shutdown(cancel_futures=True)
            if self._progress is not None:
                self._progress.done()

    def _fail(self, offset: int, reason: str) -> None:
        self.error = f"{self._label} at offset {offset}: {reason}"

    def _leaf(self, leaf: Leaf, pool: Executor) -> Iterator[memoryview | None]:
        """The pieces of one leaf in order; None after a failure."""
        cs, size = self._keys.chunk_size, self._vol["size"]
        # Which chunks to fetch: the first time each comes, and again only if
        # it has left a STREAM_CACHE-entry LRU since (the same LRU, run below,
        # then holds every repeat it was expected to hold).
        fetch: list[bytes] = []
        lru: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        for chunk_id in leaf.ids:
            if chunk_id == ZERO_ID:
                continue
            if chunk_id in lru:
                lru.move_to_end(chunk_id)
                continue
            fetch.append(chunk_id)
            lru[chunk_id] = None
            if len(lru) > STREAM_CACHE:
                lru.popitem(last=False)
        opened = _opened(self._session, self._keys, fetch, pool)
        cache: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        zeros = memoryview(bytes(cs))
        try:
            for k, chunk_id in enumerate(leaf.ids):
                index = leaf.start + k
                expected = min(cs, size - index * cs)
                if chunk_id == ZERO_ID:
                    yield zeros[:expected]
                    continue
                if chunk_id in cache:
                    cache.move_to_end(chunk_id)
                    plain = cache[chunk_id]
                else:
                    want, plain = next(opened)
                    assert want == chunk_id
                    if isinstance(plain, str):
                        self._fail(index * cs, plain)
                        yield None
                        return
                    cache[chunk_id] = plain
                    if len(cache) > STREAM_CACHE:
                        cache.popitem(last=False)
                if len(plain) != expected:
                    self._fail(index * cs, f"chunk has {len(plain)} bytes, expected {expected}")
                    yield None
                    return
                self.chunks += 1
                yield memoryview(plain)
        finally:
            opened.close()
