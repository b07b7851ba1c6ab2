#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Restoring a volume into a new qube: admin.vm.volume.ImportWithSize
against writing qubesd's import target directly.

Both go through qubesd R4.2's real handlers (tests/qubes_r42.py, a
file-reflink pool on this machine's disk) and end the same way: qubesd's
import target committed by internal.vm.volume.ImportEnd.

- ImportWithSize: what `restore --qubes` does. qbackup's VolumeStream (every
  byte in order, zeros included) is handed to qubesadmin, whose import
  script asks qubesd for the target (ImportBegin) and writes it with
  `dd bs=128K conv=sparse,fdatasync` (the test bed's stand-in runs the real
  dd with the script's options), then ImportEnd.
- direct: ImportBegin through qubesd's internal API, then qbackup writes the
  target itself as `restore --to` writes a file (non-zero chunks only, at
  their offsets, chunks opened on every core), fsync, ImportEnd.

Three volumes, real ext4 images of files from this machine's /usr: a
template's root (`--root`, 65 % full), a private volume (`--private`, 5 %
full) and the private volume of a qube never used (`--private` size, an
empty file system). Each is backed up once into a real daemon, then restored both
ways from the repository (fetch, authenticate, decrypt, decompress, write),
and both ways from memory (the delivery alone: the same bytes already
decrypted, no daemon). Best of `--runs`.

