# SPDX-License-Identifier: GPL-2.0-or-later
"""Bit rot injected into a pack written by real backups is found by the backup
qube's `check --read-data` (no keys) and named, through dom0's authenticated
history, by snapshot, qube and volume (restore.affected_volumes)."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from adversary import Daemon
from qbackup import crypto, transport
from qbackup.backup import VolumeSource, backup
from qbackup.proto import Session
from qbackup.progress import PhaseProgress
from qbackup.restore import affected_volumes, load_history
from qbackup.state import State

CHUNK = 64 * 1024
PASS = b"correct horse"
META = {"class": "AppVM", "properties": {}, "features": {}, "tags": []}


def run_backup(keys, daemon, state_dir, images: dict, predecessor):
    with Session(transport.unix_socket(str(daemon.sock), "repo")) as s:
        s.open(write=True)
        sources = [VolumeSource(qube=q, volume=v, path=str(p), size=p.stat().st_size, settings={})
                   for (q, v), p in images.items()]
        return backup(s, keys, sources, {q: META for q, _ in images},
                      state=State(str(state_dir)), predecessor=predecessor).snapshot_id


def flip_chunk(daemon_storage: Path, chunk_id: bytes) -> None:
    conn = sqlite3.connect(daemon_storage / "repo" / "index.sqlite")
    name, pos = conn.execute("SELECT p.name, b.pos FROM blobs b JOIN packs p ON p.id = b.pack"
                             " WHERE b.id = ?", (chunk_id,)).fetchone()
    conn.close()
    path = daemon_storage / "repo" / "packs" / name[:2] / f"{name}.pack"
    raw = bytearray(path.read_bytes())
    raw[pos + 41 + 10] ^= 0x20
    path.write_bytes(bytes(raw))


def test_bit_rot_is_attributed_to_snapshots_qubes_and_volumes(tmp_path):
    rng = random.Random(3)
    daemon = Daemon(tmp_path)
    try:
        keys = crypto.create_keys(CHUNK)
        with Session(transport.unix_socket(str(daemon.sock), "repo")) as s:
            s.init(crypto.wrap_keys(keys, PASS, scrypt_n=2**14), 8 << 20)
        chunks = {("tpl", "root"): [rng.randbytes(CHUNK) for _ in range(6)],
                  ("work", "private"): [rng.randbytes(CHUNK) for _ in range(6)]}
        images = {}
        for (qube, volume), data in chunks.items():
            images[qube, volume] = tmp_path / f"{qube}-{volume}.img"
            images[qube, volume].write_bytes(b"".join(data))
        state_dir = tmp_path / "state"
        first = run_backup(keys, daemon, state_dir, images, None)
        changed = rng.randbytes(CHUNK)  # only the second snapshot's work:private holds it
        with open(images["work", "private"], "r+b") as f:
            f.seek(2 * CHUNK)
            f.write(changed)
        second = run_backup(keys, daemon, state_dir, images, first)

        storage = tmp_path / "storage"
        flip_chunk(storage, keys.chunk_id(changed))
        flip_chunk(storage, keys.chunk_id(chunks["tpl", "root"][4]))  # in both snapshots

        with Session(transport.unix_socket(str(daemon.sock), "repo")) as s:
            s.open(write=False)
            quick = s.check()
        assert quick["problems"] == [] and quick["affected"] == []
        with Session(transport.unix_socket(str(daemon.sock), "repo")) as s:
            s.open(write=False)
            history = load_history(s, keys, State(str(state_dir)))
            report = s.check(read_data=True, progress=PhaseProgress("check"))
        assert report["damaged_total"] == 2 and report["complete"]
        assert sorted(report["damaged"]) == sorted([keys.chunk_id(changed),
                                                    keys.chunk_id(chunks["tpl", "root"][4])])
        named = {(a.snapshot, a.qube, a.volume) for a in affected_volumes(history, report)}
        assert named == {(first, "tpl", "root"), (second, "tpl", "root"), (second, "work", "private")}
    finally:
        daemon.stop()
