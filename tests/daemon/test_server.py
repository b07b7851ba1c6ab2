# SPDX-License-Identifier: GPL-2.0-or-later
"""Integration tests of the daemon: the real `qbackupd serve` subprocess on a
temp socket, spoken to as qrexec + the dom0 client would. Every operation of
PROTOCOL.md §5, the error codes of §6 that a client can provoke, pipelining,
concurrency, shutdown and the command line."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
import threading
import time

import pytest
import trio

from qbackupd import frames, server, storage

MiB = 1 << 20


def blob_id(name: object) -> bytes:
    return hashlib.sha256(repr(name).encode()).digest()


def put(client, n, data=None, type_=1, refs=None) -> dict:
    fields = {"id": blob_id(n), "type": type_, "data": data if data is not None else f"blob {n}".encode()}
    if refs is not None:
        fields["refs"] = refs
    return client.call("put", **fields)


# --- session setup -----------------------------------------------------------------


def test_hello_and_bye(daemon):
    client = daemon.client("work", hello=False)
    client.send({"op": "hello", "rid": 0, "versions": [7, 1, 0], "client": "test/0"})
    assert client.recv() == {
        "op": "hello",
        "rid": 0,
        "version": 1,  # the highest version both speak
        "server": "qbackupd/0.1.0",
        "max_frame": 8 * MiB,
        "max_batch": 4096,
        "repo": "work",
    }
    client.bye()
    daemon.wait_for_log("repo=work ops=2 ")


def test_protocol_limits_match_storage_limits():
    for name in ("MAX_BLOB", "MAX_SNAPSHOT", "MAX_CONFIG", "MIN_PACK_SIZE", "MAX_PACK_SIZE", "MAX_BATCH",
                 "MAX_COMMIT_REFS"):  # fmt: skip
        assert getattr(frames, name) == getattr(storage, name), name
    assert storage.STORAGE_FORMAT == 1  # "opened" answers format 1 in protocol version 1


@pytest.mark.parametrize("header", [b"qubes.BackupChunk dom0\0", b"qubes.BackupChunk+ dom0\0"])
def test_no_repository_name(daemon, header):
    client = daemon.raw_client(header)
    assert client.hello()["repo"] is None
    for op, fields in (("open", {"write": False}), ("init", {"config": b"", "pack_size": 8 * MiB})):
        answer = client.expect_error("bad_repo_name", op, **fields)
        assert "no repository name" in answer["message"]
    client.expect_error("no_repository", "stats")  # the connection stays usable
    client.bye()


@pytest.mark.parametrize("name", [b"../x", b"a/b", b"x" * 65, b"a..b", b".x", b"caf\xc3\xa9", b"\xff\xfe"])
def test_bad_repository_name(daemon, name):
    client = daemon.raw_client(b"qubes.BackupChunk+" + name + b" dom0\0")
    assert client.hello()["repo"] is None
    answer = client.expect_error("bad_repo_name", "init", config=b"", pack_size=8 * MiB)
    assert "invalid repository name" in answer["message"]
    client.expect_error("bad_repo_name", "open", write=True)
    client.bye()
    assert os.listdir(daemon.storage) == []  # nothing created, inside or outside the storage dir
    assert sorted(os.listdir(daemon.workdir)) == ["daemon.log", "qbackupd.sock", "storage"]


@pytest.mark.parametrize("source", ["work", "sys-net", "dom0x", "Dom0"])
def test_forbidden_source(daemon, source):
    client = daemon.client("work", source=source, hello=False)
    answer = client.recv()
    assert answer["op"] == "error" and answer["code"] == "forbidden" and answer["rid"] is None
    client.expect_eof()


def test_unsupported_version(daemon):
    client = daemon.client(hello=False)
    client.send({"op": "hello", "rid": 0, "versions": [4, 5], "client": "future/9"})
    answer = client.recv()
    assert answer["op"] == "error" and answer["code"] == "unsupported_version"
    assert answer["versions"] == [1, 2, 3] and answer["rid"] == 0
    client.expect_eof()


@pytest.mark.parametrize(
    "first",
    [
        {"op": "open", "rid": 0, "write": True},
        {"op": "bye", "rid": 0},
        {"op": "frobnicate", "rid": 0},
        {"op": "put", "rid": 0, "id": bytes(32), "type": 1, "data": bytes(frames.MAX_BLOB + 1)},
    ],
)
def test_first_frame_must_be_hello(daemon, first):
    client = daemon.client(hello=False)
    client.send(first)
    answer = client.recv()
    assert answer["op"] == "error" and answer["code"] == "bad_request", answer
    client.expect_eof()


def test_hello_twice(daemon):
    client = daemon.client()
    client.send({"op": "hello", "rid": 1, "versions": [1], "client": "again"})
    assert client.recv()["code"] == "bad_request"
    client.expect_eof()


def test_no_repository_before_open(daemon):
    client = daemon.client("nothere")
    for op, fields in (
        ("have", {"ids": []}),
        ("get", {"ids": [blob_id(1)]}),
        ("list", {}),
        ("stats", {}),
        ("flush", {}),
        ("put", {"id": blob_id(1), "type": 1, "data": b"x"}),
        ("get_snapshot", {"id": blob_id(1)}),
    ):
        client.expect_error("no_repository", op, **fields)
    client.expect_error("no_repository", "open", write=False)  # does not exist
    assert client.call("init", config=b"c", pack_size=8 * MiB) == {"op": "ok", "rid": client.rid}
    client.expect_error("bad_request", "open", write=True)  # one repository per session
    client.expect_eof()


def test_init_exists_and_open(daemon):
    daemon.open_repo("work", create=True).bye()
    client = daemon.client("work")
    client.expect_error("exists", "init", config=b"other", pack_size=8 * MiB)
    answer = client.call("open", write=False)
    assert answer == {"op": "opened", "rid": client.rid, "config": b"config-work", "pack_size": 8 * MiB, "format": 1}
    client.bye()


def test_read_only_session(daemon):
    daemon.open_repo(create=True).bye()
    client = daemon.open_repo(write=False)
    for op, fields in (
        ("put", {"id": blob_id(1), "type": 1, "data": b"x"}),
        ("flush", {}),
        ("commit", {"id": blob_id("s"), "data": b"s", "refs": []}),
        ("delete_snapshot", {"id": blob_id("s")}),
        ("set_config", {"config": b"new", "expect": b"config-repo"}),
    ):
        client.expect_error("read_only", op, **fields)
    assert client.call("have", ids=[blob_id(1)])["missing"] == [0]
    client.bye()
    assert daemon.client().call("open", write=False)["config"] == b"config-repo"


# --- operations ----------------------------------------------------------------------


def test_blobs_have_get_dedup(daemon):
    client = daemon.open_repo(create=True)
    assert put(client, 1) == {"op": "ok", "rid": client.rid, "stored": True}
    assert put(client, 2, data=b"", type_=0)["stored"] is True
    assert put(client, 1)["stored"] is False  # dedup: nothing written
    assert put(client, 1, data=b"different data, same id")["stored"] is False
    ids = [blob_id(0), blob_id(1), blob_id(3), blob_id(2), blob_id(1)]
    assert client.call("have", ids=ids) == {"op": "have", "rid": client.rid, "missing": [0, 2]}
    assert client.call("have", ids=[])["missing"] == []

    rid = client.request("get", ids=ids)
    answers = [client.recv() for _ in range(len(ids) + 1)]
    assert answers == [
        {"op": "missing", "rid": rid, "id": blob_id(0)},
        {"op": "blob", "rid": rid, "id": blob_id(1), "type": 1, "data": b"blob 1"},
        {"op": "missing", "rid": rid, "id": blob_id(3)},
        {"op": "blob", "rid": rid, "id": blob_id(2), "type": 0, "data": b""},
        {"op": "blob", "rid": rid, "id": blob_id(1), "type": 1, "data": b"blob 1"},
        {"op": "done", "rid": rid},
    ]
    rid = client.request("get", ids=[])
    assert client.recv() == {"op": "done", "rid": rid}
    assert client.call("flush") == {"op": "ok", "rid": client.rid}
    stats = client.call("stats")
    keys = ("packs", "blobs", "bytes", "snapshots", "pack_bytes", "fs_size", "fs_free")
    assert set(stats) == {"op", "rid", *keys}
    assert stats["blobs"] == 2 and stats["packs"] >= 1 and stats["snapshots"] == 0
    assert all(type(stats[k]) is int for k in keys) and 0 < stats["fs_free"] <= stats["fs_size"]
    client.bye()

    reader = daemon.open_repo(write=False)
    rid = reader.request("get", ids=[blob_id(1)])
    assert reader.recv()["data"] == b"blob 1"
    assert reader.recv() == {"op": "done", "rid": rid}
    reader.bye()


def test_largest_blob_roundtrip(daemon):
    client = daemon.open_repo(create=True)
    data = os.urandom(frames.MAX_BLOB)
    assert put(client, "big", data=data)["stored"] is True
    client.expect_error("too_large", "put", id=blob_id("bigger"), type=1, data=data + b"x")
    assert client.call("have", ids=[blob_id("big"), blob_id("bigger")])["missing"] == [1]
    rid = client.request("get", ids=[blob_id("big")])
    assert client.recv() == {"op": "blob", "rid": rid, "id": blob_id("big"), "type": 1, "data": data}
    assert client.recv()["op"] == "done"
    client.bye()


def test_put_refs(daemon):
    client = daemon.open_repo(create=True)
    put(client, 1)
    answer = client.expect_error("missing_refs", "put", id=blob_id("tree"), type=2, data=b"t",
                                 refs=[blob_id(1), blob_id(404)])  # fmt: skip
    assert answer["ids"] == [blob_id(404)]
    assert client.call("have", ids=[blob_id("tree")])["missing"] == [0]  # failed request stored nothing
    assert put(client, "tree", type_=2, refs=[blob_id(1)])["stored"] is True
    client.bye()
    # refs to blobs stored by an earlier session count as held
    client = daemon.open_repo()
    assert put(client, "tree2", type_=2, refs=[blob_id(1), blob_id("tree")])["stored"] is True
    client.bye()


def test_pipelined_puts_answer_each_in_order(daemon):
    """Puts sent at once run in batches, yet each is answered as if alone, in
    order: a failing put answers its error and the next ones are stored; a
    second put of an id in the same batch, or of one HAVE said missing, is
    deduplicated; a non-put request between puts runs in its place."""
    client = daemon.open_repo(create=True)
    assert client.call("have", ids=[blob_id(0), blob_id(1)])["missing"] == [0, 1]
    msgs = []
    for n in range(40):
        fields = {"id": blob_id(n % 30), "type": 1, "data": bytes([n]) * 5000}
        if n == 7:
            fields["refs"] = [blob_id(404)]
        msgs.append({"op": "put", "rid": 100 + n, **fields})
    msgs.insert(20, {"op": "have", "rid": 99, "ids": [blob_id(7), blob_id(8)]})
    client.send_raw(b"".join(frames.encode_frame(m) for m in msgs))
    answers = [client.recv() for _ in msgs]
    assert [a["rid"] for a in answers] == [m["rid"] for m in msgs]
    assert answers[7]["op"] == "error" and answers[7]["code"] == "missing_refs"
    assert answers[7]["ids"] == [blob_id(404)]
    assert answers[20] == {"op": "have", "rid": 99, "missing": [0]}
    puts = [a for a in answers if a["rid"] >= 100 and a["rid"] != 107]
    # ids 0..29 stored once (7 at its second put, n=37), then 30..39 repeat 0..9
    assert [a["stored"] for a in puts] == [True] * 29 + [False] * 7 + [True] + [False] * 2
    client.call("flush")
    assert client.call("have", ids=[blob_id(n) for n in range(31)])["missing"] == [30]
    rid = client.request("get", ids=[blob_id(7), blob_id(9)])
    assert [client.recv().get("data") for _ in range(3)] == [bytes([37]) * 5000, bytes([9]) * 5000, None]
    assert rid
    client.bye()


def test_snapshots(daemon):
    client = daemon.open_repo(create=True)
    for n in range(3):
        put(client, n)
    snap = blob_id("snap")
    refs = [blob_id(0), blob_id(1)]
    assert client.call("commit", id=snap, data=b"manifest", refs=refs) == {"op": "ok", "rid": client.rid}
    client.expect_error("exists", "commit", id=snap, data=b"manifest", refs=refs)
    many_missing = [blob_id(f"m{i}") for i in range(100)]
    answer = client.expect_error("missing_refs", "commit", id=blob_id("s2"), data=b"m2",
                                 refs=[blob_id(2)] + many_missing)  # fmt: skip
    assert 1 <= len(answer["ids"]) <= 64 and set(answer["ids"]) <= set(many_missing)
    client.expect_error("not_found", "get_snapshot", id=blob_id("s2"))

    listing = client.call("list")["snapshots"]
    assert len(listing) == 1
    assert listing[0]["id"] == snap and listing[0]["size"] >= len(b"manifest")
    assert type(listing[0]["time"]) is int and listing[0]["time"] > 1_600_000_000
    answer = client.call("get_snapshot", id=snap)
    assert answer == {"op": "snapshot", "rid": client.rid, "id": snap, "data": b"manifest", "refs": refs}
    assert client.call("stats")["snapshots"] == 1
    client.bye()

    client = daemon.open_repo()
    client.expect_error("not_found", "delete_snapshot", id=blob_id("nope"))
    assert client.call("delete_snapshot", id=snap)["op"] == "ok"
    client.expect_error("not_found", "get_snapshot", id=snap)
    assert client.call("list")["snapshots"] == []
    client.bye()


def test_set_config(daemon):
    client = daemon.open_repo(create=True)
    client.expect_error("conflict", "set_config", config=b"new", expect=b"wrong")
    client.expect_error("too_large", "set_config", config=bytes(frames.MAX_CONFIG + 1), expect=b"config-repo")
    assert client.call("set_config", config=b"new", expect=b"config-repo")["op"] == "ok"
    client.bye()
    client = daemon.client()
    assert client.call("open", write=False)["config"] == b"new"
    client.bye()


def test_storage_error_is_io_and_the_session_goes_on(daemon):
    client = daemon.open_repo(create=True)
    put(client, 1)
    snapshots = daemon.storage / "repo" / "snapshots"
    snapshots.rmdir()  # the directory the daemon holds open is gone: writing into it fails
    answer = client.expect_error("io", "commit", id=blob_id("s"), data=b"m", refs=[blob_id(1)])
    assert answer["message"]
    snapshots.mkdir()
    assert client.call("list")["snapshots"] == []  # the session goes on; nothing half-stored
    client.bye()
    client = daemon.open_repo()
    assert client.call("list")["snapshots"] == []
    assert client.call("commit", id=blob_id("s"), data=b"m", refs=[blob_id(1)])["op"] == "ok"
    client.bye()
    check = daemon.check()
    assert check.returncode == 0, check.stdout + check.stderr


def test_unknown_op_and_too_large_keep_the_connection(daemon):
    client = daemon.open_repo(create=True)
    client.expect_error("unknown_op", "compact")
    client.expect_error("too_large", "commit", id=blob_id("s"), data=bytes(frames.MAX_SNAPSHOT + 1), refs=[])
    client.expect_error("too_large", "put", id=blob_id(1), type=1, data=bytes(frames.MAX_BLOB + 1))
    assert put(client, 1)["stored"] is True
    client.bye()


def test_rid_echoed(daemon):
    client = daemon.client()
    client.send({"op": "stats", "rid": 2**63 - 1})
    assert client.recv()["rid"] == 2**63 - 1
    client.send({"op": "bye", "rid": 0})
    assert client.recv() == {"op": "bye", "rid": 0, "status": "ok"}


# --- locking, concurrency, pipelining -------------------------------------------------


def test_second_writer_locked(daemon):
    first = daemon.open_repo(create=True)
    second = daemon.client()
    answer = second.expect_error("locked", "open", write=True)
    assert answer["holder"]
    reader = daemon.open_repo(write=False)  # readers are not blocked
    put(first, 1)
    first.call("flush")
    assert reader.call("have", ids=[blob_id(1)])["missing"] == []
    first.bye()
    assert second.call("open", write=True)["op"] == "opened"  # the same session may retry
    second.bye()
    reader.bye()


def test_many_concurrent_connections(daemon):
    names = [f"r{i}" for i in range(6)]
    errors = []

    def session(name):
        try:
            client = daemon.open_repo(name, create=True)
            for n in range(50):
                assert put(client, f"{name}-{n}", data=os.urandom(10_000))["stored"]
            assert client.call("have", ids=[blob_id(f"{name}-{n}") for n in range(60)])["missing"] == list(
                range(50, 60)
            )
            client.bye()
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(os.listdir(daemon.storage)) == sorted(names)


def test_pipelining_does_not_deadlock(daemon):
    """A client that writes everything without waiting (and reads in another
    thread) completes, whatever the batch sizes."""
    client = daemon.open_repo(create=True)
    count = 3000
    ids = [blob_id(f"p{n}") for n in range(count)]
    payload = os.urandom(64 << 10)
    get_batches = [ids[:4096], ids[-1000:] * 4]
    expected = count + 1 + sum(len(batch) + 1 for batch in get_batches) + 1
    received = []

    def read_all():
        while (msg := client.recv()) is not None:
            received.append(msg)

    reader = threading.Thread(target=read_all)
    reader.start()
    for n, id_ in enumerate(ids):
        client.send({"op": "put", "rid": n + 1, "id": id_, "type": 1, "data": id_ + payload})
    client.send({"op": "flush", "rid": count + 1})
    rid = count + 2
    for batch in get_batches:
        client.send({"op": "get", "rid": rid, "ids": batch})
        rid += 1
    client.send({"op": "bye", "rid": rid})
    reader.join()

    assert len(received) == expected
    assert [m["stored"] for m in received[:count]] == [True] * count
    assert [m["rid"] for m in received[: count + 1]] == list(range(1, count + 2))
    pos = count + 1
    for batch_rid, batch in enumerate(get_batches, start=count + 2):
        answers = received[pos : pos + len(batch) + 1]
        assert all(m["rid"] == batch_rid for m in answers)
        assert [m.get("id") for m in answers[:-1]] == batch
        assert all(m["op"] == "blob" and m["data"] == m["id"] + payload for m in answers[:-1])
        assert answers[-1]["op"] == "done"
        pos += len(batch) + 1
    assert received[-1] == {"op": "bye", "rid": rid, "status": "ok"}


# --- end of session, shutdown, restart --------------------------------------------------


def test_half_close_without_bye_seals_and_unlocks(daemon):
    client = daemon.open_repo(create=True)
    for n in range(5):
        put(client, n)
    client.close_write()
    client.expect_eof()
    client.close()
    again = daemon.open_repo()  # the lock is free
    assert again.call("have", ids=[blob_id(n) for n in range(6)])["missing"] == [5]
    again.bye()
    daemon.wait_for_log("result=closed without bye")


def test_client_that_vanishes_unanswered_still_gets_its_puts_stored(daemon):
    """A client killed mid-backup never reads its answers; the puts it had
    sent completely are still stored, so a re-run reuses them."""
    client = daemon.open_repo(create=True)
    payload = os.urandom(256 << 10)
    for n in range(40):  # far more answers than we will ever read
        client.request("put", id=blob_id(n), type=1, data=payload[n:] + bytes(n))
    client.sock.shutdown(socket.SHUT_RDWR)
    client.close()
    again = daemon.open_repo(write=False)
    deadline = time.monotonic() + 30
    while again.call("have", ids=[blob_id(n) for n in range(40)])["missing"]:
        assert time.monotonic() < deadline, "puts of the vanished client were dropped"
        time.sleep(0.1)
    again.bye()


def test_sigterm_seals_open_packs(daemon):
    client = daemon.open_repo(create=True)
    for n in range(5):
        put(client, n)
    assert daemon.stop() == 0
    client.expect_eof()
    assert not daemon.socket.exists()
    daemon.start()
    check = daemon.check()
    assert check.returncode == 0, check.stdout + check.stderr
    client = daemon.open_repo(write=False)
    assert client.call("have", ids=[blob_id(n) for n in range(5)])["missing"] == []
    client.bye()


def test_socket_mode_and_stale_socket(daemon):
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o660
    daemon.kill()
    assert stat.S_ISSOCK(os.lstat(daemon.socket).st_mode)  # left behind by SIGKILL
    daemon.start()  # replaces the stale socket
    daemon.client().bye()


def test_refuses_live_socket_and_non_socket(daemon):
    other = daemon.cli("serve", "--socket", str(daemon.socket), "--storage", str(daemon.storage))
    assert other.returncode == 2
    assert other.stderr.count("\n") == 1 and "another process is listening" in other.stderr
    daemon.client().bye()  # the running daemon is untouched

    regular = daemon.workdir / "not-a-socket"
    regular.write_text("keep me")
    result = daemon.cli("serve", "--socket", str(regular), "--storage", str(daemon.storage))
    assert result.returncode == 2 and "is not a socket" in result.stderr
    assert regular.read_text() == "keep me"


def test_an_error_inside_the_server_nursery_ends_serve_unwrapped(tmp_path, monkeypatch):
    """trio 0.22 (Debian 12) lets a lone task error out of a nursery bare, trio >= 0.25
    wraps it in an exception group: on both, `run` raises the error itself, which the
    command line reports in one line (exit 2), and removes its socket."""

    async def failing_listeners(handler, listeners, *, task_status=trio.TASK_STATUS_IGNORED):
        raise OSError(errno.EBADF, "accept failed")

    monkeypatch.setattr(trio, "serve_listeners", failing_listeners)
    sock = tmp_path / "sock"
    with pytest.raises(OSError) as raised:
        server.run(storage.Storage(tmp_path), sock)
    assert type(raised.value) is OSError and raised.value.errno == errno.EBADF
    assert not sock.exists()


# --- command line ------------------------------------------------------------------------


@pytest.mark.parametrize("args", [[], ["serve"], ["reindex"], ["check"]])
def test_cli_help(qbackupd_cli, args):
    result = qbackupd_cli(*args, "--help")
    assert result.returncode == 0
    assert "usage: qbackupd" in result.stdout


def test_cli_errors(new_daemon):
    result = new_daemon.check("missing")
    assert result.returncode == 2
    assert result.stderr.startswith("qbackupd: error: ") and result.stderr.count("\n") == 1
    result = new_daemon.cli("reindex", "--storage", str(new_daemon.storage), "../etc")
    assert result.returncode == 2 and "invalid repository name" in result.stderr
    assert new_daemon.cli("frobnicate").returncode == 2
    assert new_daemon.cli("serve", "--storage", str(new_daemon.storage)).returncode == 2


def test_cli_reindex_and_check(daemon):
    client = daemon.open_repo(create=True)
    for n in range(20):
        put(client, n, data=os.urandom(1000))
    client.call("commit", id=blob_id("s"), data=b"m", refs=[blob_id(0)])
    client.bye()
    check = daemon.check()
    assert check.returncode == 0, check.stdout + check.stderr
    reindex = daemon.cli("reindex", "--storage", str(daemon.storage), "repo")
    assert reindex.returncode == 0, reindex.stderr
    client = daemon.open_repo(write=False)
    assert client.call("have", ids=[blob_id(n) for n in range(21)])["missing"] == [20]
    client.bye()

    pack = next((daemon.storage / "repo" / "packs").rglob("*.pack"))
    with open(pack, "r+b") as f:  # damage one byte of blob data
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    check = daemon.check()
    assert check.returncode == 1
    assert check.stdout.strip() and "problem(s) found in repo" in check.stderr
