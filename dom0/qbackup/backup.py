# SPDX-License-Identifier: GPL-2.0-or-later
"""The backup pipeline: volumes in, one committed snapshot out.

Per chunk, in order: read (holes skipped, zero chunks recorded as ZERO_ID),
keyed id (thread pool), HAVE in batches, and only for chunks the repository
lacks: compress + seal (thread pool) and PUT. A volume with a `previous`
chunk map and the list of chunks that may have `changed` since (change
tracking, qbackup.copies) reads only those: every other chunk takes its id
from the previous map, whole leaves of which are reused as they are, so it
is not read, hashed or asked about (docs/CHANGES.md). Every stage is pipelined with
futures: the main thread reads and moves entries from stage to stage as
their futures complete, and blocks only when a bounded number of chunks is
in flight. Ids reach the chunk map (TreeWriter) in chunk order, each only
once its chunk is stored or its PUT is sent, so a tree node is always PUT
after its children (PROTOCOL §5). The manifest is committed last, and only
then does the local state record the snapshot.
"""

import collections
import contextlib
import os
import queue
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from qbackup import chunkmap, crypto, manifest, threads
from qbackup.chunkmap import FANOUT, ID_SIZE, NODE_TYPE, LeafRef, TreeWriter, depth_for
from qbackup.crypto import ZERO_ID
from qbackup.errors import IntegrityError, QbackupError, RemoteError
from qbackup.volume import VolumeFile

DATA_TYPE = crypto.TYPE_DATA
HAVE_BATCH = 128  # ids per HAVE request
IN_FLIGHT_BYTES = 64 << 20  # chunk data held between read and PUT
RECENT_PUTS = 16384  # ids remembered as sent in this run
LEAVES_AHEAD = 32  # previous-map leaves fetched ahead of the reader


@dataclass(frozen=True)
class Previous:
    """A volume's chunk map in the snapshot that read its base copy."""
    root: bytes
    depth: int
    chunks: int
    size: int


@dataclass
class VolumeSource:
    qube: str
    volume: str
    path: str
    size: int
    settings: dict  # stored in the manifest (pool, rw, ...)
    file: VolumeFile | None = None  # opened once (size is its size); None: open `path`
    # Change tracking: the chunk map of the snapshot that read the base copy,
    # and the runs [first, end) of chunk indexes that may differ from it.
    # Without both, every chunk is read.
    previous: Previous | None = None
    changed: list[tuple[int, int]] | None = None
    origin: dict | None = None  # the manifest's `source` entry (docs/SNAPSHOTS.md)
    how: str = "full"  # full | changed | fallback (reported, docs/CHANGES.md)
    why: str | None = None


@dataclass
class VolumeRead:
    """How one volume was read, for the command's report."""
    qube: str
    volume: str
    how: str
    why: str | None
    bytes_read: int
    chunks_unchanged: int


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
    chunks_unchanged: int = 0
    reads: list[VolumeRead] = field(default_factory=list)


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
    unchanged: int = 0


@dataclass
class _Entry:
    """A chunk, a run of zero chunks, or a volume's end, moving through the pipeline."""
    volume: _Volume
    nbytes: int = 0
    zeros: int = 0
    known: bytearray | None = None  # ids taken from the previous map, in order
    leaf: bytes | None = None  # a whole leaf of the previous map: its id ...
    count: int = 0  # ... and how many chunks it covers
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

    def add_known(self, vol: _Volume, nbytes: int, chunk_id: bytes) -> None:
        """A chunk whose id comes from the previous map: neither read, hashed nor asked about."""
        last = self._batch[-1] if self._batch else None
        if last is not None and last.known is not None and last.volume is vol \
                and len(last.known) < FANOUT * ID_SIZE:
            last.known += chunk_id
            last.nbytes += nbytes
            return
        self._push(_Entry(vol, nbytes, known=bytearray(chunk_id)))

    def add_leaf(self, vol: _Volume, nbytes: int, leaf_id: bytes, count: int) -> None:
        """A whole leaf of the previous map, reused as it is."""
        self._push(_Entry(vol, nbytes, leaf=leaf_id, count=count))

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
        if e.leaf is not None:
            vol.tree.add_leaf(e.leaf, e.count)
            vol.unchanged += e.count
        elif e.known is not None:
            for i in range(0, len(e.known), ID_SIZE):
                vol.tree.add(bytes(e.known[i:i + ID_SIZE]))
            vol.unchanged += len(e.known) // ID_SIZE
        elif e.zeros:
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


