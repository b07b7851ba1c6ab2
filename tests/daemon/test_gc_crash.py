# SPDX-License-Identifier: GPL-2.0-or-later
"""A garbage collection SIGKILLed at seeded points, 30 times, on one
repository that keeps changing between the kills (new snapshots that revive
dead blobs, deleted ones): after each kill every remaining snapshot is
complete — every blob it reaches is held and passes its CRC — for a reader
at once (no recovery run), and after the next writer's open `check
--read-data` is clean; the interrupted collection then resumes."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

from gcmodel import Model, ident, random_history
from qbackupd import gc
from qbackupd.check import check_repository
from qbackupd.storage import MIN_PACK_SIZE, Storage

CHILD = Path(__file__).with_name("gc_child.py")
KILLS = 30
SEED = 20261122


def run_child(storage: Storage, kill_at: int, repack_below: int) -> bool:
    """Run a collection killed at step `kill_at`; True if it was killed."""
    child = subprocess.run(
        [sys.executable, str(CHILD), str(storage.root), "work", str(kill_at), str(repack_below)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if child.returncode == -signal.SIGKILL:
        return True
    assert child.returncode == 0 and child.stdout.startswith("done"), child.stdout + child.stderr
    return False


def assert_complete(storage: Storage, model: Model) -> None:
    with storage.open("work", False, "reader") as repo:  # a reader repairs nothing
        assert {s[0] for s in repo.list_snapshots()} == {ident(n) for n in model.snapshots}
        for snapshot in model.snapshots:
            model.check_snapshot(repo, snapshot)


def test_gc_killed_at_random_points(tmp_path):
    rng = random.Random(SEED)
    storage = Storage(tmp_path / "store")
    model = Model()
    with storage.create("work", b"config", MIN_PACK_SIZE, "creator") as repo:
        random_history(rng, repo, model, 8, chunks=16, size=20_000)
    killed = finished = 0
    for iteration in range(KILLS):
        with storage.open("work", True, "backup") as repo:
            if iteration % 3 == 0 and len(model.snapshots) > 2:
                # back up again what the oldest snapshot held: blobs the killed collection
                # may have planned as dead come back to life (HAVE present, PUT deduplicated)
                oldest = min(model.snapshots, key=lambda s: int(s.split("-")[0].lstrip("s")))
                volumes = {root.split(":")[1]: [] for root in model.snapshots[oldest]}
                for root in model.snapshots[oldest]:
                    for leaf in model.blobs[root][1]:
                        volumes[root.split(":")[1]] += model.blobs[leaf][1]
                model.backup(repo, f"s{100 + iteration}-revived", volumes, size=20_000)
            victims = rng.sample(sorted(model.snapshots), k=min(2, len(model.snapshots) - 2))
            if victims:
                repo.delete_snapshots([ident(v) for v in victims])
                for victim in victims:
                    del model.snapshots[victim]
        # a whole collection here takes 4 to 40 steps: most runs are killed, some resume to the end
        if run_child(storage, rng.randint(1, 32), rng.choice([0, 50, 100])):
            killed += 1
        else:
            finished += 1
        assert_complete(storage, model)
        storage.open("work", True, "recovery").close()  # what the next backup's open does
        report = check_repository(storage, "work", read_data=True)
        assert report.problems == [], (iteration, report.problems)
        assert_complete(storage, model)
    assert killed >= KILLS // 2 and finished >= 1  # the kill points spread over whole collections
    gc.collect_garbage(storage, "work", repack_below=100)
    gc.collect_garbage(storage, "work", repack_below=100)  # the first may only finish a resumed one
    assert_complete(storage, model)
    with storage.open("work", False, "r") as repo:
        reached = set().union(*(model.reach(s) for s in model.snapshots))
        assert repo.stats()["blobs"] == len(reached)  # nothing but what the snapshots reach is left
    storage.reindex("work")
    assert check_repository(storage, "work", read_data=True).problems == []
    assert_complete(storage, model)
