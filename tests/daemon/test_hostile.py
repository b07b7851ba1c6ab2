# SPDX-License-Identifier: GPL-2.0-or-later
"""Hostile clients against the real daemon subprocess: malformed headers and
frames, wrong types, oversized lengths and arrays, garbage, disconnects in
the middle of a PUT. The daemon must answer an error frame or close, store
nothing half-way, release the lock, and keep serving everyone else."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import socket
import struct
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qbackupd import frames

MiB = 1 << 20
_names = itertools.count()


@pytest.fixture
def daemon(shared_daemon):
    """One daemon survives every hostile client of this module."""
    return shared_daemon


@pytest.fixture
def repo() -> str:
    """A repository name no other test of the module uses."""
    return f"r{next(_names)}"


def blob_id(name: object) -> bytes:
    return hashlib.sha256(repr(name).encode()).digest()


def raw_frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def frame(msg: dict) -> bytes:
    return raw_frame(msgpack.packb(msg, use_bin_type=True))


def send_quietly(client, data: bytes) -> None:
    """Send, ignoring that the daemon may already have closed on us."""
    try:
        client.send_raw(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def expect_fatal(client, code: str, rid=None) -> None:
    answer = client.recv()
    assert answer is not None and answer["op"] == "error", answer
    assert answer["code"] == code and answer["rid"] == rid, answer
    assert isinstance(answer["message"], str) and answer["message"]
    client.expect_eof()
    client.close()


def assert_serving(daemon) -> None:
    client = daemon.client("never-created")
    client.expect_error("no_repository", "stats")
    client.bye()


# --- qrexec header ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        b"",  # EOF before any byte
        b"qubes.BackupChunk+repo dom0",  # EOF before the NUL
        b"q" * 300,  # no NUL within 256 bytes
        b"qubes.BackupChunk+" + b"r" * 240 + b" dom0\0",  # NUL beyond 256 bytes
    ],
)
def test_header_eof_or_oversized_closes(daemon, header):
    client = daemon.raw_client(header)
    client.close_write()
    client.expect_eof()
    assert_serving(daemon)


@pytest.mark.parametrize(
    "header",
    [b"\0", b"qubes.Other+repo dom0\0", b"qubes.BackupChunk+repo\0", b"qubes.BackupChunk+repo dom0 x\0", b"\xff\0"],
)
def test_malformed_header_error_then_close(daemon, header):
    client = daemon.raw_client(header)
    expect_fatal(client, "bad_request")
    assert_serving(daemon)


def test_header_and_frames_in_one_write(daemon):
    client = daemon.raw_client(b"")
    hello = {"op": "hello", "rid": 0, "versions": [1], "client": "x"}
    client.send_raw(b"qubes.BackupChunk+repo dom0\0" + frame(hello) + frame({"op": "bye", "rid": 1}))
    assert client.recv()["op"] == "hello"
    assert client.recv() == {"op": "bye", "rid": 1, "status": "ok"}
    client.expect_eof()


# --- frames ---------------------------------------------------------------------------------


@pytest.mark.parametrize("before_hello", [False, True])
@pytest.mark.parametrize(
    "data, code",
    [
        (b"\0\0\0\0", "bad_frame"),
        (struct.pack(">I", 2**32 - 1), "frame_too_large"),
        (struct.pack(">I", frames.MAX_FRAME + 1) + bytes(1000), "frame_too_large"),
        (raw_frame(msgpack.packb([1, 2, 3])), "bad_frame"),
        (raw_frame(msgpack.packb({"op": "stats", "rid": 1}) + b"\xc0"), "bad_frame"),
        (raw_frame(b"\x81\xa2op\xdd\xff\xff\xff\xff"), "bad_frame"),  # array of 2^32-1 items
        (raw_frame(b"\x81\xa2op\xc6\x7f\xff\xff\xff"), "bad_frame"),  # bin of 2 GiB
        (raw_frame(b"\x81\xa2op\xd4\x05\x00"), "bad_frame"),  # ext type
        (raw_frame(b"\x82\xa2op\xa5stats\x01\x01"), "bad_frame"),  # int key
        (frame({"op": "have", "rid": 1, "ids": [None] * 1_000_000}), "bad_frame"),  # huge array
        (frame({"op": "have", "rid": 1, "ids": [[]] * 1_000_000}), "bad_frame"),  # nested arrays
    ],
)
def test_bad_frames_are_fatal(daemon, data, code, before_hello):
    client = daemon.client(hello=not before_hello)
    client.send_raw(data)
    expect_fatal(client, code)
    assert_serving(daemon)


@pytest.mark.parametrize(
    "msg, rid",
    [
        ({"op": 1, "rid": 1}, 1),
        ({"op": "stats", "rid": -5}, None),
        ({"op": "stats", "rid": "1"}, None),
        ({"op": "stats"}, None),
        ({"op": "open", "rid": 1, "write": "yes"}, 1),
        ({"op": "open", "rid": 1, "write": True, "force": True}, 1),
        ({"op": "have", "rid": 1, "ids": [bytes(31)]}, 1),
        ({"op": "have", "rid": 1, "ids": [bytes(33)]}, 1),
        ({"op": "get", "rid": 1, "ids": [bytes(32)] * 4097}, 1),
        ({"op": "get_snapshot", "rid": 1, "id": "x" * 32}, 1),
        ({"op": "put", "rid": 1, "id": bytes(32), "type": 1.0, "data": b""}, 1),
    ],
)
def test_wrong_types_are_bad_request(daemon, msg, rid):
    client = daemon.client()
    client.send(msg)
    expect_fatal(client, "bad_request", rid)
    assert_serving(daemon)


def vm_hwm_mib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) >> 10
    raise AssertionError("no VmHWM")


def test_small_frame_cannot_expand_into_huge_memory(daemon):
    # 8 MiB of empty arrays would decode into ~8M Python lists (~600 MiB) without the shape check
    payload = b"\x82\xa2op\xa4have\xa3rid\xdd" + struct.pack(">I", frames.MAX_FRAME - 16)
    payload += b"\x90" * (frames.MAX_FRAME - len(payload))
    for _ in range(3):
        client = daemon.client()
        client.send_raw(raw_frame(payload))
        expect_fatal(client, "bad_frame")
    assert vm_hwm_mib(daemon.proc.pid) < 300


def test_responses_before_a_fatal_error_are_sent_in_order(daemon, repo):
    client = daemon.open_repo(repo, create=True)
    client.send_raw(
        frame({"op": "put", "rid": 5, "id": blob_id(1), "type": 1, "data": b"one"})
        + frame({"op": "frobnicate", "rid": 6})
        + frame({"op": "have", "rid": 7, "ids": [bytes(31)]})
        + frame({"op": "stats", "rid": 8})  # never answered: the connection is closed before
    )
    assert client.recv() == {"op": "ok", "rid": 5, "stored": True}
    assert client.recv()["code"] == "unknown_op"
    expect_fatal(client, "bad_request", 7)
    reader = daemon.open_repo(repo, write=False)  # what was put before the error is kept
    assert reader.call("have", ids=[blob_id(1)])["missing"] == []
    reader.bye()


@pytest.mark.parametrize("how", ["half-close", "close"])
@pytest.mark.parametrize("cut", [2, 4, 100, 600_000])
def test_disconnect_mid_put(daemon, repo, how, cut):
    client = daemon.open_repo(repo, create=True)
    for n in range(3):
        assert client.call("put", id=blob_id(n), type=1, data=os.urandom(200_000))["stored"]
    partial = frame({"op": "put", "rid": 99, "id": blob_id("cut"), "type": 1, "data": os.urandom(1 * MiB)})
    client.send_raw(partial[:cut])
    if how == "half-close":
        client.close_write()
        expect_fatal(client, "bad_frame")
    else:
        client.sock.close()
        daemon.wait_for_log(f"repo={repo} ops=")  # the connection has ended

    writer = daemon.open_repo(repo)  # the lock was released
    ids = [blob_id(n) for n in range(3)] + [blob_id("cut")]
    assert writer.call("have", ids=ids)["missing"] == [3]  # sealed what was put, nothing half-way
    writer.bye()
    check = daemon.check(repo)
    assert check.returncode == 0, check.stdout + check.stderr


def test_stalled_hostile_client_does_not_block_others(daemon, repo):
    stalled = daemon.open_repo(repo, create=True)
    stalled.send_raw(struct.pack(">I", 5 * MiB) + bytes(1000))  # then nothing more
    other = daemon.open_repo(repo + "-other", create=True)
    assert other.call("put", id=blob_id(1), type=1, data=b"x")["stored"]
    other.bye()
    stalled.close()


def test_garbage_after_header(daemon):
    for seed in range(5):
        client = daemon.client()
        send_quietly(client, hashlib.sha512(bytes([seed])).digest() * 50)
        answer = client.recv()
        if answer is not None:
            assert answer["op"] == "error" and answer["code"] in ("bad_frame", "frame_too_large"), answer
        client.close()
    assert_serving(daemon)


FUZZ_REPO = "fuzz"
FUZZ_IDS = [blob_id(("fuzz", n)) for n in range(4)]
OPS = ["open", "init", "put", "have", "get", "flush", "commit", "list", "get_snapshot",
       "delete_snapshot", "set_config", "stats", "bye", "hello"]
fuzz_rids = st.integers(-3, 2**64 - 1)
fuzz_ids = st.sampled_from(FUZZ_IDS) | st.binary(min_size=30, max_size=34)
fuzz_values = st.one_of(
    st.sampled_from(OPS), fuzz_rids, st.binary(max_size=40), st.booleans(), fuzz_ids,
    st.lists(fuzz_ids, max_size=3),
)
# Requests of the right shape, so that they get past validation into the storage code.
well_typed = st.one_of(
    st.fixed_dictionaries({"op": st.just("put"), "id": st.sampled_from(FUZZ_IDS),
                           "type": st.integers(0, 255), "data": st.binary(max_size=64)},
                          optional={"refs": st.lists(st.sampled_from(FUZZ_IDS), max_size=3)}),
    st.fixed_dictionaries({"op": st.sampled_from(["have", "get"]),
                           "ids": st.lists(st.sampled_from(FUZZ_IDS), max_size=4)}),
    st.fixed_dictionaries({"op": st.just("commit"), "id": st.sampled_from(FUZZ_IDS),
                           "data": st.binary(max_size=64),
                           "refs": st.lists(st.sampled_from(FUZZ_IDS), max_size=3)}),
    st.fixed_dictionaries({"op": st.sampled_from(["get_snapshot", "delete_snapshot"]),
                           "id": st.sampled_from(FUZZ_IDS)}),
    st.fixed_dictionaries({"op": st.sampled_from(["flush", "list", "stats"])}),
    st.fixed_dictionaries({"op": st.just("set_config"), "config": st.binary(max_size=16),
                           "expect": st.sampled_from([b"config-fuzz", b"x"])}),
)


@pytest.fixture(scope="module")
def fuzz_repo(shared_daemon) -> str:
    """A repository that exists and holds blobs and a snapshot under the
    fuzz's ids, so fuzzed requests reach the storage code and its data."""
    client = shared_daemon.open_repo(FUZZ_REPO, create=True)
    for blob in FUZZ_IDS[:2]:
        assert client.call("put", id=blob, type=1, data=b"blob")["stored"]
    assert client.call("commit", id=FUZZ_IDS[3], data=b"snapshot", refs=FUZZ_IDS[:1])["op"] == "ok"
    client.bye()
    return FUZZ_REPO


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    hello=st.booleans(),
    opened=st.sampled_from([None, True, False]),
    valid=st.lists(st.builds(lambda msg, rid: frame({**msg, "rid": rid}), well_typed,
                             st.integers(2, 2**63 - 1)), max_size=4),
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.builds(raw_frame, st.binary(max_size=64)),
            st.builds(frame, st.dictionaries(
                st.sampled_from(["op", "rid", "id", "ids", "write", "data", "type", "refs",
                                 "config", "pack_size", "expect", "x"]), fuzz_values)),
            st.builds(lambda msg, rid: frame({**msg, "rid": rid}), well_typed,
                      st.integers(1, 2**63 - 1)),
        ),
        max_size=8,
    ),
)
def test_fuzz_stream(daemon, fuzz_repo, hello, opened, valid, chunks):
    """Hostile bytes, frames and requests, after (sometimes) a valid session
    on an existing repository, so they reach the storage code too."""
    client = daemon.client(fuzz_repo, hello=hello)
    if hello and opened is not None:
        send_quietly(client, frame({"op": "open", "rid": 1, "write": opened}))
    for chunk in valid + chunks:
        send_quietly(client, chunk)
    try:
        client.close_write()
    except OSError:
        pass
    while (answer := client.recv()) is not None:  # error frames or answers, then EOF
        assert answer["op"] != "error" or answer["code"] in {
            "bad_frame", "frame_too_large", "bad_request", "unknown_op", "bad_repo_name",
            "no_repository", "read_only", "not_found", "too_large", "exists", "missing_refs",
            "locked", "conflict",
        }, answer  # fmt: skip
    client.close()
    assert "error internal" not in daemon.log_text() and "Traceback" not in daemon.log_text()


