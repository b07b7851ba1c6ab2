# SPDX-License-Identifier: GPL-2.0-or-later
"""A model repository for the garbage collection tests: volumes as chunk-map
trees (chunks, leaf nodes of FANOUT chunks, a root node), snapshots
committing their roots, exactly the shape dom0 stores, built directly
through qbackupd.storage.  Ids are SHA-256 of names; each blob's content is
derived from its name, so what is read back can be checked.

Imported by test modules and by gc_child.py (a script), never a test itself.
"""

from __future__ import annotations

import hashlib
import random

FANOUT = 4


def ident(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def content(name: str, size: int = 3000) -> bytes:
    return hashlib.shake_256(name.encode()).digest(size)


class Model:
    """What was stored: blob name -> (type, refs as names, size), snapshot name -> root names."""

    def __init__(self) -> None:
        self.blobs: dict[str, tuple[int, list[str], int]] = {}
        self.snapshots: dict[str, list[str]] = {}

    def _put(self, repo, name: str, type: int, refs: list[str], size: int) -> None:
        self.blobs[name] = (type, refs, size)
        repo.put(ident(name), type, content(name, size), [ident(r) for r in refs])

    def backup(self, repo, snapshot: str, volumes: dict[str, list[str]], size: int = 3000) -> None:
        """Store each volume's chunks (named) and tree, then commit the snapshot."""
        roots = []
        for volume, chunks in volumes.items():
            leaves = []
            for start in range(0, len(chunks), FANOUT):
                group = chunks[start : start + FANOUT]
                for chunk in group:
                    self._put(repo, chunk, 1, [], size)
                leaf = "leaf:" + ",".join(group)
                self._put(repo, leaf, 2, list(dict.fromkeys(group)), 200)
                leaves.append(leaf)
            root = f"root:{volume}:" + hashlib.sha256(",".join(leaves).encode()).hexdigest()[:16]
            self._put(repo, root, 2, leaves, 100)
            roots.append(root)
        repo.commit(ident(snapshot), b"manifest " + snapshot.encode(), [ident(r) for r in roots])
        self.snapshots[snapshot] = roots

    def reach(self, snapshot: str) -> set[str]:
        seen: set[str] = set()
        todo = list(self.snapshots[snapshot])
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo += self.blobs[name][1]
        return seen

    def check_snapshot(self, repo, snapshot: str) -> None:
        """Every blob the snapshot reaches is held, intact (the daemon's CRC), with its content."""
        for name in sorted(self.reach(snapshot)):
            found = repo.get(ident(name))
            assert found is not None, f"{snapshot}: blob {name} lost"
            type, _, size = self.blobs[name]
            assert found == (type, content(name, size)), f"{snapshot}: blob {name} differs"


def random_history(rng: random.Random, repo, model: Model, snapshots: int, chunks: int = 24, size: int = 3000):
    """Back up two volumes `snapshots` times, rewriting a random part each time."""
    volumes = {"a": [f"a{i}.0" for i in range(chunks)], "b": [f"b{i}.0" for i in range(chunks)]}
    for n in range(snapshots):
        for chunks_of in volumes.values():
            for i in rng.sample(range(len(chunks_of)), rng.randrange(1, len(chunks_of) // 2)):
                base = chunks_of[i].rsplit(".", 1)[0]
                chunks_of[i] = f"{base}.{n + 1}"
        model.backup(repo, f"s{n}", {v: list(c) for v, c in volumes.items()}, size)
