# SPDX-License-Identifier: GPL-2.0-or-later
"""Benchmark of the backup-qube daemon through its socket.

Starts `python -m qbackupd serve` on a temp socket, stores SIZE bytes of
random blobs (256 KiB by default) with a pipelined client (one thread
writes, one reads), reads them all back with pipelined `get`s, then stops
the daemon and runs `qbackupd reindex` on the repository. Reports MB/s, the
daemon's CPU time per stored GiB while it stores, its peak RSS (VmHWM) and
reindex's time and peak RSS as a markdown table. `--daemon-src DIR` runs the
daemon of another checkout (its vm-service directory), for a before/after
comparison in one run.

    .venv/bin/python bench/bench_daemon.py [--size 2G] [--blob-size 256K] [--dir /tmp] [--daemon-src DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
GET_BATCH = 256
POOL = 64 << 20  # random bytes the blobs are cut from (the daemon never looks inside)


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in UNITS:
        return int(float(text[:-1]) * UNITS[text[-1]])
    return int(text)


class Client:
    """Just enough of the protocol for the benchmark (qrexec header, frames)."""

    def __init__(self, path: Path, repo: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.sendall(f"qubes.BackupChunk+{repo} dom0\0".encode())
        self.file = self.sock.makefile("rb", buffering=1 << 20)
        self.call({"op": "hello", "rid": 0, "versions": [1], "client": "bench"}, "hello")

    def send(self, msg: dict) -> None:
        payload = msgpack.packb(msg, use_bin_type=True)
        self.sock.sendall(struct.pack(">I", len(payload)) + payload)

    def recv(self) -> dict:
        head = self.file.read(4)
        if len(head) != 4:
            raise RuntimeError("daemon closed the connection")
        (length,) = struct.unpack(">I", head)
        msg = msgpack.unpackb(self.file.read(length), raw=False)
        if msg.get("op") == "error":
            raise RuntimeError(f"daemon error {msg['code']}: {msg['message']}")
        return msg

    def call(self, msg: dict, expect: str) -> dict:
        self.send(msg)
        answer = self.recv()
        if answer["op"] != expect:
            raise RuntimeError(f"unexpected answer {answer['op']} to {msg['op']}")
        return answer

    def pipeline(self, requests, count_answers: int, check) -> None:
        """Send every request from a thread while this one reads `count_answers` answers."""
        failure: list[BaseException] = []

        def write() -> None:
            try:
                for msg in requests:
                    self.send(msg)
            except OSError as exc:
                failure.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        for _ in range(count_answers):
            check(self.recv())
        writer.join()
        if failure:
            raise failure[0]


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc status")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> list[tuple[str, str]]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor() or "unknown",
    )  # fmt: skip
    mem = subprocess.run(["free", "-g"], capture_output=True, text=True).stdout.splitlines()
    return [
        ("date", time.strftime("%Y-%m-%d")),
        ("CPU", f"{cpu}, nproc {os.cpu_count()}"),
        ("memory (free -g)", f"{mem[1].split()[1]} GiB total" if len(mem) > 1 else "unknown"),
        ("Python", platform.python_version()),
    ]


def run(size: int, blob_size: int, workdir: Path, daemon_src: Path | None = None) -> list[tuple[str, str]]:
    count = max(1, size // blob_size)
    total = count * blob_size
    pool = os.urandom(POOL + blob_size)
    ids = [hashlib.sha256(b"bench %d" % n).digest() for n in range(count)]

    def blob(n: int) -> bytes:
        start = (n * 4099 * 64) % POOL
        return pool[start : start + blob_size]

    sock, storage, log = workdir / "d.sock", workdir / "storage", workdir / "daemon.log"
    storage.mkdir()
    env = dict(os.environ)
    if daemon_src is not None:  # another checkout's qbackupd (a before/after comparison)
        env["PYTHONPATH"] = str(daemon_src)
    with open(log, "wb") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "qbackupd", "serve", "--socket", str(sock), "--storage", str(storage),
             "--log-level", "warning"],
            stdout=log_file, stderr=log_file, env=env,
        )  # fmt: skip
    try:
        while True:
            try:
                client = Client(sock, "bench")
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if daemon.poll() is not None:
                    raise RuntimeError(f"daemon did not start: {log.read_text()}") from None
                time.sleep(0.05)
        client.call({"op": "init", "rid": 1, "config": b"bench", "pack_size": 64 << 20}, "ok")
        puts = ({"op": "put", "rid": 10 + n, "id": ids[n], "type": 1, "data": blob(n)} for n in range(count))

        def stored(answer: dict) -> None:
            if not answer.get("stored"):
                raise RuntimeError(f"put not stored: {answer}")

        start, cpu_start = time.perf_counter(), cpu_seconds(daemon.pid)
        client.pipeline(puts, count, stored)
        client.call({"op": "flush", "rid": 2}, "ok")
        put_seconds = time.perf_counter() - start
        put_cpu = cpu_seconds(daemon.pid) - cpu_start

        batches = [ids[i : i + GET_BATCH] for i in range(0, count, GET_BATCH)]
        gets = ({"op": "get", "rid": 3, "ids": batch} for batch in batches)
        got = [0]

        def received(answer: dict) -> None:
            if answer["op"] == "blob":
                got[0] += len(answer["data"])
            elif answer["op"] != "done":
                raise RuntimeError(f"get answered {answer['op']}")

        start = time.perf_counter()
        client.pipeline(gets, count + len(batches), received)
        get_seconds = time.perf_counter() - start
        if got[0] != total:
            raise RuntimeError(f"read back {got[0]} bytes of {total}")
        client.call({"op": "bye", "rid": 4}, "bye")
        daemon_hwm = vm_hwm_kib(daemon.pid)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait()

    proc = subprocess.Popen(
        [sys.executable, "-m", "qbackupd", "reindex", "--storage", str(storage), "bench"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    start = time.perf_counter()
    _, status, usage = os.wait4(proc.pid, 0)
    reindex_seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"reindex failed: {err.decode().strip()}")

    mb = total / 1e6
    return [
        ("data stored", f"{total / (1 << 30):.2f} GiB in {count} blobs of {blob_size >> 10} KiB, 64 MiB packs"),
        ("put (pipelined) + flush", f"{put_seconds:.1f} s, **{mb / put_seconds:.0f} MB/s**"),
        ("get (pipelined, batches of 256)", f"{get_seconds:.1f} s, **{mb / get_seconds:.0f} MB/s**"),
        ("daemon CPU during put + flush (user+sys)", f"{put_cpu:.1f} s, **{put_cpu / (total / (1 << 30)):.2f} s per GiB stored**"),
        ("daemon peak RSS (VmHWM)", f"{daemon_hwm / 1024:.0f} MiB"),
        ("`qbackupd reindex`", f"{reindex_seconds:.2f} s ({out.decode().strip()})"),
        ("reindex peak RSS", f"{usage.ru_maxrss / 1024:.0f} MiB"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2G", type=parse_size, help="bytes to store (default 2G)")
    parser.add_argument("--blob-size", default="256K", type=parse_size, help="blob size (default 256K)")
    parser.add_argument("--dir", default="/tmp", type=Path, help="where to put the temporary repository")
    parser.add_argument("--daemon-src", type=Path, help="run the daemon from this vm-service directory instead")
    args = parser.parse_args()
    free = shutil.disk_usage(args.dir).free
    if free < args.size * 1.2:
        print(f"bench_daemon: only {free >> 20} MiB free in {args.dir}", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="qbd-bench-", dir=args.dir))
    try:
        rows = machine() + run(args.size, args.blob_size, workdir, args.daemon_src)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