Run by hand: `.venv/bin/python bench/bench_import.py [--root 1G] [--private 2G]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from workload import machine, make_image  # noqa: E402

import qubes_r42  # noqa: E402
from qbackup import cli, proto, restore  # noqa: E402
from qbackup.commands.common import parse_size, unlock  # noqa: E402
from qbackup.qubes import QubesAdminBackend  # noqa: E402
from qbackup.state import State  # noqa: E402
from qbackup_sim import start_daemon, stop_daemon  # noqa: E402

CHUNK = 256 << 10


class MemoryStream:
    """The volume's bytes from memory, in the pieces VolumeStream gives (a
    chunk, or a run of zeros), for the delivery-only figures."""

    def __init__(self, data: bytes):
        self.view, self.pos = memoryview(data), 0

    def read(self, n: int = -1) -> bytes:
        n = len(self.view) - self.pos if n < 0 else n
        part = bytes(self.view[self.pos:self.pos + n])
        self.pos += len(part)
        return part

    def close(self) -> None:
        pass


def direct_from_memory(qubesd, qube: str, data: bytes, nonzero: list[int]) -> None:
    """`nonzero`: the offsets of the chunks that are not all zero (what the
    chunk map says), so only those are written, as the real thing would."""
    begin = qubesd.internal("internal.vm.volume.ImportBegin", qube, "private",
                            str(len(data)).encode())
    _, path = begin[2:].decode().split(" ", 1)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        view = memoryview(data)
        for offset in nonzero:
            os.pwrite(fd, view[offset:offset + CHUNK], offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert qubesd.internal("internal.vm.volume.ImportEnd", qube, "private", b"ok") == b"0\0"


def direct_from_repository(qubesd, session, keys, qube: str, vol: dict) -> None:
    begin = qubesd.internal("internal.vm.volume.ImportBegin", qube, "private",
                            str(vol["size"]).encode())
    assert begin.startswith(b"0\0"), begin
    _, path = begin[2:].decode().split(" ", 1)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    errors = restore._Errors()
    try:
        restore._check_volume(session, keys, "bench", vol, restore._Sink(fd),
                              errors.reporter("bench", stop=True), None)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert not errors.result()
    assert qubesd.internal("internal.vm.volume.ImportEnd", qube, "private", b"ok") == b"0\0"


def best(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=parse_size, default=parse_size("1G"))
    ap.add_argument("--private", type=parse_size, default=parse_size("2G"))
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where the images go (default: a temp dir)")
    args = ap.parse_args()
    missing = qubes_r42.missing()
    if missing:
        print(f"cannot run: {missing}", file=sys.stderr)
        return 1
    import qubesadmin.config
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, \
            tempfile.TemporaryDirectory(prefix="qbi-") as daemon_dir:
        tmp = Path(tmp)
        start_daemon(daemon_dir)
        qubesadmin.config.QREXEC_CLIENT = str(qubes_r42.fake_qrexec_client(
            tmp / "qrexec-client", tmp / "qrexec.log"))
        os.environ["QBACKUP_FAKE_QREXEC_SOCKET"] = str(Path(daemon_dir) / "daemon.sock")
        qubesd = qubes_r42.Testbed(tmp / "qubesd")
        try:
            return run(args, tmp, qubesd)
        finally:
            qubesd.close()
            stop_daemon(daemon_dir)


def run(args, tmp: Path, qubesd) -> int:
    backend = QubesAdminBackend(qubesd.client())
    qubesd.add_qube("StandaloneVM", "backup", label="black")
    qubesd.add_qube("TemplateVM", "tpl", label="black")
    volumes = {"root": (args.root, 0.65), "private": (args.private, 0.05),
               "empty": (args.private, 0.0)}
    passphrase = tmp / "pw"
    passphrase.write_text("bench\n")
    config = {"backup_vm": "backup", "state_dir": str(tmp / "state")}
    for name, (size, fill) in volumes.items():
        qubesd.add_qube("AppVM", f"src-{name}", label="red", template="tpl")
        image = tmp / f"{name}.img"
        make_image(image, size, fill)
        with open(image, "rb") as f:
            backend.import_volume(f"src-{name}", "private", f, size)
        image.unlink()
    assert cli.run(["init", "--scrypt-n", "16384", "--passphrase-file", str(passphrase)],
                   backend=lambda: backend, config=config) == 0
    assert cli.run(["backup", *(f"src-{name}" for name in volumes),
                    "--passphrase-file", str(passphrase)],
                   backend=lambda: backend, config=config) == 0

    rows = []
    session = proto.Session(backend.connect("backup", "default"))
    keys = unlock(session, b"bench", write=False)
    [snap] = restore.load_history(session, keys, State(str(tmp / "state")))
    for name, (size, fill) in volumes.items():
        vol = snap.qubes[f"src-{name}"]["volumes"]["private"]
        dst = f"dst-{name}"
        qubesd.add_qube("StandaloneVM", dst, label="red")
        # no revision of the previous run's data copied at each commit: the
        # same for both ways, and a full copy on a file system without reflinks
        backend.set_volume(dst, "private", "revisions_to_keep", 0)
        path = backend.volume_config(f"src-{name}")["private"].path
        data = Path(path).read_bytes()
        nonzero = [i for i in range(0, len(data), CHUNK)
                   if data[i:i + CHUNK].count(0) != len(data[i:i + CHUNK])]
        stored = len(nonzero) * CHUNK

        def iws_repo():
            stream = restore.VolumeStream(session, keys, name, vol)
            backend.import_volume(dst, "private", stream, vol["size"])
            assert stream.complete
        t_iws = best(args.runs, iws_repo)
        assert Path(backend.volume_config(dst)["private"].path).read_bytes() == data
        t_direct = best(args.runs, lambda: direct_from_repository(qubesd, session, keys, dst, vol))
        assert Path(backend.volume_config(dst)["private"].path).read_bytes() == data
        t_iws_mem = best(args.runs, lambda: backend.import_volume(dst, "private",
                                                                  MemoryStream(data), size))
        t_direct_mem = best(args.runs, lambda: direct_from_memory(qubesd, dst, data, nonzero))
        rows.append((name, size, stored, t_iws, t_direct, t_iws_mem, t_direct_mem))
    session.close()

    mib = 1 << 20
    fs = os.popen(f"stat -f -c %T {tmp}").read().strip()
    print(f"{machine()}; qubesd's file-reflink pool on {tmp} ({fs})\n")
    print("| volume | size | non-zero chunks | ImportWithSize | direct | "
          "ImportWithSize, from memory | direct, from memory |")
    print("|---|---|---|---|---|---|---|")
    for name, size, stored, t_iws, t_direct, t_iws_mem, t_direct_mem in rows:
        def cell(t):
            return f"{t:.2f} s ({size / mib / t:.0f} MiB/s)"
        print(f"| {name} | {size // mib} MiB | {stored // mib} MiB | {cell(t_iws)} | "
              f"{cell(t_direct)} | {cell(t_iws_mem)} | {cell(t_direct_mem)} |")
    print("\nMiB/s: of the volume's size (zeros included). Best of", args.runs, "runs.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
