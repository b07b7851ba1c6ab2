# SPDX-License-Identifier: GPL-2.0-or-later
"""Per-volume chunk map: a tree of deduplicated, encrypted blobs (type 2).

Leaves (level 0) hold the ids of up to FANOUT consecutive chunks; a node at
level L holds the ids of up to FANOUT consecutive level L-1 nodes. A volume of
n chunks has depth(n) levels, and its root (level depth-1) covers every chunk;
which chunks a node covers follows from its position alone, so each node must
hold exactly the number of ids its range needs. A node whose ids are all
ZERO_ID is ZERO_ID itself and is never stored. See docs/SNAPSHOTS.md.

TreeWriter builds a tree while ids stream in (memory: depth x FANOUT ids);
iter_leaves walks a stored tree, authenticating and validating every node;
count_changed compares two trees, skipping the subtrees they share.
"""

import collections
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from qbackup import crypto
from qbackup.crypto import ZERO_ID
from qbackup.errors import IntegrityError, ProtocolError, RemoteError

FANOUT = 1024
ID_SIZE = 32
MAGIC = b"qbm1"
HEADER_SIZE = len(MAGIC) + 1  # magic, level byte
NODE_TYPE = crypto.TYPE_TREE
MAX_NODE_PLAIN = HEADER_SIZE + FANOUT * ID_SIZE
MAX_DEPTH = 7  # FANOUT**7 chunks: far beyond any volume
LEAF_GROUP = 16  # leaves fetched per Session.get while walking

PutNode = Callable[[int, bytes, bytes, list[bytes]], None]  # (level, id, plaintext, refs)


def depth_for(chunks: int) -> int:
    """Number of levels of the tree of a volume of `chunks` chunks (>= 1)."""
    depth, span = 1, FANOUT
    while span < chunks:
        depth, span = depth + 1, span * FANOUT
    return depth


def encode_node(level: int, ids: bytes) -> bytes:
    return MAGIC + bytes([level]) + ids


def decode_node(plain: bytes, level: int, count: int) -> list[bytes]:
    """Ids of an authenticated node plaintext that must be at `level` with `count` ids."""
    if len(plain) != HEADER_SIZE + count * ID_SIZE:
        raise IntegrityError(f"chunk map node has {len(plain)} bytes, expected {HEADER_SIZE + count * ID_SIZE}")
    if plain[:len(MAGIC)] != MAGIC:
        raise IntegrityError("chunk map node has a bad magic")
    if plain[len(MAGIC)] != level:
        raise IntegrityError(f"chunk map node is at level {plain[len(MAGIC)]}, expected {level}")
    return [plain[i:i + ID_SIZE] for i in range(HEADER_SIZE, len(plain), ID_SIZE)]


