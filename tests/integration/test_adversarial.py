# SPDX-License-Identifier: GPL-2.0-or-later
"""A malicious backup qube must be detected, never trusted (DESIGN §2).

Each test puts a tampering proxy (tests/integration/adversary.py) between the
real dom0 client code and the real daemon, and checks that verify / restore /
history loading fail with a precise error, that nothing unauthenticated is
written, and that the client neither crashes nor hangs.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest

from adversary import Daemon, Proxy, Tamper, frame
from qbackup import crypto, transport
from qbackup.backup import VolumeSource, backup
from qbackup.errors import BadPassphrase, ProtocolError, QbackupError, RollbackError
from qbackup.proto import Session
from qbackup.restore import _Plan, load_history, restore, verify, verify_snapshots
from qbackup.state import State
from hangguard import within

CHUNK = 64 * 1024
PASS = b"correct horse"
TYPE_DATA = 1
META = {"class": "AppVM", "properties": {}, "features": {}, "tags": []}




@dataclass
class World:
    tmp: Path
    daemon: Daemon
    keys: crypto.Keys
    state_dir: Path
    image: Path
    snapshots: list[bytes]

    def session(self, sock: Path | None = None) -> Session:
        s = Session(transport.unix_socket(str(sock or self.daemon.sock), "repo"))
        s.open(write=False)
        return s

    def attacked(self, tamper: Tamper) -> Session:
        path = self.tmp / f"proxy-{random.getrandbits(32)}.sock"
        Proxy(path, self.daemon.sock, tamper)
        return self.session(path)

    def history(self, session: Session, **kw):
        return load_history(session, self.keys, State(str(self.state_dir)), **kw)


def make_image(path: Path, rng: random.Random) -> None:
    """24 chunks of random data, 4 zero chunks, a short tail."""
    with open(path, "wb") as f:
        for i in range(28):
            f.write(bytes(CHUNK) if i % 7 == 3 else rng.randbytes(CHUNK))
        f.write(rng.randbytes(1000))


def run_backup(w_keys, daemon, state_dir, image, predecessor):
    s = Session(transport.unix_socket(str(daemon.sock), "repo"))
    s.open(write=True)
    src = VolumeSource(qube="work", volume="private", path=str(image),
                       size=image.stat().st_size, settings={"pool": "sim"})
    stats = backup(s, w_keys, [src], {"work": META},
                   state=State(str(state_dir)), predecessor=predecessor)
    s.close()
    return stats.snapshot_id


def init_repository(daemon: Daemon) -> crypto.Keys:
    """A new repository "repo" in the daemon; its keys."""
    keys = crypto.create_keys(CHUNK)
    with Session(transport.unix_socket(str(daemon.sock), "repo")) as s:
        s.init(crypto.wrap_keys(keys, PASS, scrypt_n=2**14), 8 << 20)
    return keys


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("adv")
    daemon = Daemon(tmp)
    try:
        keys = init_repository(daemon)
        rng = random.Random(7)
        image = tmp / "private.img"
        make_image(image, rng)
        state_dir = tmp / "state"
        first = run_backup(keys, daemon, state_dir, image, None)
        with open(image, "r+b") as f:  # change two chunks
            f.seek(5 * CHUNK)
            f.write(rng.randbytes(CHUNK))
            f.seek(20 * CHUNK + 17)
            f.write(b"changed")
        second = run_backup(keys, daemon, state_dir, image, first)
        with open(image, "r+b") as f:
            f.seek(9 * CHUNK)
            f.write(rng.randbytes(CHUNK))
        third = run_backup(keys, daemon, state_dir, image, second)
        yield World(tmp, daemon, keys, state_dir, image, [first, second, third])
    finally:
        daemon.stop()


def latest(w: World, s: Session):
    return w.history(s)[-1]


# --- tampering strategies ----------------------------------------------------

def relay(msg):
    """Pass a frame on, but answer locate with equal keys: verify then gets
    the chunks in the order the chunk maps name them (honest keys follow the
    records in the packs, the order the workers' puts arrived in), so the
    first data blob it sees is the volume's first chunk."""
    if msg.get("op") == "locate":
        msg = dict(msg, keys=[0] * len(msg["keys"]))
    return [frame(msg)]


class OnDataBlobs(Tamper):
    """Applies ``change`` to data-chunk blob frames sent to the client."""

    def __init__(self, change, limit: int = 1) -> None:
        self.change, self.limit, self.count = change, limit, 0

    def to_client(self, msg):
        if msg.get("op") == "blob" and msg.get("type") == TYPE_DATA and self.count < self.limit:
            self.count += 1
            return self.change(msg)
        return relay(msg)


def flip_bit(msg):
    data = bytearray(msg["data"])
    data[len(data) // 2] ^= 0x10
    return [frame(dict(msg, data=bytes(data)))]


def truncate(msg):
    return [frame(dict(msg, data=msg["data"][: len(msg["data"]) // 2]))]


def drop(msg):
    return [frame({"op": "missing", "rid": msg["rid"], "id": msg["id"]})]


def as_tree_blob(msg):
    return [frame(dict(msg, type=2))]


class SwapTwo(Tamper):
    """Swaps the contents of the first two data blobs (ids stay in place)."""

    def __init__(self) -> None:
        self.held = None
        self.done = False

    def to_client(self, msg):
        if self.done or msg.get("op") != "blob" or msg.get("type") != TYPE_DATA:
            return relay(msg)
        if self.held is None:
            self.held = msg
            return []
        self.done = True
        a, b = self.held, msg
        return [frame(dict(a, data=b["data"])), frame(dict(b, data=a["data"]))]


class WrongId(Tamper):
    """Answers every data request with the first data blob it saw."""

    def __init__(self) -> None:
        self.first = None

    def to_client(self, msg):
        if msg.get("op") == "blob" and msg.get("type") == TYPE_DATA:
            if self.first is None:
                self.first = msg["data"]
            else:
                return [frame(dict(msg, data=self.first))]
        return relay(msg)


STORED = [i for i in range(29) if i % 7 != 3]  # chunks of make_image that are not zero


def assert_detected(result, chunks: list[int], needle: str) -> None:
    """Exactly these chunks are reported, each for this reason (no
    detection test may accept any error at any offset)."""
    assert needle, "say what the detection must report"
    assert not result.ok
    assert [e.split(": ")[0] for e in result.errors] == [
        f"work:private at offset {k * CHUNK}" for k in chunks], result.errors
    for error in result.errors:
        assert needle in error.lower(), error


@pytest.mark.parametrize(
    "tamper, chunks, needle",
    [
        (lambda: OnDataBlobs(flip_bit), [0], "authentication failed"),
        (lambda: OnDataBlobs(truncate), [0], "authentication failed"),
        (lambda: OnDataBlobs(drop), [0], "chunk missing"),
        (lambda: OnDataBlobs(as_tree_blob), [0], "blob has type 2"),
        (SwapTwo, [0, 1], "authentication failed"),
        # Every chunk but the first gets the first one's blob: the associated
        # data (the id) must refuse it before its plaintext is even looked at;
        # the short last chunk must not be the only one caught (by its length).
        (WrongId, STORED[1:], "authentication failed"),
    ],
    ids=["flipped-bit", "truncated", "dropped", "data-as-metadata", "swapped", "wrong-id"],
)
def test_verify_detects_tampered_chunks(world, tamper, chunks, needle):
    s = world.attacked(tamper())
    snap = latest(world, s)
    result = within(verify, s, world.keys, snap)
    assert_detected(result, chunks, needle)
    s.close()


def test_restore_writes_nothing_unauthenticated(world, tmp_path):
    s = world.attacked(OnDataBlobs(flip_bit))
    snap = latest(world, s)
    target = tmp_path / "restored.img"
    try:
        result = within(restore, s, world.keys, snap, {("work", "private"): str(target)})
    except QbackupError:
        result = None
    if result is not None:
        assert not result.ok
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no partial or scratch file left behind
    s.close()


def test_honest_restore_matches_source(world, tmp_path):
    s = world.session()
    snap = latest(world, s)
    target = tmp_path / "restored.img"
    result = restore(s, world.keys, snap, {("work", "private"): str(target)})
    s.close()
    assert result.ok, result.errors
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(world.image.read_bytes()).digest()


class OlderUnderNewerName(Tamper):
    """Serves the (genuine) older snapshot blob when the newer one is asked for."""

    def __init__(self, new: bytes, old_blob: bytes) -> None:
        self.new, self.old_blob = new, old_blob

    def to_client(self, msg):
        if msg.get("op") == "snapshot" and msg["id"] == self.new:
            return [frame(dict(msg, data=self.old_blob))]
        return [frame(msg)]


def test_older_snapshot_under_newer_name_is_refused(world):
    first, newest = world.snapshots[0], world.snapshots[-1]
    honest = world.session()
    old_blob = honest.get_snapshot(first)
    honest.close()
    s = world.attacked(OlderUnderNewerName(newest, old_blob))
    history = within(world.history, s)
    s.close()
    assert [x.id for x in history] == world.snapshots[:-1]
    [damaged] = history.damaged
    assert damaged.id == newest and "authentication failed" in damaged.reason


class Hide(Tamper):
    """Leaves some snapshots out of the listing."""

    def __init__(self, hidden: set[bytes]) -> None:
        self.hidden = hidden

    def to_client(self, msg):
        if msg.get("op") == "list":
            snaps = [x for x in msg["snapshots"] if x["id"] not in self.hidden]
            return [frame(dict(msg, snapshots=snaps))]
        return [frame(msg)]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["oldest", "middle", "newest"])
def test_hidden_snapshot_is_refused(world, which):
    """dom0 has seen every snapshot: hiding any one of them, head, middle or
    oldest, is refused (the real daemon still holds them all)."""
    hidden = world.snapshots[which]
    s = world.attacked(Hide({hidden}))
    with pytest.raises(RollbackError, match=f"{hidden.hex()}, .* is missing.*--allow-rollback"):
        within(world.history, s)
    s.close()


class ForgedKeyFile(Tamper):
    """Serves a key file the attacker made (it cannot know the passphrase)."""

    def to_client(self, msg):
        if msg.get("op") == "opened":
            forged = crypto.wrap_keys(crypto.create_keys(CHUNK), b"attacker", scrypt_n=2**14)
            return [frame(dict(msg, config=forged))]
        return [frame(msg)]


def test_forged_key_file_is_refused(world):
    path = world.tmp / "proxy-keyfile.sock"
    Proxy(path, world.daemon.sock, ForgedKeyFile())
    s = Session(transport.unix_socket(str(path), "repo"))
    untrusted_config, _ = s.open(write=False)
    with pytest.raises(BadPassphrase):
        crypto.unwrap_keys(untrusted_config, PASS)
    s.close()


class OversizedFrame(Tamper):
    def to_client(self, msg):
        if msg.get("op") == "blob":
            return [b"\xff\xff\xff\xf0" + b"\0" * 64]
        return [frame(msg)]


class Garbage(Tamper):
    def to_client(self, msg):
        if msg.get("op") == "blob":
            payload = os.urandom(200)
            return [len(payload).to_bytes(4, "big") + payload]
        return [frame(msg)]


class ExtraBlob(Tamper):
    def to_client(self, msg):
        if msg.get("op") == "blob":
            return [frame(msg), frame(msg)]
        return [frame(msg)]


@pytest.mark.parametrize("tamper", [OversizedFrame, Garbage, ExtraBlob],
                         ids=["oversized-frame", "garbage", "extra-answer"])
def test_malformed_stream_fails_cleanly(world, tamper):
    s = world.attacked(tamper())
    snap = latest(world, s)
    with pytest.raises(ProtocolError):
        result = within(verify, s, world.keys, snap)
        # A verify that reports instead of raising must still have failed.
        if not result.ok:
            raise ProtocolError("; ".join(result.errors))


class LieAboutHave(Tamper):
    """Claims to hold every chunk, and hides the dangling references from the
    honest store underneath so the commit goes through: the backup "succeeds"
    and holds nothing. verify must find every lost chunk."""

    def to_client(self, msg):
        if msg.get("op") == "have":
            return [frame(dict(msg, missing=[]))]
        return [frame(msg)]

    def to_daemon(self, msg):
        if msg.get("op") == "put":
            msg = {k: v for k, v in msg.items() if k != "refs"}
        elif msg.get("op") == "commit":
            msg = dict(msg, refs=[])
        return [frame(msg)]


def test_have_lies_are_caught_by_verify(tmp_path):
    daemon = Daemon(tmp_path)
    try:
        keys = init_repository(daemon)
        image = tmp_path / "fresh.img"
        image.write_bytes(random.Random(99).randbytes(6 * CHUNK))
        proxy_path = tmp_path / "liar.sock"
        Proxy(proxy_path, daemon.sock, LieAboutHave())
        s = Session(transport.unix_socket(str(proxy_path), "repo"))
        s.open(write=True)
        src = VolumeSource(qube="work", volume="private", path=str(image),
                           size=image.stat().st_size, settings={})
        stats = within(backup, s, keys, [src], {"work": META}, state=State(str(tmp_path / "st")))
        s.close()
        assert stats.chunks_new == 0  # the liar made the client send nothing

        honest = Session(transport.unix_socket(str(daemon.sock), "repo"))
        honest.open(write=False)
        snap = load_history(honest, keys, State(str(tmp_path / "st")))[-1]
        result = verify(honest, keys, snap)
        honest.close()
        assert not result.ok
        assert sum("missing" in e.lower() for e in result.errors) >= 1
    finally:
        daemon.stop()


# --- verify's read order: locate's keys decide only the order (protocol 3) -----

class Locating(Tamper):
    """Records the ids verify gets once it has located them (data chunks,
    and chunk map nodes if it walks them again to place errors); replaces
    locate's keys with ``keys(n)`` (None: the daemon's own); flips a bit in
    the chunks in ``damage``."""

    def __init__(self, keys=None, damage=frozenset()) -> None:
        self.keys, self.damage = keys, damage
        self.located, self.fetched = False, []

    def to_daemon(self, msg):
        if msg.get("op") == "locate":
            self.located = True
        elif msg.get("op") == "get" and self.located:
            self.fetched += msg["ids"]
        return [frame(msg)]

    def to_client(self, msg):
        if msg.get("op") == "locate" and self.keys is not None:
            return [frame(dict(msg, keys=self.keys(len(msg["keys"]))))]
        if msg.get("op") == "blob" and msg["id"] in self.damage:
            return flip_bit(msg)
        return [frame(msg)]


def newest_first(w: World, s: Session) -> tuple[list, list[bytes]]:
    """The three snapshots, newest first; their distinct data chunks in the
    order they first come in the chunk maps (what a version-2 daemon gets)."""
    snapshots = w.history(s)[::-1]
    plan = _Plan(None)
    for snap in snapshots:
        plan.add(s, w.keys, snap)
    return snapshots, list(plan.expected)


def test_verify_gets_the_chunks_in_pack_order(world):
    """Newest snapshot first, its chunk maps name chunks of three packs (one
    per backup) interleaved: verify gets every chunk once, sorted by pack
    and by offset in the pack as the daemon's index has them."""
    tamper = Locating()
    s = world.attacked(tamper)
    snapshots, first_seen = newest_first(world, s)
    results = within(verify_snapshots, s, world.keys, snapshots)
    s.close()
    assert all(r.ok for r in results)
    index = sqlite3.connect(f"file:{world.daemon.storage / 'repo' / 'index.sqlite'}?mode=ro", uri=True)
    where = {row[0]: row[1:] for row in index.execute("SELECT id, pack, pos FROM blobs")}
    index.close()
    assert sorted(tamper.fetched) == sorted(first_seen)          # each once
    assert tamper.fetched == sorted(first_seen, key=where.__getitem__)
    assert len({where[i][0] for i in first_seen}) == 3 and tamper.fetched != first_seen


ADVERSARIAL_KEYS = {
    "all-equal": lambda n: [0] * n,
    "reversed": lambda n: list(range(n, 0, -1)),
    # as positions, these would fetch some ids twice and others never
    "colliding-positions": lambda n: [i // 2 for i in range(n)],
    "extremes": lambda n: [(1 << 63) - 1 if i % 2 else 0 for i in range(n)],
    "shuffled": lambda n: random.Random(n).sample(range(n), n),
}


@pytest.mark.parametrize("keys", list(ADVERSARIAL_KEYS.values()), ids=list(ADVERSARIAL_KEYS))
def test_lying_locate_changes_only_the_order(world, keys):
    """Whatever keys the daemon makes up, verify gets every distinct chunk
    exactly once, and reports each damaged one at its volume and offset in
    every snapshot using it: chunk 0 is in all three, 5 in the newer two
    (changed by the second backup), 9 in the newest only."""
    image = world.image.read_bytes()
    damage = {k: world.keys.chunk_id(image[k * CHUNK:(k + 1) * CHUNK]) for k in (0, 5, 9)}
    tamper = Locating(keys, frozenset(damage.values()))
    s = world.attacked(tamper)
    snapshots, first_seen = newest_first(world, s)
    results = within(verify_snapshots, s, world.keys, snapshots)
    s.close()
    data = [i for i in tamper.fetched if i in set(first_seen)]   # the second walk gets nodes too
    assert sorted(data) == sorted(first_seen)
    for result, chunks in zip(results, ([0, 5, 9], [0, 5], [0])):
        assert_detected(result, chunks, "authentication failed")


@pytest.mark.parametrize("keys, match", [
    (lambda n: [0] * (n - 1), "locate answer has .* keys for"),
    (lambda n: [-1] * n, "value -1 outside"),
    (lambda n: ["0"] * n, "is str, not int"),
])
def test_malformed_locate_fails_verify(world, keys, match):
    s = world.attacked(Locating(keys))
    snapshots, _ = newest_first(world, s)
    with pytest.raises(ProtocolError, match=match):
        within(verify_snapshots, s, world.keys, snapshots)
