# SPDX-License-Identifier: GPL-2.0-or-later
"""Helpers for the engine tests: an in-memory blob store and test volumes."""

import os

from qbackup import crypto
from qbackup.chunkmap import TreeWriter, depth_for
from qbackup.errors import RemoteError


class MemoryStore:
    """The part of proto.Session the chunk map reader uses, over a dict.

    Also the TreeWriter's put_node callback: it seals nodes with real crypto
    and checks that interior nodes come after their children.
    """

    version = 2  # as a version-2 daemon: no locate, verify reads in first-seen order
    max_batch = 4096

    def __init__(self, keys: crypto.Keys):
        self.keys = keys
        self.blobs: dict[bytes, tuple[int, bytes]] = {}
        self.sealer = crypto.Sealer(keys)
        self.new_nodes = 0
        self.gets = 0
        self.broken: set[bytes] = set()  # ids whose fetch fails with a RemoteError
        self.whole_batch_errors = False  # fail a whole get at once, as a daemon may

    def put_node(self, level: int, node_id: bytes, plain: bytes, refs: list[bytes]) -> None:
        assert refs and len(set(refs)) == len(refs) and crypto.ZERO_ID not in refs
        if level > 0:
            assert all(r in self.blobs for r in refs), "node stored before its children"
        if node_id not in self.blobs:
            self.new_nodes += 1
            self.blobs[node_id] = (crypto.TYPE_TREE, self.sealer.seal(crypto.TYPE_TREE, node_id, plain))

    def store_raw(self, plain: bytes, type: int = crypto.TYPE_TREE) -> bytes:
        """Seal and store any plaintext under its keyed id (a forged-but-authentic node)."""
        node_id = self.keys.chunk_id(plain, crypto.TYPE_TREE)
        self.blobs[node_id] = (type, self.sealer.seal(type, node_id, plain))
        return node_id

    def get(self, ids, *, window: int = 64, max_size: int | None = None):
        self.gets += 1
        ids = list(ids)
        if self.whole_batch_errors and self.broken & set(ids):
            raise RemoteError("io", "a pack is corrupt")
        for i in ids:
            if i in self.broken:
                raise RemoteError("io", f"pack holding {i.hex()[:8]} is corrupt")
            type_, data = self.blobs.get(i, (None, None))
            yield i, type_, data


def write_file(path, size: int, writes: list[tuple[int, bytes]]) -> str:
    """A sparse file of `size` bytes with `writes` = [(offset, bytes)] in it."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes:
            f.seek(offset)
            f.write(data)
    return str(path)


def random_ids(n: int) -> list[bytes]:
    raw = os.urandom(32 * n)
    return [raw[i:i + 32] for i in range(0, len(raw), 32)]


def store_volume(store: MemoryStore, data: bytes) -> dict:
    """Seal `data` as a volume's chunks and chunk map into `store`: the
    volume entry of a manifest (zero chunks stored as ZERO_ID)."""
    keys, cs = store.keys, store.keys.chunk_size
    writer = TreeWriter(keys, store.put_node)
    for offset in range(0, len(data), cs):
        chunk = data[offset:offset + cs]
        if chunk == bytes(len(chunk)):
            writer.add(crypto.ZERO_ID)
            continue
        chunk_id = keys.chunk_id(chunk)
        store.blobs[chunk_id] = (crypto.TYPE_DATA, store.sealer.seal(crypto.TYPE_DATA, chunk_id, chunk))
        writer.add(chunk_id)
    root, depth = writer.finish()
    chunks = -(-len(data) // cs)
    assert depth == depth_for(chunks)
    return {"size": len(data), "chunks": chunks, "root": root, "depth": depth, "settings": {}}