class TreeWriter:
    """Streams chunk ids in order into a tree; `put_node` stores each new node.

    `put_node(level, id, plaintext, refs)` is called children first, with
    refs = the node's distinct non-zero child ids; it is never called for
    ZERO_ID nodes. It may deduplicate (the same node can come up again).
    """

    def __init__(self, keys: crypto.Keys, put_node: PutNode):
        self._keys = keys
        self._put_node = put_node
        self._pending: list[bytearray] = [bytearray()]  # ids waiting per level
        self.chunks = 0

    def add(self, chunk_id: bytes) -> None:
        self._pending[0] += chunk_id
        self.chunks += 1
        if len(self._pending[0]) == FANOUT * ID_SIZE:
            self._close(0)

    def add_zeros(self, count: int) -> None:
        """Append `count` ZERO_ID chunks (whole zero leaves cost nothing)."""
        while count:
            if not self._pending[0] and count >= FANOUT:
                self._push(1, ZERO_ID)
                self.chunks += FANOUT
                count -= FANOUT
            else:
                self.add(ZERO_ID)
                count -= 1

    def add_leaf(self, leaf_id: bytes, count: int) -> None:
        """Append a whole leaf of `count` chunks whose id is known (from a
        previous tree of the same chunk positions): it is not rebuilt, and
        not passed to put_node. Only at a leaf boundary; `count` is FANOUT
        except for the volume's last leaf."""
        if self._pending[0] or self.chunks % FANOUT or not 0 < count <= FANOUT:
            raise ValueError("add_leaf needs a leaf boundary and 1..FANOUT chunks")
        self.chunks += count
        self._push(1, leaf_id)

    def finish(self) -> tuple[bytes, int]:
        """(root id, depth) of the tree of every id added."""
        depth = depth_for(self.chunks)
        for level in range(depth):
            if len(self._pending) > level and self._pending[level]:
                self._close(level)
        if self.chunks == 0:
            return ZERO_ID, depth
        return bytes(self._pending[depth]), depth

    def _close(self, level: int) -> None:
        ids = bytes(self._pending[level])
        self._pending[level].clear()
        if ids == bytes(len(ids)):
            node_id = ZERO_ID
        else:
            plain = encode_node(level, ids)
            node_id = self._keys.chunk_id(plain, NODE_TYPE)
            refs = list(dict.fromkeys(ids[i:i + ID_SIZE] for i in range(0, len(ids), ID_SIZE)))
            self._put_node(level, node_id, plain, [r for r in refs if r != ZERO_ID])
        self._push(level + 1, node_id)

    def _push(self, level: int, node_id: bytes) -> None:
        if len(self._pending) == level:
            self._pending.append(bytearray())
        self._pending[level] += node_id
        if len(self._pending[level]) == FANOUT * ID_SIZE:
            self._close(level)


@dataclass
class Leaf:
    """Chunks [start, start + count) of a volume: their ids, or why they are unreadable."""
    start: int
    count: int
    ids: list[bytes] | None
    error: str | None = None


def iter_leaves(session, keys: crypto.Keys, root: bytes, depth: int, chunks: int) -> Iterator[Leaf]:
    """Walk a stored tree and yield its leaves in chunk order.

    A node that is missing, fails authentication or is malformed yields one
    Leaf with ids None and an error covering its whole range; the walk goes
    on. Every Session.get is consumed completely before a Leaf is yielded, so
    the caller may use the session between leaves.
    """
    if depth != depth_for(chunks) or len(root) != ID_SIZE:
        raise IntegrityError(f"chunk map of {chunks} chunks cannot have depth {depth}")
    if chunks:
        yield from _walk(session, keys, depth - 1, [root], 0, chunks)


def _walk(session, keys, level: int, node_ids: list[bytes], start: int, chunks: int) -> Iterator[Leaf]:
    """Leaves under consecutive nodes `node_ids` at `level`, the first covering chunk `start`."""
    span = FANOUT ** (level + 1)  # chunks under one node at this level
    group = LEAF_GROUP if level == 0 else 1
    for g in range(0, len(node_ids), group):
        nodes = _fetch_nodes(session, keys, level, node_ids[g:g + group], start + g * span, chunks)
        for node_start, children, error in nodes:
            covered = min(span, chunks - node_start)
            if error is not None:
                yield Leaf(node_start, covered, None, error)
            elif level == 0:
                yield Leaf(node_start, covered, children)
            else:
                yield from _walk(session, keys, level - 1, children, node_start, chunks)