class _LeafFetcher:
    """Fetches the previous maps' leaves the reader will need, in the order it
    needs them, on its own thread and at most LEAVES_AHEAD ahead: a leaf is
    then at hand when its turn comes, instead of waiting behind every PUT
    already in flight (answers come in order)."""

    def __init__(self, session, keys: crypto.Keys, wanted: list[LeafRef]):
        self._queue: queue.Queue = queue.Queue(LEAVES_AHEAD)
        self._stop = threading.Event()
        threads.start(self._run, "qbackup-leaves", session, keys, wanted)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, session, keys: crypto.Keys, wanted: list[LeafRef]) -> None:
        try:
            for g in range(0, len(wanted), chunkmap.LEAF_GROUP):
                group = wanted[g:g + chunkmap.LEAF_GROUP]
                for ids in chunkmap.fetch_leaves(session, keys, group):
                    if not self._put(ids):
                        return
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            self._put(e)

    def take(self) -> list[bytes] | str:
        """The next wanted leaf's ids, or why they cannot be had."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()


def _changed_in(runs: list[tuple[int, int]], lo: int, hi: int, start: int) -> tuple[set[int], int]:
    """Indexes of [lo, hi) inside the sorted `runs`, looked up from run
    `start` on; and the first run that may still matter for later leaves."""
    while start < len(runs) and runs[start][1] <= lo:
        start += 1
    found: set[int] = set()
    j = start
    while j < len(runs) and runs[j][0] < hi:
        found.update(range(max(runs[j][0], lo), min(runs[j][1], hi)))
        j += 1
    return found, start


def _plan(source: VolumeSource, refs: list[LeafRef], chunk_size: int) -> list[tuple]:
    """Per leaf of the new map, in order: ("leaf", lo, hi, ref) to reuse the
    previous leaf whole; ("read", lo, hi) to read every chunk; ("mixed", lo,
    hi, ref, changed) to read `changed` and take the others' ids from the
    previous leaf `ref`. A chunk's id may come from the previous map only if
    its byte range is the same in both (a full chunk within both sizes, or
    the same last chunk) and it is not in a changed run."""
    prev = source.previous
    n = -(-source.size // chunk_size)
    same = n if prev.size == source.size else min(prev.size, source.size) // chunk_size
    runs = sorted(source.changed)
    plan, start = [], 0
    for k in range(-(-n // FANOUT)):
        lo, hi = k * FANOUT, min((k + 1) * FANOUT, n)
        changed, start = _changed_in(runs, lo, hi, start)
        changed.update(range(max(lo, same), hi))
        ref = refs[k] if k < len(refs) else None
        if not changed and ref is not None and ref.count == hi - lo:
            plan.append(("leaf", lo, hi, ref))
        elif ref is None or len(changed) == hi - lo:
            plan.append(("read", lo, hi))
        else:
            plan.append(("mixed", lo, hi, ref, changed))
    return plan


def _stretches(lo: int, hi: int, changed: set[int]) -> Iterator[tuple[int, int, bool]]:
    """[lo, hi) cut into maximal runs (a, b, changed?)."""
    a = lo
    while a < hi:
        flag = a in changed
        b = a + 1
        while b < hi and (b in changed) == flag:
            b += 1
        yield a, b, flag
        a = b


class _Reader:
    """Feeds one volume's chunks to the pipeline, reading only what it must."""

    def __init__(self, pipeline: _Pipeline, chunk_size: int):
        self.pipeline = pipeline
        self.chunk_size = chunk_size

    def _nbytes(self, source: VolumeSource, index: int) -> int:
        return min(self.chunk_size, source.size - index * self.chunk_size)

    def read(self, vol: _Volume, vf: VolumeFile, source: VolumeSource, first: int, end: int) -> None:
        for index, data in vf.chunks(self.chunk_size, [(first, end)], size=source.size):
            self.pipeline.add(vol, self._nbytes(source, index), data)

    def full(self, vol: _Volume, vf: VolumeFile, source: VolumeSource) -> None:
        for index, data in vf.chunks(self.chunk_size, size=source.size):
            self.pipeline.add(vol, self._nbytes(source, index), data)

    def changed(self, vol: _Volume, vf: VolumeFile, source: VolumeSource, plan: list[tuple],
                fetcher: _LeafFetcher) -> list[str]:
        """Follow the plan; the problems met with the previous map's leaves."""
        problems = []
        for step in plan:
            kind, lo, hi = step[:3]
            if kind == "leaf":
                ref = step[3]
                nbytes = min(hi * self.chunk_size, source.size) - lo * self.chunk_size
                self.pipeline.add_leaf(vol, nbytes, ref.id, ref.count)
                continue
            if kind == "read":
                self.read(vol, vf, source, lo, hi)
                continue
            ids = fetcher.take()
            if isinstance(ids, str):  # that leaf is lost: read its chunks in full
                problems.append(f"chunks {lo}-{hi - 1}: {ids}")
                self.read(vol, vf, source, lo, hi)
                continue
            for a, b, changed in _stretches(lo, hi, step[4]):
                if changed:
                    self.read(vol, vf, source, a, b)
                else:
                    for index in range(a, b):
                        self.pipeline.add_known(vol, self._nbytes(source, index), ids[index - lo])
        return problems


