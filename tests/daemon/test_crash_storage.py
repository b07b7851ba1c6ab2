# SPDX-License-Identifier: GPL-2.0-or-later
"""Crash safety of the daemon's storage: a child process writing to a
repository is SIGKILLed (at random moments, and at chosen points of the seal,
commit and config sequences); the repository must then reopen, check clean,
and hold every blob that reached a sealed pack and every committed snapshot."""

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qbackupd.storage import MIN_PACK_SIZE, Storage

CHILD = Path(__file__).with_name("storage_child.py")


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(CHILD), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def assert_blob(repo, id: bytes) -> None:
    found = repo.get(id)
    assert found is not None, f"sealed blob {id.hex()} lost"
    type, data = found
    assert hashlib.sha256(data).digest() == id and type == id[0]


def read_report(path: Path) -> tuple[list[bytes], set[bytes], list[str]]:
    sealed, snapshots, errors = [], set(), []
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # cut short by the kill
        kind, _, rest = line.rstrip("\n").partition(" ")
        if kind == "E":
            errors.append(rest)
        elif kind in "SC" and len(rest) == 64:
            (sealed.append if kind == "S" else snapshots.add)(bytes.fromhex(rest))
    return sealed, snapshots, errors


def test_sigkill_at_random_moments(tmp_path):
    rng = random.Random(20240229)
    storage = Storage(tmp_path / "store")
    storage.create("crash", b"config", MIN_PACK_SIZE, "test").close()
    report = tmp_path / "report"
    report.touch()
    verified = 0
    for iteration in range(30):
        child = start("loop", str(storage.root), "crash", str(iteration), str(report))
        try:
            assert child.stdout.readline() == "ready\n"
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
            child.stdin.close()
        assert child.returncode == -signal.SIGKILL  # killed, not failed
        sealed, snapshots, errors = read_report(report)
        assert errors == []
        with storage.open("crash", True, "parent") as repo:
            assert os.listdir(storage.root / "crash" / "staging") == []
            assert storage.check("crash") == []
            for start_at in range(0, len(sealed), 4096):
                assert repo.have(sealed[start_at : start_at + 4096]) == []
            for id in sealed[verified:]:
                assert_blob(repo, id)
            verified = len(sealed)
            assert snapshots <= {s[0] for s in repo.list_snapshots()}
    assert verified > 0 and snapshots  # the children got far enough to matter


def run_crash(storage: Storage, point: str) -> tuple[list[bytes], list[bytes]]:
    """Run the child to its crash point; return the ids of blobs A (flushed) and B (not yet)."""
    child = start("crash", str(storage.root), "crash", point)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, out
    lines = out.splitlines()
    assert lines[-1] == "armed"
    ids = {group: [bytes.fromhex(line[2:]) for line in lines if line[0] == group] for group in "AB"}
    return ids["A"], ids["B"]


@pytest.mark.parametrize(
    "point, b_sealed",
    [
        ("mid-record", False),  # torn record in the open pack
        ("pack-fsync", False),  # trailer written, not yet durable
        ("pack-rename", False),  # durable in staging, not renamed
        ("index-insert", True),  # renamed into place, never indexed: recovered from its trailer
        ("snapshot-rename", True),  # commit sealed B, the snapshot never landed
        ("config-rename", False),
    ],
)
def test_sigkill_at_each_step(tmp_path, point, b_sealed):
    storage = Storage(tmp_path / "store")
    storage.create("crash", b"old config", MIN_PACK_SIZE, "test").close()
    a, b = run_crash(storage, point)
    with storage.open("crash", True, "parent") as repo:
        assert os.listdir(storage.root / "crash" / "staging") == []
        assert storage.check("crash") == []
        for id in a:
            assert_blob(repo, id)
        assert repo.have(b) == ([] if b_sealed else list(range(len(b))))
        for id in b if b_sealed else []:
            assert_blob(repo, id)
        assert repo.list_snapshots() == []
        assert repo.config == b"old config"
        assert repo.stats()["packs"] == (2 if b_sealed else 1)
    # a rebuild from the trailers alone finds the same packs
    assert Storage(storage.root).reindex("crash")["packs"] == (2 if b_sealed else 1)
