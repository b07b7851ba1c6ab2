# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests for qbackup.chunkmap: the chunk map tree, its writer and its reader."""

import pytest
from engine_helpers import MemoryStore, random_ids

from qbackup import crypto
from qbackup.chunkmap import (FANOUT, MAGIC, TreeWriter, decode_node, depth_for, encode_node,
                              count_changed, get_each, iter_leaves)
from qbackup.crypto import TYPE_TREE, ZERO_ID
from qbackup.errors import IntegrityError, ProtocolError, QbackupError


def iter_ids(session, keys, root, depth, chunks):
    """Every chunk id of a stored tree, in order; a bad node raises QbackupError."""
    for leaf in iter_leaves(session, keys, root, depth, chunks):
        if leaf.ids is None:
            raise QbackupError(f"chunk map unreadable at chunk {leaf.start}: {leaf.error}")
        yield from leaf.ids


@pytest.fixture(scope="module")
def keys():
    return crypto.create_keys(64 << 10)


def build(keys, store, ids):
    writer = TreeWriter(keys, store.put_node)
    for i in ids:
        writer.add(i)
    assert writer.chunks == len(ids)
    return writer.finish()


def test_depth_for():
    assert [depth_for(n) for n in (0, 1, 1024, 1025, 1024 ** 2, 1024 ** 2 + 1)] == [1, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 1025, 3 * 1024 + 7])
