# SPDX-License-Identifier: GPL-2.0-or-later
"""`qbackup gc`, `qbackup check-storage`, `qbackup stats` and prune's batch
deletion end to end: the dom0 CLI against the simulated dom0 and the real
daemon. Bit rot injected into a pack is found by `check-storage --read-data`
and named by snapshot, qube and volume."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from simdata import fill
from qbackup import proto
from qbackup_sim import run_qbackup


def packs(sim) -> set[Path]:
    return set((sim.dir / "storage/default/packs").glob("*/*.pack"))


def flip_a_data_chunk(sim, pack: Path) -> None:
    """Flip one bit in the data of a chunk (blob type 1) stored in `pack`."""
    index = sqlite3.connect(f"file:{sim.dir / 'storage/default/index.sqlite'}?mode=ro", uri=True)
    pos = index.execute("SELECT b.pos FROM blobs b JOIN packs p ON p.id = b.pack"
                        " WHERE p.name = ? AND b.type = 1 ORDER BY b.pos LIMIT 1",
                        (pack.stem,)).fetchone()[0]
    index.close()
    raw = bytearray(pack.read_bytes())
    raw[pos + 41 + 10] ^= 0x20
    pack.write_bytes(bytes(raw))


def test_bit_rot_is_named_by_snapshot_qube_and_volume(sim):
    sim.init()
    first = sim.json("backup", "tpl")["snapshot"]
    before = packs(sim)
    second = sim.json("backup", "work")["snapshot"]
    (work_pack,) = packs(sim) - before          # only work's private volume is in it
    flip_a_data_chunk(sim, work_pack)

    quick = sim.run("check-storage")            # the trailers and index are intact
    assert "check-storage OK" in quick.stdout
    found = sim.run("check-storage", "--read-data", expect=3)
    assert f"DAMAGED: snapshot {second[:16]}" in found.stdout
    assert "qube work volume private" in found.stdout and first[:16] not in found.stdout
    assert "CRC-32" in found.stdout and "check-storage FAILED: 1 damaged" in found.stdout
    report = json.loads(sim.run("check-storage", "--read-data", "--json", expect=3).stdout)
    assert not report["ok"] and report["damaged_blobs"] == 1 and report["complete"]
    assert [(a["snapshot"], a["qube"], a["volume"]) for a in report["affected"]] == [
        (second, "work", "private")]
    verified = sim.run("verify", second, expect=3)   # dom0's own check agrees
    assert "FAILED" in verified.stdout

    snapshot_file = sim.dir / "storage/default/snapshots" / first
    raw = bytearray(snapshot_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    snapshot_file.write_bytes(bytes(raw))
    rotten = sim.run("check-storage", expect=3)      # dom0 cannot read it either
    assert f"DAMAGED: snapshot {first[:16]}" in rotten.stdout and "its own file" in rotten.stdout
    assert f"snapshot {first} is damaged" in rotten.stderr


def test_gc_frees_what_prune_deleted_and_stats_show_it(sim, monkeypatch):
    sim.init()
    for generation in range(3):
        if generation:
            fill(sim.image("work", "private"), 20 + generation, 0.4)
        sim.run("backup", "work")
    stats = sim.json("stats")
    assert stats["snapshots"] == 3 and stats["garbage_stored_bytes"] == 0
    assert stats["logical_bytes"] == 3 * sim.image("work", "private").stat().st_size
    assert stats["dedup_ratio"] > 1 and all(s["unique_stored_bytes"] > 0
                                            for s in stats["per_snapshot"])
    shown = sim.run("stats").stdout
    assert "dedup ratio" in shown and "UNIQUE" in shown

    # prune through the batch operation of protocol version 2
    calls = []
    real_one = proto.Session.delete_snapshot
    monkeypatch.setattr(proto.Session, "delete_snapshot",
                        lambda self, id: calls.append(("one", 1)) or real_one(self, id))
    real_batch = proto.Session.delete_snapshots
    monkeypatch.setattr(proto.Session, "delete_snapshots",
                        lambda self, ids: calls.append(("batch", len(ids))) or real_batch(self, ids))
    assert run_qbackup(sim.dir, ["prune", "--keep-last", "1", "--passphrase-file",
                                 str(sim.passphrase_file)]) == 0
    assert calls == [("batch", 2)]
    garbage = sim.json("stats")["garbage_stored_bytes"]
    assert garbage > 0

    dry = sim.json("gc", "--dry-run", "--repack-below", "100")
    assert dry["dry_run"] and dry["bytes_freed"] > 0
    assert sim.json("stats")["garbage_stored_bytes"] == garbage   # a dry run changes nothing
    done = sim.run("gc", "--repack-below", "100").stdout
    assert "freed" in done and "would" not in done
    after = sim.json("stats")
    assert after["garbage_stored_bytes"] == 0 and after["stored_bytes"] < stats["stored_bytes"]
    assert "verify OK" in sim.run("verify", "--all").stdout


def test_version_1_daemon_deletes_one_by_one_and_has_no_gc(sim, monkeypatch, capsys):
    """Against a daemon that answers hello with version 1 (dom0 offers only
    1 here, so the real daemon speaks it): prune falls back to one deletion
    per request; gc and check-storage say the daemon needs version 2; verify
    works without locate (version 3)."""
    sim.init()
    for generation in range(3):
        fill(sim.image("work", "private"), 30 + generation, 0.2)
        sim.run("backup", "work")
    monkeypatch.setattr(proto, "SUPPORTED_VERSIONS", (1,))
    calls = []
    real_one = proto.Session.delete_snapshot
    monkeypatch.setattr(proto.Session, "delete_snapshot",
                        lambda self, id: calls.append("one") or real_one(self, id))
    pw = ["--passphrase-file", str(sim.passphrase_file)]
    assert run_qbackup(sim.dir, ["prune", "--keep-last", "1", *pw]) == 0
    assert calls == ["one", "one"]
    capsys.readouterr()
    assert run_qbackup(sim.dir, ["gc"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "speaks protocol version 1; 'gc' needs version 2" in err[0]
    assert run_qbackup(sim.dir, ["stats", *pw]) == 0
    assert "per-snapshot unique sizes need version 2" in capsys.readouterr().out
    assert run_qbackup(sim.dir, ["verify", "--all", *pw]) == 0   # no locate: the maps' order