def _prepare(session, keys: crypto.Keys, sources: list[VolumeSource]
             ) -> tuple[list[list[tuple] | None], list[LeafRef]]:
    """Each source's plan (None: read in full) and every leaf to fetch, in
    reading order. A previous map whose interior cannot be read makes its
    volume a fallback to a full read."""
    plans: list[list[tuple] | None] = []
    wanted: list[LeafRef] = []
    for source in sources:
        if source.previous is None or source.changed is None:
            plans.append(None)
            continue
        prev = source.previous
        try:
            refs = chunkmap.leaf_refs(session, keys, prev.root, prev.depth, prev.chunks)
        except IntegrityError as e:
            source.how = "fallback"
            source.why = f"the previous snapshot's chunk map cannot be read ({e})"
            plans.append(None)
            continue
        plan = _plan(source, refs, keys.chunk_size)
        wanted += [step[3] for step in plan if step[0] == "mixed"]
        plans.append(plan)
    return plans, wanted


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
        entry = {"size": s.size, "chunks": chunks, "root": ZERO_ID, "depth": depth_for(chunks),
                 "settings": s.settings}
        if s.origin is not None:
            entry[manifest.SOURCE_KEY] = s.origin
        qubes[s.qube]["volumes"][s.volume] = entry
    manifest.check_qubes(qubes, chunk_size)
    return qubes


def _read_volume(reader: _Reader, vol: _Volume, source: VolumeSource, plan: list[tuple] | None,
                 fetcher: _LeafFetcher) -> VolumeRead:
    """Feed one volume to the pipeline; how it was read."""
    vf = source.file if source.file is not None else VolumeFile(source.path)
    try:
        if plan is None:
            reader.full(vol, vf, source)
            problems = []
        else:
            problems = reader.changed(vol, vf, source, plan, fetcher)
        if vf.changed_since_open():
            raise QbackupError(f"{source.qube}:{source.volume}: {vf.path} changed while it was "
                               "read (did the qube start?); nothing was committed")
        why = source.why
        if problems:
            why = (f"{why}; " if why else "") + (
                f"{len(problems)} leaves of the previous chunk map were unusable and read "
                f"in full (first: {problems[0]})")
        return VolumeRead(source.qube, source.volume, source.how, why, vf.bytes_read, 0)
    finally:
        if source.file is None:
            vf.close()