def test_round_trip(keys, n):
    store = MemoryStore(keys)
    ids = random_ids(n)
    for k in range(3, n, 5):
        ids[k] = ZERO_ID
    root, depth = build(keys, store, ids)
    assert depth == depth_for(n)
    assert list(iter_ids(store, keys, root, depth, n)) == ids
    leaves = list(iter_leaves(store, keys, root, depth, n))
    assert [(leaf.start, leaf.count) for leaf in leaves] == [
        (s, min(FANOUT, n - s)) for s in range(0, n, FANOUT)]
    expected_nodes = -(-n // FANOUT) + (-(-n // FANOUT ** 2) if depth > 1 else 0)
    assert store.new_nodes == expected_nodes
    assert all(len(leaf.ids) == leaf.count and leaf.error is None for leaf in leaves)


def test_large_tree_and_incremental_change(keys):
    """1024*1024+1 chunks: depth 3; changing one chunk stores depth new nodes."""
    n = FANOUT ** 2 + 1
    store = MemoryStore(keys)
    ids = random_ids(n)
    root, depth = build(keys, store, ids)
    assert depth == 3
    assert store.new_nodes == 1025 + 2 + 1
    assert list(iter_ids(store, keys, root, depth, n)) == ids
    ids[700_000] = random_ids(1)[0]
    store.new_nodes = 0
    root2, _ = build(keys, store, ids)
    assert root2 != root
    assert store.new_nodes == depth  # one leaf, one level-1 node, the root
    assert list(iter_ids(store, keys, root2, depth, n)) == ids
    assert list(iter_ids(store, keys, root, depth, n))[700_000] != ids[700_000]


def test_incremental_change_small(keys):
    n = 5 * FANOUT + 3
    store = MemoryStore(keys)
    ids = random_ids(n)
    build(keys, store, ids)
    store.new_nodes = 0
    ids[-1] = random_ids(1)[0]  # the last, partial leaf
    build(keys, store, ids)
    assert store.new_nodes == 2
    store.new_nodes = 0
    build(keys, store, ids)  # unchanged: everything deduplicates
    assert store.new_nodes == 0


def test_identical_leaves_stored_once(keys):
    store = MemoryStore(keys)
    block = random_ids(FANOUT)
    root, depth = build(keys, store, block * 3)
    assert store.new_nodes == 2  # one leaf, one root
    assert list(iter_ids(store, keys, root, depth, 3 * FANOUT)) == block * 3


@pytest.mark.parametrize("n", [0, 1, 1000, FANOUT, 3 * FANOUT + 1, FANOUT ** 2 + 5])
def test_all_zero_tree_costs_nothing(keys, n):
    store = MemoryStore(keys)
    writer = TreeWriter(keys, store.put_node)
    writer.add_zeros(n)
    root, depth = writer.finish()
    assert (root, depth) == (ZERO_ID, depth_for(n))
    assert store.new_nodes == 0
    leaves = list(iter_leaves(store, keys, root, depth, n))
    assert sum(leaf.count for leaf in leaves) == n
    assert all(set(leaf.ids) <= {ZERO_ID} for leaf in leaves)
    assert store.gets == 0  # nothing fetched


def test_add_zeros_equals_adding_zero_ids(keys):
    ids = random_ids(3) + [ZERO_ID] * (2 * FANOUT + 10) + random_ids(2) + [ZERO_ID] * 7
    a, b = MemoryStore(keys), MemoryStore(keys)
    root_a, depth_a = build(keys, a, ids)
    writer = TreeWriter(keys, b.put_node)
    for i in ids[:3]:
        writer.add(i)
    writer.add_zeros(2 * FANOUT + 10)
    for i in ids[-9:-7]:
        writer.add(i)
    writer.add_zeros(7)
    assert writer.finish() == (root_a, depth_a)
    assert a.blobs.keys() == b.blobs.keys()
    # two leaves and the root: the whole-zero leaf in the middle is not stored
    assert a.new_nodes == 3


def test_sparse_tree_has_zero_subtrees(keys):
    n = 4 * FANOUT
    ids = [ZERO_ID] * n
    ids[2 * FANOUT + 5] = random_ids(1)[0]
    store = MemoryStore(keys)
    root, depth = build(keys, store, ids)
    assert store.new_nodes == 2
    assert list(iter_ids(store, keys, root, depth, n)) == ids


# -- hostile and damaged trees


def test_decode_node_checks():
    ids = b"".join(random_ids(3))
    assert decode_node(encode_node(0, ids), 0, 3) == [ids[:32], ids[32:64], ids[64:]]
    for plain, level, count in [
        (encode_node(0, ids), 0, 2),  # too many ids
        (encode_node(0, ids), 0, 4),  # too few
        (encode_node(0, ids)[:-1], 0, 3),  # not a multiple of 32
        (encode_node(1, ids), 0, 3),  # wrong level
        (b"xxxx" + encode_node(0, ids)[4:], 0, 3),  # bad magic
        (b"", 0, 0),
        (MAGIC, 0, 0),
    ]:
        with pytest.raises(IntegrityError):
            decode_node(plain, level, count)


def one_bad_leaf(keys, store, root, n):
    leaves = list(iter_leaves(store, keys, root, depth_for(n), n))
    bad = [leaf for leaf in leaves if leaf.ids is None]
    assert len(bad) == 1 and bad[0].error
    with pytest.raises(QbackupError, match="chunk map unreadable"):
        list(iter_ids(store, keys, root, depth_for(n), n))
    return bad[0]


@pytest.mark.parametrize("plain_of", [
    lambda ids: encode_node(0, b"".join(ids[:9])),  # count does not match the range
    lambda ids: encode_node(0, b"".join(ids) + b"x"),  # length not a multiple of 32
    lambda ids: encode_node(1, b"".join(ids)),  # wrong level
    lambda ids: encode_node(0, b"".join(ids + ids[:FANOUT])),  # more than FANOUT ids
    lambda ids: b"QBM1\x00" + b"".join(ids),  # bad magic
])
def test_authentic_but_malformed_root(keys, plain_of):
    store = MemoryStore(keys)
    ids = random_ids(10)
    root = store.store_raw(plain_of(ids))
    leaf = one_bad_leaf(keys, store, root, 10)
    assert (leaf.start, leaf.count) == (0, 10)


def test_missing_leaf_reported_and_walk_continues(keys):
    n = 3 * FANOUT
    store = MemoryStore(keys)
    ids = random_ids(n)
    root, depth = build(keys, store, ids)
    leaf_ids = [keys.chunk_id(encode_node(0, b"".join(ids[k:k + FANOUT])), TYPE_TREE) for k in range(0, n, FANOUT)]
    del store.blobs[leaf_ids[1]]
    leaves = list(iter_leaves(store, keys, root, depth, n))
    assert [leaf.ids is None for leaf in leaves] == [False, True, False]
    assert leaves[1].start == FANOUT and "missing" in leaves[1].error
    assert leaves[2].ids == ids[2 * FANOUT:]


def test_missing_interior_node_covers_its_range(keys):
    n = FANOUT ** 2 + 10
    store = MemoryStore(keys)
    writer = TreeWriter(keys, store.put_node)
    ids = random_ids(FANOUT) * FANOUT + random_ids(10)  # same leaf repeated: cheap to build
    for i in ids:
        writer.add(i)
    root, depth = writer.finish()
    level1 = [k for k, (t, _) in store.blobs.items()
              if k != root and decode_level(keys, store, k) == 1]
    assert len(level1) == 2
    first = keys.chunk_id(encode_node(1, keys.chunk_id(encode_node(0, b"".join(ids[:FANOUT])), TYPE_TREE) * FANOUT), TYPE_TREE)
    del store.blobs[first]
    leaves = list(iter_leaves(store, keys, root, depth, n))
    assert (leaves[0].start, leaves[0].count, leaves[0].ids) == (0, FANOUT ** 2, None)
    assert leaves[1].ids == ids[FANOUT ** 2:]


def decode_level(keys, store, node_id):
    plain = crypto.open_blob(keys, crypto.TYPE_TREE, node_id, store.blobs[node_id][1], 1 << 20)
    return plain[len(MAGIC)]


def test_tampered_node_fails_authentication(keys):
    store = MemoryStore(keys)
    root, _ = build(keys, store, random_ids(5))
    type_, blob = store.blobs[root]
    store.blobs[root] = (type_, blob[:40] + bytes([blob[40] ^ 1]) + blob[41:])
    assert "authentication" in one_bad_leaf(keys, store, root, 5).error


def test_node_served_for_another_id(keys):
    store = MemoryStore(keys)
    root_a, _ = build(keys, store, random_ids(5))
    root_b, _ = build(keys, store, random_ids(5))
    store.blobs[root_a] = store.blobs[root_b]  # swapped by the backup qube
    assert "authentication" in one_bad_leaf(keys, store, root_a, 5).error


def test_node_with_wrong_type(keys):
    store = MemoryStore(keys)
    ids = random_ids(5)
    root = store.store_raw(encode_node(0, b"".join(ids)), type=crypto.TYPE_DATA)
    assert "type 1" in one_bad_leaf(keys, store, root, 5).error
    # the right type number on a blob sealed as data still fails authentication
    store.blobs[root] = (crypto.TYPE_TREE, store.blobs[root][1])
    assert "authentication" in one_bad_leaf(keys, store, root, 5).error


def test_remote_error_while_fetching(keys):
    store = MemoryStore(keys)
    root, _ = build(keys, store, random_ids(5))
    store.broken.add(root)
    assert "is corrupt" in one_bad_leaf(keys, store, root, 5).error


@pytest.mark.parametrize("whole_batch", [False, True])
def test_get_each_blames_only_the_failing_ids(keys, whole_batch):
    store = MemoryStore(keys)
    store.whole_batch_errors = whole_batch
    ids = [store.store_raw(bytes([k])) for k in range(8)]
    store.broken = {ids[1], ids[4]}
    got = list(get_each(store, ids, 64, 1 << 20))
    assert [g[0] for g in got] == ids
    assert [g[3] is not None for g in got] == [k in (1, 4) for k in range(8)]
    assert all(g[1] == crypto.TYPE_TREE for k, g in enumerate(got) if k not in (1, 4))
    assert store.gets <= 10  # one-at-a-time only between an error and its culprit


def test_get_each_rejects_short_answers(keys):
    class Short:
        def get(self, ids, window, max_size):
            yield list(ids)[0], None, None
    with pytest.raises(ProtocolError, match="answered 1 of 2"):
        list(get_each(Short(), random_ids(2), 64, 1 << 20))


def test_depth_must_match_chunk_count(keys):
    store = MemoryStore(keys)
    root, _ = build(keys, store, random_ids(5))
    with pytest.raises(IntegrityError):
        list(iter_leaves(store, keys, root, 2, 5))


# -- count_changed: what changed between two versions of a volume ------------------

def vol(keys, store, ids):
    root, depth = build(keys, store, ids)
    return {"root": root, "depth": depth, "chunks": len(ids)}


@pytest.mark.parametrize("n", [5, 1024, 3 * 1024 + 7])
def test_count_changed(keys, n):
    store = MemoryStore(keys)
    ids = random_ids(n)
    for k in range(0, n, 7):
        ids[k] = ZERO_ID
    old = vol(keys, store, ids)
    assert count_changed(store, keys, old, old) == 0
    changed = list(ids)
    for k in (1, n // 2, n - 1):
        changed[k] = random_ids(1)[0]
    changed[0] = ZERO_ID if ids[0] != ZERO_ID else random_ids(1)[0]
    new = vol(keys, store, changed)
    assert count_changed(store, keys, old, new) == sum(1 for a, b in zip(ids, changed) if a != b)
    # grown: the new chunks count; shrunk: only what is left is compared
    grown = vol(keys, store, changed + random_ids(3))
    assert count_changed(store, keys, new, grown) == 3
    assert count_changed(store, keys, grown, new) == 0
    assert count_changed(store, keys, vol(keys, store, []), new) == n


def test_count_changed_skips_shared_subtrees(keys):
    """Two volumes of 2049 leaves that differ in one chunk: only the path to
    it is fetched (root and one leaf from each), not the 2049 leaves."""
    store = MemoryStore(keys)
    n = 3 * FANOUT
    ids = random_ids(n)
    old = vol(keys, store, ids)
    ids[FANOUT + 5] = random_ids(1)[0]
    new = vol(keys, store, ids)
    store.gets = 0
    assert count_changed(store, keys, old, new) == 1
    assert store.gets == 4
    # across depths (grown past FANOUT chunks) it goes leaf by leaf
    small = vol(keys, store, ids[:FANOUT])
    assert count_changed(store, keys, small, new) == 2 * FANOUT


def test_count_changed_refuses_a_forged_node(keys):
    store = MemoryStore(keys)
    ids = random_ids(10)
    old = vol(keys, store, ids)
    ids[3] = random_ids(1)[0]
    new = vol(keys, store, ids)
    store.broken.add(new["root"])
    with pytest.raises(IntegrityError, match="chunks 0..: cannot fetch chunk map node"):
        count_changed(store, keys, old, new)
