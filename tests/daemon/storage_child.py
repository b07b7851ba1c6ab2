# SPDX-License-Identifier: GPL-2.0-or-later
"""Child process for the storage lock and crash tests (run as a script).

    hold ROOT NAME HOLDER        open NAME for writing, print "locked", wait for stdin EOF
    loop ROOT NAME SEED REPORT   put/flush/commit until killed; after each flush or
                                 commit append "S <id>" per sealed blob and "C <id>"
                                 per committed snapshot to REPORT
    crash ROOT NAME POINT        put and flush blobs A, put blobs B (printing "A <id>",
                                 "B <id>"), print "armed", then die by SIGKILL at
                                 POINT of the next put/seal/commit/set_config

Blob data is random; a blob's id is the SHA-256 of its data and its type is
the id's first byte, so the parent can check what it reads back.
"""

import hashlib
import os
import random
import signal
import sys
from pathlib import Path

from qbackupd import pack
from qbackupd.index import Index
from qbackupd.storage import Storage


def blob(rng: random.Random, size: int) -> tuple[bytes, int, bytes]:
    data = rng.randbytes(size)
    id = hashlib.sha256(data).digest()
    return id, id[0], data


def die(*_args: object, **_kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def hold(root: str, name: str, holder: str) -> None:
    repo = Storage(Path(root)).open(name, True, holder)
    print("locked", flush=True)
    sys.stdin.read()
    repo.close()


def loop(root: str, name: str, seed: str, report_path: str) -> None:
    rng = random.Random(int(seed))
    repo = Storage(Path(root)).open(name, True, f"crash loop {seed}")
    with open(report_path, encoding="ascii") as f:
        sealed = [bytes.fromhex(line[2:66]) for line in f if line.startswith("S ") and len(line) == 67]
    report = open(report_path, "a", buffering=1, encoding="ascii")
    pending: list[bytes] = []
    print("ready", flush=True)
    while True:
        choice = rng.random()
        if choice < 0.9:
            size = rng.choice([0, 100, 2000, 9000, 30000]) if rng.random() < 0.995 else 3 << 20
            id, type, data = blob(rng, size)
            refs = rng.sample(sealed + pending, min(3, len(sealed + pending))) if rng.random() < 0.2 else []
            if repo.put(id, type, data, refs):
                pending.append(id)
            if sealed and rng.random() < 0.05:
                old = rng.choice(sealed)
                if repo.put(old, old[0], b"never stored", None):
                    report.write(f"E dedup failed for {old.hex()}\n")
        elif choice < 0.97:
            repo.flush()
        else:
            snapshot = rng.randbytes(32)
            refs = rng.sample(sealed + pending, min(5, len(sealed + pending)))
            repo.commit(snapshot, rng.randbytes(rng.randrange(2000)), refs)
            report.write(f"C {snapshot.hex()}\n")
        if choice >= 0.9:
            for id in pending:
                report.write(f"S {id.hex()}\n")
            sealed += pending
            pending = []


def crash(root: str, name: str, point: str) -> None:
    rng = random.Random(point)
    repo = Storage(Path(root)).open(name, True, f"crash at {point}")
    for group in "AB":
        for _ in range(5):
            id, type, data = blob(rng, 5000)
            repo.put(id, type, data, None)
            print(group, id.hex(), flush=True)
        if group == "A":
            repo.flush()
    print("armed", flush=True)
    if point == "pack-fsync":
        os.fsync = die
        repo.flush()
    elif point == "pack-rename":
        os.rename = die
        repo.flush()
    elif point == "index-insert":
        Index.add_pack = die
        repo.flush()
    elif point == "mid-record":
        real = pack._pwritev_all

        def half_then_die(fd, parts, offset):
            record = b"".join(parts)
            real(fd, (record[: len(record) // 2],), offset)
            die()

        pack._pwritev_all = half_then_die
        repo.put(*blob(rng, 5000), None)
    elif point == "snapshot-rename":
        os.replace = die
        repo.commit(bytes(32), b"snapshot", [])
    elif point == "config-rename":
        os.replace = die
        repo.set_config(b"new config", repo.config)
    raise SystemExit(f"no crash at {point}")


if __name__ == "__main__":
    {"hold": hold, "loop": loop, "crash": crash}[sys.argv[1]](*sys.argv[2:])