def test_fuzzed_repository_reached_storage_and_stays_consistent(daemon, fuzz_repo):
    """The fuzz ran requests on the open repository (not only refusals
    before it), and the daemon's own check still finds it consistent."""
    sessions = re.findall(rf"repo={fuzz_repo} ops=(\d+)", daemon.log_text())
    assert sum(int(ops) >= 3 for ops in sessions) >= 5, sessions  # hello, open and more
    check = daemon.check(fuzz_repo)
    assert check.returncode == 0, check.stdout + check.stderr


def test_daemon_survives_all_of_the_above_at_once(daemon):
    closed = daemon.closed_connections()
    clients = [daemon.client() for _ in range(20)]
    for n, client in enumerate(clients):
        send_quietly(client, [b"\0\0\0\0", struct.pack(">I", 2**32 - 1), b"\xde\xad" * 10][n % 3])
    for client in clients:
        client.close()
    daemon.wait_connections_closed(closed + 20)
    assert_serving(daemon)
    assert "Traceback" not in daemon.log_text()


def test_reset_by_peer_while_daemon_writes(daemon, repo):
    client = daemon.open_repo(repo, create=True)
    data = os.urandom(4 * MiB)
    assert client.call("put", id=blob_id("big"), type=1, data=data)["stored"]
    for _ in range(5):  # ask for ~400 MiB of answers and vanish without reading them
        client.request("get", ids=[blob_id("big")] * 20)
    assert client.recv()["op"] == "blob"  # the daemon is in the middle of answering
    time.sleep(0.5)  # let it fill its answer queue and block on it (not an assertion on time)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()
    daemon.wait_for_log(f"repo={repo} ops=")
    writer = daemon.open_repo(repo)
    assert writer.call("have", ids=[blob_id("big")])["missing"] == []
    writer.bye()
    assert "error internal" not in daemon.log_text() and "Traceback" not in daemon.log_text()


