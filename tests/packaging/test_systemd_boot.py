# SPDX-License-Identifier: GPL-2.0-or-later
"""The deb under a real systemd: this Debian 12 machine's own system, seen
through a throwaway overlay (writes go to a tmpfs), with the deb installed,
the qbackup-storage Qubes service flag set as qubes-sysinit sets it, booted
in systemd-nspawn to sockets.target. Then, as qrexec-agent would:

- the socket listens, root's alone (0600), behind /etc/qubes-rpc's link;
- a call as root starts the daemon as user qbackupd in its sandbox, which
  creates, writes and reads a repository in /rw/qbackupd;
- `nobody` cannot connect (EACCES), and with the socket opened up on purpose
  is refused by the daemon's peer check, with a log line;
- stopping the daemon leaves the socket listening; the next call starts it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pkgbuild import SYSTEM_PATH, run

pytestmark = [pytest.mark.packaging, pytest.mark.root]

BOOT_TIMEOUT = 90
SOCKET = "/run/qbackupd/qubes.BackupChunk"

# A minimal client of the protocol (docs/PROTOCOL.md), run inside the
# container with Debian's python3 and python3-msgpack (and tests/frameio.py,
# copied beside it): it connects through
# /etc/qubes-rpc as qrexec-agent does, sends the qrexec header and the frames
# named on its command line, and prints each answer as one JSON line.
CLIENT = r'''
import json, socket, sys
from frameio import decode_frames, frame, read_until_closed

ops = {
    "hello": {"op": "hello", "versions": [1], "client": "boot-test/0"},
    "init": {"op": "init", "config": b"config", "pack_size": 8 << 20},
    "open": {"op": "open", "write": False},
    "put": {"op": "put", "id": b"\x01" * 32, "type": 1, "data": b"ciphertext" * 100},
    "commit": {"op": "commit", "id": b"\x02" * 32, "data": b"manifest", "refs": [b"\x01" * 32]},
    "list": {"op": "list"},
    "bye": {"op": "bye"},
}
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(60)
try:
    sock.connect("/etc/qubes-rpc/qubes.BackupChunk")
except OSError as exc:
    print(json.dumps({"connect": exc.errno}))
    sys.exit(0)
out = b"qubes.BackupChunk+boot dom0\0" + b"".join(frame({**ops[name], "rid": rid}) for rid, name in enumerate(sys.argv[1:]))
try:
    sock.sendall(out)
except BrokenPipeError:
    pass
sock.shutdown(socket.SHUT_WR)
for answer in decode_frames(read_until_closed(sock)):
    print(json.dumps(answer, default=lambda value: value.hex()))  # bytes as hex, at any depth
'''


def _descendant_named(ancestor: int, name: str) -> int | None:
    """The pid of a process called `name` below `ancestor`, if any."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            parents[int(entry.name)] = (ppid, comm)
    for pid, (_, comm) in parents.items():
        if comm != name:
            continue
        up = pid
        while up in parents and up > 1:
            up = parents[up][0]
            if up == ancestor:
                return pid
    return None


