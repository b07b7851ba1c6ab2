# SPDX-License-Identifier: GPL-2.0-or-later
"""DESIGN §2 invariants that are properties of everything the backup qube holds.

The other invariants have their named tests elsewhere; docs/INVARIANTS.md maps
each one to its tests.
"""

from __future__ import annotations

import random
from pathlib import Path

import msgpack
import pytest

from adversary import Daemon
from qbackup import crypto, transport
from qbackup.backup import VolumeSource, backup
from qbackup.proto import Session
from qbackup.state import State

CHUNK = 64 * 1024
META = {"class": "AppVM", "properties": {"label": "red"}, "features": {}, "tags": ["secret-tag"]}
MARKER = b"TOP-SECRET-PLAINTEXT-MARKER-"


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A repository after a backup of a volume full of a recognisable plaintext."""
    tmp = tmp_path_factory.mktemp("inv")
    daemon = Daemon(tmp)
    try:
        keys = crypto.create_keys(CHUNK)
        config = crypto.wrap_keys(keys, b"passphrase", scrypt_n=2**14)
        with Session(transport.unix_socket(str(daemon.sock), "repo")) as s:
            s.init(config, 8 << 20)
        rng = random.Random(3)
        image = tmp / "vol.img"
        # Compressible but distinct chunks: every chunk holds the marker many times.
        with open(image, "wb") as f:
            for i in range(16):
                f.write((MARKER + b"%06d" % i + rng.randbytes(16)) * (CHUNK // 50) + bytes(CHUNK % 50))
        with Session(transport.unix_socket(str(daemon.sock), "repo")) as s:
            s.open(write=True)
            src = VolumeSource("secret-qube", "private", str(image), image.stat().st_size, {})
            backup(s, keys, [src], {"secret-qube": META}, state=State(str(tmp / "state")))
    finally:
        daemon.stop()
    blob = b"".join(p.read_bytes() for p in sorted(Path(daemon.storage).rglob("*")) if p.is_file())
    return keys, config, blob


def test_invariant_1_keys_never_leave_dom0_in_clear(stored):
    keys, config, everything = stored
    secrets = [keys._master, *keys._id_keys.values(), *keys._kind_keys.values()]
    for secret in secrets:
        assert secret not in everything
    # The key file the repository holds is the scrypt-wrapped one, memory-hard.
    untrusted = msgpack.unpackb(config)
    assert untrusted["kdf"] == "scrypt" and untrusted["n"] >= 2**14
    assert config in everything


def test_invariant_6_backup_qube_never_reads_data(stored):
    _, _, everything = stored
    for plaintext in (MARKER, b"secret-qube", b"secret-tag", b"private"):
        assert plaintext not in everything