def _fetch_nodes(session, keys, level: int, node_ids: list[bytes], first: int, chunks: int):
    """[(start, child ids | None, error | None)] for consecutive nodes, fetched at once."""
    span = FANOUT ** (level + 1)
    child_span = FANOUT ** level
    fetched = _fetch(session, keys, [n for n in dict.fromkeys(node_ids) if n != ZERO_ID])
    result = []
    for k, node_id in enumerate(node_ids):
        node_start = first + k * span
        count = -(-min(span, chunks - node_start) // child_span)
        plain = None if node_id == ZERO_ID else fetched[node_id]
        if plain is None:
            result.append((node_start, [ZERO_ID] * count, None))
        elif isinstance(plain, str):
            result.append((node_start, None, plain))
        else:
            try:
                result.append((node_start, decode_node(plain, level, count), None))
            except IntegrityError as e:
                result.append((node_start, None, str(e)))
    return result


@dataclass(frozen=True)
class LeafRef:
    """Leaf `index` of a stored tree: chunks [start, start + count) and its id."""
    index: int
    start: int
    count: int
    id: bytes


def leaf_refs(session, keys: crypto.Keys, root: bytes, depth: int, chunks: int) -> list[LeafRef]:
    """The leaves of a stored tree, in order, found by walking only its
    interior nodes (levels >= 1: one id per FANOUT chunks). IntegrityError
    if an interior node is missing, forged or malformed."""
    if depth != depth_for(chunks) or len(root) != ID_SIZE:
        raise IntegrityError(f"chunk map of {chunks} chunks cannot have depth {depth}")
    ids = [root]
    for level in range(depth - 1, 0, -1):
        nodes = _fetch_nodes(session, keys, level, ids, 0, chunks)
        errors = [error for _, _, error in nodes if error is not None]
        if errors:
            raise IntegrityError(errors[0])
        ids = [child for _, children, _ in nodes for child in children]
    return [LeafRef(k, k * FANOUT, min(FANOUT, chunks - k * FANOUT), leaf_id)
            for k, leaf_id in enumerate(ids)]


def fetch_leaves(session, keys: crypto.Keys, leaves: list[LeafRef]) -> list[list[bytes] | str]:
    """For each leaf, in order (they may belong to several trees): its chunk
    ids, or why they cannot be had; authenticated and checked like every
    node (an all-zero leaf is not fetched)."""
    fetched = _fetch(session, keys, [n for n in dict.fromkeys(leaf.id for leaf in leaves)
                                     if n != ZERO_ID])
    result: list[list[bytes] | str] = []
    for leaf in leaves:
        plain = None if leaf.id == ZERO_ID else fetched[leaf.id]
        if plain is None:
            result.append([ZERO_ID] * leaf.count)
        elif isinstance(plain, str):
            result.append(plain)
        else:
            try:
                result.append(decode_node(plain, 0, leaf.count))
            except IntegrityError as e:
                result.append(str(e))
    return result


def get_each(session, ids: Iterable[bytes], window: int, max_size: int
             ) -> Iterator[tuple[bytes, int | None, bytes | None, str | None]]:
    """(id, untrusted_type, untrusted_data, error) for each of `ids`, in order.

    `ids` is taken lazily, as Session.get asks for more (at most `window`
    blobs of at most `max_size` bytes waiting: a bigger one is a protocol
    violation), going on past errors. The daemon may answer a whole batch
    with one error, so after a RemoteError the ids asked but not answered
    are asked one at a time until one fails on its own: that id gets the
    error, and batching resumes after it.
    """
    source, single = iter(ids), False
    while True:
        asked: collections.deque[bytes] = collections.deque()  # taken, not yet answered
        taken = 0

        def take(batch: Iterator[bytes]) -> Iterator[bytes]:
            nonlocal taken
            for chunk_id in batch:
                asked.append(chunk_id)
                taken += 1
                yield chunk_id
        try:
            for _, untrusted_type, untrusted_data in session.get(
                    take(itertools.islice(source, 1) if single else source),
                    window=window, max_size=max_size):
                yield asked.popleft(), untrusted_type, untrusted_data, None
        except RemoteError as e:
            if single:
                yield asked.popleft(), None, None, str(e)
            source, single = itertools.chain(list(asked), source), not single
            continue
        if asked:
            raise ProtocolError(f"the backup qube answered {taken - len(asked)} of {taken} ids")
        if not (single and taken):
            return  # a whole batch went through, or nothing was left to ask


def _fetch(session, keys, wanted: list[bytes]) -> dict[bytes, bytes | str]:
    """Authenticated plaintext of each wanted node, or why it is unusable."""
    fetched: dict[bytes, bytes | str] = {}
    if not wanted:
        return fetched  # no round trip for a range of zero nodes
    for want, untrusted_type, untrusted_data, error in get_each(
            session, wanted, LEAF_GROUP, crypto.max_blob_size(MAX_NODE_PLAIN)):
        if error is not None:
            fetched[want] = f"cannot fetch chunk map node: {error}"
        elif untrusted_type is None:
            fetched[want] = "chunk map node missing"
        elif untrusted_type != NODE_TYPE:
            fetched[want] = f"chunk map node has type {untrusted_type}"
        else:
            fetched[want] = _open_node(keys, want, untrusted_data)
    return fetched


def _open_node(keys, node_id: bytes, untrusted_data: bytes) -> bytes | str:
    try:
        return crypto.open_blob(keys, NODE_TYPE, node_id, untrusted_data, MAX_NODE_PLAIN)
    except IntegrityError as e:
        return f"chunk map node fails authentication: {e}"



def count_changed(session, keys: crypto.Keys, old: dict, new: dict) -> int:
    """How many chunks of volume `new` differ from the chunk at the same
    position of volume `old` (manifest volume entries; chunks past the end
    of `old` count as changed). Subtrees with the same id hold the same
    chunks and are not fetched. IntegrityError if a node it needs is
    missing, forged or malformed."""
    if old["depth"] != new["depth"]:
        return _count_leaves(session, keys, old, new)
    return _count_nodes(session, keys, new["depth"] - 1, old["root"], new["root"], 0,
                        old["chunks"], new["chunks"])


def _covered(level: int, start: int, chunks: int) -> int:
    return max(0, min(FANOUT ** (level + 1), chunks - start))


def _children(session, keys, level: int, node_id: bytes, start: int, chunks: int) -> list[bytes]:
    [(_, children, error)] = _fetch_nodes(session, keys, level, [node_id], start, chunks)
    if error is not None:
        raise IntegrityError(f"chunks {start}..: {error}")
    return children


def _count_nodes(session, keys, level: int, old_id: bytes, new_id: bytes, start: int,
                 old_chunks: int, new_chunks: int) -> int:
    old_covered = _covered(level, start, old_chunks)
    new_covered = _covered(level, start, new_chunks)
    if old_id == new_id and old_covered == new_covered:
        return 0
    if new_covered == 0 or old_covered == 0:
        return new_covered
    old_children = _children(session, keys, level, old_id, start, old_chunks)
    new_children = _children(session, keys, level, new_id, start, new_chunks)
    if level == 0:
        return sum(1 for a, b in itertools.zip_longest(old_children, new_children)
                   if b is not None and a != b)
    span = FANOUT ** level
    return sum(_count_nodes(session, keys, level - 1,
                            old_children[k] if k < len(old_children) else ZERO_ID, child,
                            start + k * span, old_chunks, new_chunks)
               for k, child in enumerate(new_children))


def _count_leaves(session, keys, old: dict, new: dict) -> int:
    """count_changed for trees of different depths (a volume that grew or
    shrank past a power of FANOUT): leaf by leaf."""
    changed = 0
    old_leaves = iter_leaves(session, keys, old["root"], old["depth"], old["chunks"])
    new_leaves = iter_leaves(session, keys, new["root"], new["depth"], new["chunks"])
    for a, b in itertools.zip_longest(old_leaves, new_leaves):
        if b is None:
            break
        for leaf in (a, b):
            if leaf is not None and leaf.ids is None:
                raise IntegrityError(f"chunks {leaf.start}..: {leaf.error}")
        old_ids = a.ids if a is not None else []
        changed += sum(1 for x, y in itertools.zip_longest(old_ids, b.ids)
                       if y is not None and x != y)
    return changed