def backup(session, keys: crypto.Keys, sources: list[VolumeSource], qubes_meta: dict, *, state,
           progress=None, workers: int | None = None, predecessor: bytes | None = None) -> BackupStats:
    """Back up `sources` and the qubes' metadata as one new snapshot; commit it last.

    `qubes_meta` = {qube: {"class", "properties", "features", "tags",
    "volume_config", "firewall", "devices", "dependencies"}} (docs/SNAPSHOTS.md
    §3; all but "class" default to empty, firewall and devices to nil: not
    recorded); each qube's "volumes" in the manifest are the sources. The
    predecessor defaults to the state's head for this repository. A source
    with `previous` and `changed` reads only the changed chunks (see
    VolumeSource).
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
    plans, wanted = _prepare(session, keys, sources)
    reads: list[VolumeRead] = []
    with threads.pool(workers, "qbackup-backup") as pool:
        pipeline = _Pipeline(session, keys, pool, progress, workers)
        fetcher = _LeafFetcher(session, keys, wanted)
        reader = _Reader(pipeline, chunk_size)
        try:
            volumes = []
            for source, plan in zip(sources, plans):
                vol = pipeline.volume(source)
                volumes.append(vol)
                reads.append(_read_volume(reader, vol, source, plan, fetcher))
                pipeline.end(vol)
            pipeline.drain()
        except BaseException:
            # Workers may be blocked sending to a backup qube that stopped
            # reading: kill the session first so they wake, then join them.
            session.abort("backup interrupted")
            pool.shutdown(cancel_futures=True)
            raise
        finally:
            fetcher.close()
    session.flush()
    with _missing_refs_explained(sources):
        pipeline.check()  # every PUT has been answered once flush returns
    for vol, read in zip(volumes, reads):
        qubes[vol.source.qube]["volumes"][vol.source.volume]["root"] = vol.root
        read.chunks_unchanged = vol.unchanged
    now = time.time()
    plain = manifest.encode(manifest.Manifest(keys.repo_id, snapshot_id, now, host,
                                              predecessor, chunk_size, qubes))
    sealed = crypto.seal_snapshot(keys, snapshot_id, plain)
    with _missing_refs_explained(sources):
        session.commit(snapshot_id, sealed, _distinct_roots(v.root for v in volumes))
    state.record_head(keys.repo_id, snapshot_id, now)
    c = pipeline.counters
    return BackupStats(snapshot_id, len(sources), sum(s.size for s in sources),
                       sum(r.bytes_read for r in reads), c.bytes_sent + len(sealed),
                       sum(v.tree.chunks for v in volumes), c.chunks_zero, c.chunks_new,
                       c.chunks_dedup, time.monotonic() - started,
                       sum(v.unchanged for v in volumes), reads)


@contextlib.contextmanager
def _missing_refs_explained(sources: list[VolumeSource]) -> Iterator[None]:
    """A chunk-map node reused from a previous snapshot that the repository
    no longer holds: say so, and what to do."""
    try:
        yield
    except RemoteError as e:
        if e.code != "missing_refs" or not any(s.how == "changed" for s in sources):
            raise
        raise QbackupError(f"{e}: the repository lacks data that an earlier snapshot "
                           "references, which this backup reused (qbackup verify --all "
                           "says where); qbackup backup --full sends it again") from None


def _distinct_roots(roots: Iterable[bytes]) -> list[bytes]:
    return [r for r in dict.fromkeys(roots) if r != ZERO_ID]
