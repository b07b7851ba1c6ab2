# SPDX-License-Identifier: GPL-2.0-or-later
"""Garbage collection racing a backup, with the real daemon over real sockets,
the collector started over the protocol or as a `qbackupd gc` process of its
own: a backup session that was told dead blobs exist (HAVE present, PUT
deduplicated) while the collector had planned them away commits a snapshot
on them, and nothing it needs is lost; what no snapshot reaches is deleted,
and a later commit naming a deleted blob is refused."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

MiB = 1 << 20


def blob_id(name: object) -> bytes:
    return hashlib.sha256(repr(name).encode()).digest()


def put_all(client, blobs: dict[bytes, bytes]) -> None:
    """Pipelined PUTs of data chunks."""
    for id_, data in blobs.items():
        client.send({"op": "put", "rid": client.next_rid(), "id": id_, "type": 1, "data": data})
    for _ in blobs:
        answer = client.recv()
        assert answer["op"] == "ok", answer


def snapshot(client, name: str, chunks: dict[bytes, bytes]) -> bytes:
    """Store chunks under a root node and commit a snapshot of it; returns the root id."""
    put_all(client, chunks)
    root = blob_id(("root", name))
    assert client.call("put", id=root, type=2, data=b"root " + name.encode(), refs=list(chunks))["op"] == "ok"
    assert client.call("commit", id=blob_id(("snapshot", name)), data=b"manifest", refs=[root])["op"] == "ok"
    return root


@pytest.mark.parametrize("via", ["protocol", "process"])
def test_gc_racing_a_backup_that_deduplicates_against_dead_blobs(daemon, via):
    old = {blob_id(("old", n)): os.urandom(250_000) for n in range(40)}  # 10 MB: packs of their own
    kept = {blob_id(("kept", n)): os.urandom(250_000) for n in range(40)}
    writer = daemon.open_repo(create=True)
    old_root = snapshot(writer, "old", old)
    snapshot(writer, "kept", kept)
    assert writer.call("delete_snapshots", ids=[blob_id(("snapshot", "old"))])["op"] == "ok"
    writer.bye()

    # A backup begins: its session holds the writer lock, and it is told the dead chunks exist.
    backup = daemon.open_repo()
    assert backup.call("have", ids=list(old))["missing"] == []

    # The collection marks and plans (the old chunks are garbage), repacks, and reaches its
    # sweep, where it waits for the writer lock the backup holds.
    if via == "protocol":
        collector = daemon.open_repo(write=False)
        rid = collector.request("gc", repack_below=100, dry_run=False)
        phases = []
        while not phases or phases[-1] != "wait":
            answer = collector.recv()
            assert answer["rid"] == rid and answer["op"] == "progress", answer
            phases.append(answer["phase"])
        assert "mark" in phases
    else:
        process = subprocess.Popen(
            [sys.executable, "-m", "qbackupd", "gc", "--storage", str(daemon.storage), "repo",
             "--repack-below", "100", "--log-level", "info"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for line in process.stderr:
            if "waits for the writer lock" in line:
                break
        else:
            raise AssertionError(f"the collector never waited: {process.communicate()}")

    # The backup builds on what it was told: the chunks are not sent again (deduplicated),
    # a new node names them, and the snapshot commits.
    for id_ in list(old)[:5]:
        assert backup.call("put", id=id_, type=1, data=b"not stored")["stored"] is False
    revived_root = blob_id(("root", "revived"))
    assert backup.call("put", id=revived_root, type=2, data=b"root revived", refs=list(old))["stored"]
    assert backup.call("commit", id=blob_id(("snapshot", "revived")), data=b"m", refs=[revived_root])["op"] == "ok"
    backup.bye()

    if via == "protocol":
        while (answer := collector.recv())["op"] == "progress":
            pass
        assert answer["op"] == "gc" and answer["rid"] == rid, answer
        collector.bye()
        summary = answer
    else:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, out + err
        summary = {"packs_deleted": 0 if " 0 packs deleted" in out else 1, "bytes_freed": out}
    assert summary["packs_deleted"] or summary.get("packs_repacked")

    reader = daemon.open_repo(write=False)
    assert reader.get_all(list(old)) == old  # every chunk the revived snapshot needs, intact
    assert reader.get_all(list(kept)) == kept
    assert reader.call("have", ids=[old_root])["missing"] == [0]  # the dead root is gone
    reader.bye()
    check = daemon.check()
    assert check.returncode == 0, check.stdout + check.stderr

    # A client that learnt before the collection that the dead root existed cannot name it now.
    late = daemon.open_repo()
    late.expect_error("missing_refs", "commit", id=blob_id(("snapshot", "late")), data=b"m", refs=[old_root])
    late.expect_error("missing_refs", "put", id=blob_id("node"), type=2, data=b"n", refs=[old_root])
    late.bye()
    assert "Traceback" not in daemon.log_text()