class Container:
    def __init__(self, base: Path, log: Path):
        self.base = base
        self.merged = base / "merged"
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.pid1: int | None = None

    def inside(self, *cmd: str, check: bool = True, user: int | None = None) -> subprocess.CompletedProcess:
        """Run a command in the booted container (optionally as uid:gid `user`)."""
        assert self.pid1 is not None
        prefix = ["nsenter", "-t", str(self.pid1), "-a", "--"]
        if user is not None:
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        return run([*prefix, *cmd], check=check, timeout=120)

    def call(self, *ops: str, user: int | None = None) -> list[dict]:
        result = self.inside("/usr/bin/python3", "/srv/qbackup-client.py", *ops, user=user)
        return [json.loads(line) for line in result.stdout.splitlines()]

    def journal(self) -> str:
        return self.inside("journalctl", "-u", "qbackupd.service", "-o", "cat", "--no-pager").stdout

    def boot_log(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def container(built, tmp_path_factory):
    base = tmp_path_factory.mktemp("nspawn")
    mounted: list[Path] = []
    box = Container(base, base.parent / f"{base.name}-boot.log")
    try:
        run(["mount", "-t", "tmpfs", "tmpfs", str(base)])
        mounted.append(base)
        for sub in ("upper", "work", "merged"):
            (base / sub).mkdir()
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir=/,upperdir={base / 'upper'},workdir={base / 'work'}", str(box.merged)])
        mounted.append(box.merged)
        shutil.copy2(built.deb, box.merged / "srv" / "qbackup-vm.deb")
        # This machine has no Qubes agent: --force-depends (qubes-core-agent).
        run(["chroot", str(box.merged), "dpkg", "-i", "--force-depends", "/srv/qbackup-vm.deb"])
        # What qubes-sysinit.service does in a qube with the service enabled.
        (box.merged / "etc/tmpfiles.d/qbackup-test.conf").write_text(
            "f /run/qubes-service/qbackup-storage 0644 root root -\n")
        (box.merged / "srv/qbackup-client.py").write_text(CLIENT)
        shutil.copy2(Path(__file__).parents[1] / "frameio.py", box.merged / "srv/frameio.py")
        with open(box.log, "wb") as log:
            box.proc = subprocess.Popen(
                ["systemd-nspawn", "-D", str(box.merged), "--boot", "--register=no", "--keep-unit",
                 "--private-network", "--quiet", "-M", "qbackup-test", "--", "--unit=sockets.target"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                env={**os.environ, "PATH": SYSTEM_PATH})  # fmt: skip
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            if box.proc.poll() is not None:
                pytest.fail(f"the container exited ({box.proc.returncode}) while booting:\n{box.boot_log()}",
                            pytrace=False)
            box.pid1 = box.pid1 or _descendant_named(box.proc.pid, "systemd")
            if box.pid1:
                state = box.inside("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"the container did not finish booting in {BOOT_TIMEOUT}s:\n{box.boot_log()}",
                            pytrace=False)
            time.sleep(0.5)
        yield box
    finally:
        if box.proc is not None and box.proc.poll() is None:
            os.killpg(box.proc.pid, signal.SIGTERM)  # the container halts
            try:
                box.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(box.proc.pid, signal.SIGKILL)
                box.proc.wait(timeout=30)
        for path in reversed(mounted):
            subprocess.run(["umount", "-l", str(path)], check=False)


def test_socket_listens_root_only(container):
    assert container.inside("systemctl", "is-active", "qbackupd.socket").stdout.strip() == "active"
    assert container.inside("systemctl", "is-active", "qbackupd.service", check=False).stdout.strip() == "inactive"
    assert container.inside("stat", "-c", "%U %G %a %F", SOCKET).stdout.strip() == "root root 600 socket"
    assert container.inside("readlink", "/etc/qubes-rpc/qubes.BackupChunk").stdout.strip() == SOCKET
    # The socket unit made the storage directory, for the daemon.
    assert container.inside("stat", "-c", "%U %G %a", "/rw/qbackupd").stdout.strip() == "qbackupd qbackupd 700"


def test_a_call_as_root_starts_the_daemon_in_its_sandbox(container):
    answers = container.call("hello", "init", "put", "commit", "bye")
    assert [a["op"] for a in answers] == ["hello", "ok", "ok", "ok", "bye"], answers
    assert answers[2]["stored"] is True
    answers = container.call("hello", "open", "list", "bye")
    assert [a["op"] for a in answers] == ["hello", "opened", "list", "bye"], answers
    assert [s["id"] for s in answers[2]["snapshots"]] == ["02" * 32]

    assert container.inside("systemctl", "is-active", "qbackupd.service").stdout.strip() == "active"
    main_pid = container.inside("systemctl", "show", "-P", "MainPID", "qbackupd.service").stdout.strip()
    uid = container.inside("id", "-u", "qbackupd").stdout.strip()
    status = container.inside("cat", f"/proc/{main_pid}/status").stdout
    assert f"\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n" in status
    assert "\nNoNewPrivs:\t1\n" in status and "\nCapEff:\t0000000000000000\n" in status
    assert "\nSeccomp:\t2\n" in status
    owners = container.inside("find", "/rw/qbackupd", "!", "-user", "qbackupd").stdout
    assert owners == "", owners
    journal = container.journal()
    assert f"listening on {SOCKET} (socket from systemd)" in journal, journal
    assert "source=dom0 repo=boot ops=5" in journal and "result=ok" in journal, journal
    assert "qbackupd[" not in journal  # the journal names the daemon; no second prefix


def test_nobody_cannot_reach_the_socket_nor_get_past_the_daemon(container):
    nobody = 65534
    assert container.call("hello", "bye", user=nobody) == [{"connect": 13}]  # EACCES: root's socket
    container.inside("chmod", "0666", SOCKET)  # opened up on purpose: the daemon's own check remains
    try:
        answers = container.call("hello", "bye", user=nobody)
    finally:
        container.inside("chmod", "0600", SOCKET)
    assert len(answers) == 1 and answers[0]["code"] == "forbidden", answers
    journal = container.journal()
    assert f"uid={nobody} gid={nobody}: only uid 0, uid " in journal and "refused peer pid=" in journal, journal


def test_stopping_the_daemon_leaves_the_socket_to_start_it_again(container):
    container.call("hello", "bye")
    container.inside("systemctl", "stop", "qbackupd.service")
    assert container.inside("systemctl", "is-active", "qbackupd.socket").stdout.strip() == "active"
    assert "\nINFO stopped\n" in container.journal()  # SIGTERM: open packs sealed, locks released
    answers = container.call("hello", "open", "bye")
    assert [a["op"] for a in answers] == ["hello", "opened", "bye"], answers
    assert container.inside("systemctl", "is-active", "qbackupd.service").stdout.strip() == "active"
