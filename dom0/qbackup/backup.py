# SPDX-License-Identifier: GPL-2.0-or-later
"""The backup pipeline: volumes in, one committed snapshot out.

Per chunk, in order: read (holes skipped, zero chunks recorded as ZERO_ID),
keyed id (thread pool), HAVE in batches, and only for chunks the repository
lacks: compress + seal (thread pool) and PUT. Every stage is pipelined with
futures: the main thread reads and moves entries from stage to stage as
their futures complete, and blocks only when a bounded number of chunks is
in flight. Ids reach the chunk map (TreeWriter) in chunk order, each only
once its chunk is stored or its PUT is sent, so a tree node is always PUT
after its children (PROTOCOL §5). The manifest is committed last, and only
then does the local state record the snapshot.
"""

import collections
import os
import socket
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from qbackup import crypto, manifest
from qbackup.chunkmap import NODE_TYPE, TreeWriter, depth_for
from qbackup.crypto import ZERO_ID
from qbackup.errors import QbackupError
from qbackup.volume import iter_chunks

DATA_TYPE = crypto.TYPE_DATA
HAVE_BATCH = 128  # ids per HAVE request
IN_FLIGHT_BYTES = 64 << 20  # chunk data held between read and PUT
RECENT_PUTS = 16384  # ids remembered as sent in this run


@dataclass
class VolumeSource:
    qube: str
    volume: str
    path: str
    size: int
    settings: dict  # stored in the manifest (pool, rw, ...)


@dataclass
class BackupStats:
    snapshot_id: bytes
    volumes: int
    bytes_total: int
    bytes_read: int
    bytes_sent: int
    chunks_total: int
    chunks_zero: int
    chunks_new: int
    chunks_dedup: int
    seconds: float


class _Recent:
    """A bounded set of ids sent in this run (oldest forgotten first)."""

    def __init__(self, size: int):
        self._ids: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._size = size

    def __contains__(self, chunk_id: bytes) -> bool:
        return chunk_id in self._ids

    def add(self, chunk_id: bytes) -> None:
        self._ids[chunk_id] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)


@dataclass
class _Volume:
    source: VolumeSource
    tree: TreeWriter
    root: bytes = ZERO_ID
    started: bool = False


@dataclass
class _Entry:
    """A chunk, a run of zero chunks, or a volume's end, moving through the pipeline."""
    volume: _Volume
    nbytes: int = 0
    zeros: int = 0
    data: bytes | None = None
    hashed: Future | None = None  # -> chunk id
    id: bytes = ZERO_ID
    put: Future | None = None  # seal + PUT job -> blob size, done once the PUT is sent
    end: bool = False


@dataclass
class _Node:
    id: bytes
    plain: bytes
    refs: list[bytes]
    have: Future


@dataclass
class _Counters:
    bytes_sent: int = 0
    chunks_zero: int = 0
    chunks_new: int = 0
    chunks_dedup: int = 0