# --- version 2 operations: delete_snapshots, gc, check, usage ----------------------------------


def repository_with_garbage(daemon, repo: str) -> None:
    """Two snapshots, one deleted: 30 blobs of garbage in 8 MiB packs."""
    client = daemon.open_repo(repo, create=True)
    for snap in range(2):
        ids = [blob_id((repo, snap, n)) for n in range(30)]
        for id_ in ids:
            client.send({"op": "put", "rid": client.next_rid(), "id": id_, "type": 1, "data": os.urandom(300_000)})
        for _ in ids:
            assert client.recv()["op"] == "ok"
        assert client.call("put", id=blob_id((repo, snap)), type=2, data=b"root", refs=ids)["op"] == "ok"
        assert client.call("commit", id=blob_id((repo, "s", snap)), data=b"m", refs=[blob_id((repo, snap))])["op"] == "ok"
    assert client.call("delete_snapshots", ids=[blob_id((repo, "s", 0))])["op"] == "ok"
    client.bye()


@pytest.mark.parametrize(
    "msg",
    [
        {"op": "gc", "rid": 1, "repack_below": 101, "dry_run": False},
        {"op": "gc", "rid": 1, "repack_below": 2**64 - 1, "dry_run": False},
        {"op": "gc", "rid": 1, "repack_below": 50, "dry_run": None},
        {"op": "gc", "rid": 1, "dry_run": True},
        {"op": "check", "rid": 1, "read_data": 1},
        {"op": "check", "rid": 1},
        {"op": "usage", "rid": 1, "x": 1},
        {"op": "delete_snapshots", "rid": 1, "ids": [bytes(32)] * 4097},
        {"op": "delete_snapshots", "rid": 1, "ids": [bytes(31)]},
        {"op": "delete_snapshots", "rid": 1, "ids": bytes(32)},
        {"op": "delete_snapshots", "rid": 1},
        {"op": "locate", "rid": 1, "ids": [bytes(32)] * 4097},
        {"op": "locate", "rid": 1, "ids": [bytes(32), bytes(31)]},
        {"op": "locate", "rid": 1, "ids": [bytes(33)]},
        {"op": "locate", "rid": 1, "ids": [1]},
        {"op": "locate", "rid": 1, "ids": bytes(32)},
        {"op": "locate", "rid": 1},
    ],
)
def test_later_ops_wrong_fields_are_bad_request(daemon, repo, msg):
    client = daemon.open_repo(repo, create=True, versions=(1, 2, 3))
    client.send(msg)
    expect_fatal(client, "bad_request", 1)
    assert_serving(daemon)


