# SPDX-License-Identifier: GPL-2.0-or-later
"""SIGKILL the daemon subprocess in the middle of a stream of PUTs and of a
COMMIT, restart it, and check that the repository opens for writing (the
lock did not go stale), `qbackupd check` is clean, everything flushed or
committed before the kill is held, and whatever else is held is intact."""

from __future__ import annotations

import hashlib
import random
import threading
import time

import pytest

KiB = 1 << 10


def blob_id(name: object) -> bytes:
    return hashlib.sha256(repr(name).encode()).digest()


def blob_data(name: object, size: int = 100 * KiB) -> bytes:
    return random.Random(repr(name)).randbytes(size)


def restart_and_check(daemon) -> None:
    daemon.start()
    check = daemon.check()
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("kill_after", [1, 40, 170, 333])
def test_kill_during_puts(daemon, kill_after):
    client = daemon.open_repo(create=True)  # 8 MiB packs: several are sealed during the stream
    flushed = [f"f{n}" for n in range(30)]
    for name in flushed:
        assert client.call("put", id=blob_id(name), type=1, data=blob_data(name))["stored"]
    assert client.call("flush")["op"] == "ok"

    streamed = [f"s{n}" for n in range(400)]
    acked: list[str] = []
    killed = threading.Event()

    def read_acks():
        while (answer := client.recv()) is not None:
            assert answer["op"] == "ok" and answer["stored"], answer
            acked.append(streamed[answer["rid"] - 1000])
            if len(acked) == kill_after:
                daemon.kill()
                killed.set()

    reader = threading.Thread(target=read_acks)
    reader.start()
    try:
        for n, name in enumerate(streamed):
            client.send({"op": "put", "rid": 1000 + n, "id": blob_id(name), "type": 1, "data": blob_data(name)})
    except (BrokenPipeError, ConnectionResetError):
        pass
    reader.join()
    assert killed.is_set()

    restart_and_check(daemon)
    client = daemon.open_repo()  # for writing: the dead daemon's lock is gone
    assert client.call("have", ids=[blob_id(name) for name in flushed])["missing"] == []
    found = client.get_all([blob_id(name) for name in streamed])
    for name in streamed:
        if found[blob_id(name)] is not None:  # held only if it was sealed, and then intact
            assert found[blob_id(name)] == blob_data(name)
    # a re-run stores what is missing and reuses the rest
    for name in streamed:
        answer = client.call("put", id=blob_id(name), type=1, data=blob_data(name))
        assert answer["stored"] == (found[blob_id(name)] is None)
    client.bye()
    assert daemon.check().returncode == 0


@pytest.mark.parametrize("delay", [0.0, 0.0005, 0.001, 0.0015, 0.002, 0.004, 0.05])
def test_kill_during_commit(daemon, delay):
    client = daemon.open_repo(create=True)
    names = [f"c{n}" for n in range(60)]
    for name in names:
        client.request("put", id=blob_id(name), type=1, data=blob_data(name))  # unflushed: commit seals
    for _ in names:
        assert client.recv()["stored"]
    old = blob_id("old-snapshot")
    assert client.call("commit", id=old, data=b"old manifest", refs=[blob_id(names[0])])["op"] == "ok"

    snap = blob_id("snapshot")
    refs = [blob_id(name) for name in names]
    client.request("commit", id=snap, data=b"manifest" * 1000, refs=refs)
    time.sleep(delay)  # vary where in the commit the kill lands
    daemon.kill()
    answer = client.recv()  # the ok, if the commit finished before the kill
    committed = answer is not None and answer["op"] == "ok"
    client.close()

    restart_and_check(daemon)
    client = daemon.open_repo()
    listed = {s["id"] for s in client.call("list")["snapshots"]}
    assert old in listed
    if committed:
        assert snap in listed
    if snap in listed:  # all or nothing: the snapshot and every blob it references
        answer = client.call("get_snapshot", id=snap)
        assert answer["data"] == b"manifest" * 1000 and answer["refs"] == refs
        assert client.call("have", ids=refs)["missing"] == []
        assert all(client.get_all(refs)[blob_id(name)] == blob_data(name) for name in names)
    else:
        client.expect_error("not_found", "get_snapshot", id=snap)
        # the commit can be redone: put what is missing, commit again
        missing = client.call("have", ids=refs)["missing"]
        for i in missing:
            client.call("put", id=refs[i], type=1, data=blob_data(names[i]))
        assert client.call("commit", id=snap, data=b"manifest" * 1000, refs=refs)["op"] == "ok"
    client.bye()
    assert daemon.check().returncode == 0