class _Pipeline:
    def __init__(self, session, keys: crypto.Keys, pool: ThreadPoolExecutor, progress, workers: int):
        self._session = session
        self._keys = keys
        self._pool = pool
        self._progress = progress
        self._sealer = crypto.Sealer(keys)
        self._recent = _Recent(RECENT_PUTS)
        self._limit = max(4 * workers, IN_FLIGHT_BYTES // keys.chunk_size)
        self._batch_size = max(1, min(HAVE_BATCH, self._limit // 4))
        self._batch: list[_Entry] = []
        self._hashing: collections.deque[list[_Entry]] = collections.deque()
        self._asking: collections.deque[tuple[list[_Entry], Future | None]] = collections.deque()
        self._sending: collections.deque[_Entry] = collections.deque()
        self._nodes: collections.deque[_Node] = collections.deque()
        self._in_flight = 0
        self._failure: BaseException | None = None
        self.counters = _Counters()

    # -- input (main thread)

    def volume(self, source: VolumeSource) -> _Volume:
        return _Volume(source, TreeWriter(self._keys, self._put_node))

    def add(self, vol: _Volume, nbytes: int, data: bytes | None) -> None:
        if data is None:
            last = self._batch[-1] if self._batch else None
            if last is not None and last.zeros and last.volume is vol:
                last.zeros += 1
                last.nbytes += nbytes
                return
            self._push(_Entry(vol, nbytes, zeros=1))
        else:
            self._push(_Entry(vol, nbytes, data=data, hashed=self._pool.submit(self._keys.chunk_id, data)))

    def end(self, vol: _Volume) -> None:
        self._push(_Entry(vol, end=True))
        self._close_batch()

    def drain(self) -> None:
        """Wait until every chunk and tree node has been stored or sent."""
        self._close_batch()
        while True:
            self._advance()
            if not self._in_flight and not self._nodes:
                return
            self._wait_oldest()

    def check(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _push(self, entry: _Entry) -> None:
        self._batch.append(entry)
        self._in_flight += 1
        if len(self._batch) >= self._batch_size:
            self._close_batch()
        self._advance()
        if self._in_flight >= self._limit:
            while self._in_flight > self._limit - self._batch_size:
                self._wait_oldest()
                self._advance()

    def _close_batch(self) -> None:
        if self._batch:
            self._hashing.append(self._batch)
            self._batch = []

    # -- stages

    def _advance(self) -> None:
        """Move every entry whose future is done on to its next stage."""
        self.check()
        # newest first: the pool runs jobs in order, so this stops at once while a batch is busy
        while self._hashing and all(e.hashed is None or e.hashed.done() for e in reversed(self._hashing[0])):
            self._ask(self._hashing.popleft())
        while self._asking and (self._asking[0][1] is None or self._asking[0][1].done()):
            self._send(*self._asking.popleft())
        while self._sending and (self._sending[0].put is None or self._sending[0].put.done()):
            self._complete(self._sending.popleft())
        while self._nodes and self._nodes[0].have.done():
            self._store_node(self._nodes.popleft())

    def _wait_oldest(self) -> None:
        """Block until the oldest unfinished future in the pipeline completes."""
        if self._sending:
            wait([self._sending[0].put])
        elif self._asking:
            wait([self._asking[0][1]])
        elif self._hashing:
            wait([e.hashed for e in self._hashing[0] if e.hashed is not None])
        elif self._batch:
            self._close_batch()
        elif self._nodes:
            wait([self._nodes[0].have])

    def _ask(self, batch: list[_Entry]) -> None:
        for e in batch:
            if e.hashed is not None:
                e.id = e.hashed.result()
                e.hashed = None
        ids = [e.id for e in batch if e.data is not None]
        self._asking.append((batch, self._session.have(ids) if ids else None))

    def _send(self, batch: list[_Entry], have: Future | None) -> None:
        missing = set(have.result()) if have is not None else set()
        asked = (e for e in batch if e.data is not None)
        for k, e in enumerate(asked):
            if k in missing and e.id not in self._recent:
                self._recent.add(e.id)
                e.put = self._pool.submit(self._seal_put, DATA_TYPE, e.id, e.data, None, True)
                self.counters.chunks_new += 1
            else:
                self.counters.chunks_dedup += 1
            e.data = None
        self._sending.extend(batch)

    def _complete(self, e: _Entry) -> None:
        """The entry's chunks are stored or sent: feed the tree, in chunk order."""
        self._in_flight -= 1
        vol = e.volume
        if not vol.started:
            vol.started = True
            if self._progress is not None:
                self._progress.start(f"{vol.source.qube}:{vol.source.volume}", vol.source.size)
        if e.put is not None:
            self.counters.bytes_sent += e.put.result()
        if e.end:
            vol.root, _ = vol.tree.finish()
            if self._progress is not None:
                self._progress.done()
            return
        if e.zeros:
            vol.tree.add_zeros(e.zeros)
            self.counters.chunks_zero += e.zeros
        else:
            vol.tree.add(e.id)
        if self._progress is not None:
            self._progress.advance(e.nbytes)

    def _put_node(self, level: int, node_id: bytes, plain: bytes, refs: list[bytes]) -> None:
        """TreeWriter callback: ask whether the node is stored; it is sent, in order, later."""
        if node_id not in self._recent:
            self._recent.add(node_id)
            self._nodes.append(_Node(node_id, plain, refs, self._session.have([node_id])))

    def _store_node(self, node: _Node) -> None:
        if node.have.result():
            self.counters.bytes_sent += self._seal_put(NODE_TYPE, node.id, node.plain, node.refs, False)

    # -- worker threads

    def _seal_put(self, type: int, chunk_id: bytes, plain: bytes, refs: list[bytes] | None,
                  compress: bool) -> int:
        blob = self._sealer.seal(type, chunk_id, plain, compress=compress)
        self._session.put(chunk_id, type, blob, refs).add_done_callback(self._put_done)
        return len(blob)

    def _put_done(self, put: Future) -> None:
        """On the session's reader thread: remember the first failed PUT."""
        if put.exception() is not None and self._failure is None:
            self._failure = put.exception()


def _manifest_qubes(sources: list[VolumeSource], qubes_meta: dict, chunk_size: int) -> dict:
    """The manifest's qubes map with placeholder roots, validated before any work."""
    qubes = {name: {"properties": {}, "features": {}, "tags": [], "volume_config": {},
                    "firewall": None, "devices": None, "dependencies": {}, **meta, "volumes": {}}
             for name, meta in qubes_meta.items()}
    for s in sources:
        if s.qube not in qubes:
            raise QbackupError(f"volume {s.qube}:{s.volume} belongs to a qube without metadata")
        if s.volume in qubes[s.qube]["volumes"]:
            raise QbackupError(f"volume {s.qube}:{s.volume} is listed twice")
        chunks = -(-s.size // chunk_size)
        qubes[s.qube]["volumes"][s.volume] = {"size": s.size, "chunks": chunks, "root": ZERO_ID,
                                              "depth": depth_for(chunks), "settings": s.settings}
    manifest.check_qubes(qubes, chunk_size)
    return qubes


def backup(session, keys: crypto.Keys, sources: list[VolumeSource], qubes_meta: dict, *, state,
           progress=None, workers: int | None = None, predecessor: bytes | None = None) -> BackupStats:
    """Back up `sources` and the qubes' metadata as one new snapshot; commit it last.

    `qubes_meta` = {qube: {"class", "properties", "features", "tags",
    "volume_config", "firewall", "devices", "dependencies"}} (docs/SNAPSHOTS.md
    §3; all but "class" default to empty, firewall and devices to nil: not
    recorded); each qube's "volumes" in the manifest are the sources. The predecessor defaults to the state's
    head for this repository.
    """
    started = time.monotonic()
    chunk_size = keys.chunk_size
    qubes = _manifest_qubes(sources, qubes_meta, chunk_size)
    if predecessor is None:
        predecessor = state.load(keys.repo_id).head
    snapshot_id, host = os.urandom(32), socket.gethostname()
    # The final manifest differs only in its roots and time (of the same
    # sizes): one too large for a snapshot is refused before anything is sent.
    manifest.encode(manifest.Manifest(keys.repo_id, snapshot_id, time.time(), host, predecessor,
                                      chunk_size, qubes))
    workers = workers or os.cpu_count() or 1
    bytes_read = 0
    with ThreadPoolExecutor(workers, thread_name_prefix="qbackup-backup") as pool:
        pipeline = _Pipeline(session, keys, pool, progress, workers)
        try:
            volumes = []
            for source in sources:
                vol = pipeline.volume(source)
                volumes.append(vol)
                reader = iter_chunks(source.path, source.size, chunk_size)
                for index, data in reader:
                    pipeline.add(vol, min(chunk_size, source.size - index * chunk_size), data)
                bytes_read += reader.bytes_read
                pipeline.end(vol)
            pipeline.drain()
        except BaseException:
            # Workers may be blocked sending to a backup qube that stopped
            # reading: kill the session first so they wake, then join them.
            session.abort("backup interrupted")
            pool.shutdown(cancel_futures=True)
            raise
    session.flush()
    pipeline.check()  # every PUT has been answered once flush returns
    for vol in volumes:
        qubes[vol.source.qube]["volumes"][vol.source.volume]["root"] = vol.root
    now = time.time()
    plain = manifest.encode(manifest.Manifest(keys.repo_id, snapshot_id, now, host,
                                              predecessor, chunk_size, qubes))
    sealed = crypto.seal_snapshot(keys, snapshot_id, plain)
    session.commit(snapshot_id, sealed, _distinct_roots(v.root for v in volumes))
    state.record_head(keys.repo_id, snapshot_id, now)
    c = pipeline.counters
    return BackupStats(snapshot_id, len(sources), sum(s.size for s in sources), bytes_read,
                       c.bytes_sent + len(sealed), sum(v.tree.chunks for v in volumes), c.chunks_zero,
                       c.chunks_new, c.chunks_dedup, time.monotonic() - started)


def _distinct_roots(roots: Iterable[bytes]) -> list[bytes]:
    return [r for r in dict.fromkeys(roots) if r != ZERO_ID]