@pytest.mark.parametrize("op, since", sorted(frames.SINCE.items()))
def test_later_ops_unknown_in_an_older_session(daemon, repo, op, since):
    client = daemon.open_repo(repo, create=True, versions=tuple(range(1, since)))
    client.expect_error("unknown_op", op)  # whatever its fields: an older daemon says so too
    assert client.call("stats")["op"] == "stats"
    client.bye()


def test_version_2_ops_wrong_mode_and_arguments(daemon, repo):
    client = daemon.client(repo)
    for op, fields in (("gc", {"repack_below": 50, "dry_run": False}), ("check", {"read_data": False}), ("usage", {})):
        client.expect_error("no_repository", op, **fields)
    client.bye()
    repository_with_garbage(daemon, repo)
    writer = daemon.open_repo(repo)
    writer.expect_error("read_write", "gc", repack_below=50, dry_run=False)  # gc takes the lock itself
    writer.expect_error("not_found", "delete_snapshots", ids=[blob_id((repo, "s", 1)), blob_id("nothing")])
    assert [s["id"] for s in writer.call("list")["snapshots"]] == [blob_id((repo, "s", 1))]  # none deleted
    writer.send({"op": "delete_snapshots", "rid": 7, "ids": [blob_id(1), blob_id(1)]})
    expect_fatal(writer, "bad_request", 7)
    writer = daemon.open_repo(repo)
    writer.send({"op": "delete_snapshots", "rid": 8, "ids": []})
    expect_fatal(writer, "bad_request", 8)
    reader = daemon.open_repo(repo, write=False)
    reader.expect_error("read_only", "delete_snapshots", ids=[blob_id((repo, "s", 1))])
    reader.bye()


def test_locate_in_a_read_only_session(daemon, repo):
    """A reader gets a key per id, in request order: by pack, then by offset."""
    repository_with_garbage(daemon, repo)
    client = daemon.open_repo(repo, write=False, versions=(1, 2, 3))
    ids = [blob_id((repo, snap, n)) for snap in range(2) for n in range(30)]
    answer = client.call("locate", ids=ids[::-1] + [blob_id("nothing")])
    assert set(answer) == {"op", "rid", "keys"} and answer["op"] == "locate"
    keys = answer["keys"][::-1]
    assert keys[0] == 2**63 - 1 and keys[1:] == sorted(keys[1:]) and len(set(keys)) == 61
    assert client.call("locate", ids=[])["keys"] == []
    client.bye()


def long_op(client, op: str, **fields) -> tuple[list[dict], dict]:
    rid = client.request(op, **fields)
    progress = []
    while True:
        answer = client.recv()
        assert answer is not None and answer["rid"] == rid, answer
        if answer["op"] != "progress":
            return progress, answer
        assert set(answer) == {"op", "rid", "phase", "done", "total"}, answer
        progress.append(answer)


def test_client_vanishing_mid_gc_stops_it_and_the_next_one_finishes(daemon, repo):
    repository_with_garbage(daemon, repo)
    daemon.wait_for_log(f"repo={repo} ops=")  # that connection has ended: it is not counted below
    ended = daemon.log_text().count(f"repo={repo} ops=")
    client = daemon.open_repo(repo, write=False)
    client.request("gc", repack_below=100, dry_run=False)
    first = client.recv()
    assert first["op"] in ("progress", "gc"), first
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()
    daemon.wait_for_log(f"repo={repo} ops=", ended + 1)  # the connection, and so its gc, has ended
    client = daemon.open_repo(repo, write=False)
    _, summary = long_op(client, "gc", repack_below=100, dry_run=False)
    assert summary["op"] == "gc", summary
    _, report = long_op(client, "check", read_data=True)
    assert report["problems"] == [] and report["damaged"] == [], report
    _, used = long_op(client, "usage")
    assert used["unreferenced_blobs"] == 0 and len(used["snapshots"]) == 1
    client.bye()
    writer = daemon.open_repo(repo)  # neither lock is left behind
    writer.bye()
    assert "Traceback" not in daemon.log_text()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    write=st.booleans(),
    requests=st.lists(
        st.fixed_dictionaries(
            {"op": st.sampled_from(sorted(frames.SINCE))},
            optional={
                "ids": st.lists(st.binary(min_size=31, max_size=33) | st.just(blob_id("x")), max_size=3),
                "repack_below": st.integers(-2, 102) | st.booleans() | st.none(),
                "dry_run": st.booleans() | st.integers(0, 1),
                "read_data": st.booleans() | st.binary(max_size=2),
                "x": st.integers(-(2**63), 2**64 - 1),
            },
        ),
        max_size=4,
    ),
)
def test_fuzz_later_ops_on_a_repository(daemon, write, requests):
    """Random version-2 and 3 requests against a repository that exists (storage code reached)."""
    ended = daemon.closed_connections()
    client = daemon.open_repo("fuzz2", create=not (daemon.storage / "fuzz2").exists(), write=write, versions=(1, 2, 3))
    for n, msg in enumerate(requests):
        send_quietly(client, frame({**msg, "rid": 100 + n}))
    send_quietly(client, frame({"op": "bye", "rid": 999}))
    while (answer := client.recv()) is not None:
        assert answer["op"] != "error" or answer["code"] in {
            "bad_request", "unknown_op", "read_only", "read_write", "not_found", "locked",
        }, answer  # fmt: skip
    client.close()
    daemon.wait_connections_closed(ended + 1)  # its writer lock is released before the next example
    assert "error internal" not in daemon.log_text() and "Traceback" not in daemon.log_text()
