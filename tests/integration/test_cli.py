# SPDX-License-Identifier: GPL-2.0-or-later
"""End-to-end tests of the `qbackup` command line: the real CLI in
subprocesses against a simulated dom0 and the real daemon (fixture `sim`,
tests/integration/conftest.py), plus in-process runs against a hostile
daemon."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest

from qbackup import cli, transport
from qbackup.commands import common
from qbackup.errors import QbackupError, UsageError
from qbackup_sim import (daemon_pid, load_inventory, run_qbackup, save_inventory, socket_path,
                         start_daemon, stop_daemon)
from qbackup_sim.daemon import DAEMON_PYTHON, daemon_command

VOLUMES = {("tpl", "private"), ("tpl", "root"), ("work", "private")}
POLL = 0.005
DEADLINE = 120  # guards against a hang, never a performance assertion


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single `qbackup: error:` line a failed command must print."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qbackup: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def run_here(argv: list[str], capsys, sim_dir: Path | None = None,
             **run_options) -> tuple[int, str, str]:
    """Run the CLI in this process (against the sim in `sim_dir` if given):
    (exit code, stdout, stderr)."""
    try:
        code = run_qbackup(sim_dir, argv) if sim_dir else cli.run(argv, **run_options)
    except SystemExit as e:  # argparse: --help, usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL)


def writer_lock_free(sim) -> bool:
    """Whether no writer holds the repository (the daemon's flock)."""
    with open(sim.dir / "storage/default/lock", "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


# -- the normal life of a repository ------------------------------------------

def test_backup_list_verify_restore_round_trip(sim, tmp_path):
    init = sim.run("init", "--scrypt-n", "16384", "--chunk-size", "64K", "--pack-size", "8M")
    assert "initialised repository default in backup" in init.stdout
    assert daemon_pid(sim.dir) is not None  # started on first use, like qrexec

    full = sim.json("backup", "--all")
    # --all leaves out the backup qube; volatile volumes are never backed up
    assert full["qubes"] == ["tpl", "work"] and full["volumes"] == 3
    sizes = sum(sim.image(q, v).stat().st_size for q, v in VOLUMES)
    assert full["bytes_total"] == sizes
    assert full["chunks_zero"] > 0 and full["chunks_new"] > 0
    assert 0 < full["bytes_read"] < sizes  # holes are not read

    listed = sim.json("list")["snapshots"]
    assert [s["id"] for s in listed] == [full["snapshot"]]
    assert listed[0]["qubes"] == ["tpl", "work"] and listed[0]["bytes_total"] == sizes
    human = sim.run("list").stdout
    assert full["snapshot"][:16] in human and "tpl, work" in human

    checked = sim.json("verify")
    assert checked["ok"] and checked["results"][0]["snapshot"] == full["snapshot"]
    assert "verify OK" in sim.run("verify", full["snapshot"][:8]).stdout

    restored = sim.run("restore", "latest", "--to", str(tmp_path / "out"))
    assert "restore OK" in restored.stdout
    for qube, vol in VOLUMES:
        assert same_bytes(tmp_path / "out" / qube / f"{vol}.img", sim.image(qube, vol))
    assert not (tmp_path / "out" / "work" / "volatile.img").exists()
    assert not (tmp_path / "out" / "backup").exists()

    stats = sim.json("stats")
    assert stats["snapshots"] == 1 and stats["backup_qube"]["packs"] >= 1
    assert "as reported by the backup qube" in sim.run("stats").stdout


def test_incremental_backup_sends_only_changes(sim):
    sim.init()
    full = sim.json("backup", "tpl", "work")
    with open(sim.image("work", "private"), "r+b") as f:
        f.seek(1 << 20)
        f.write(os.urandom(4096))
    incr = sim.json("backup", "tpl", "work")
    assert incr["chunks_new"] == 1  # the one changed chunk
    assert incr["bytes_sent"] < full["bytes_sent"] / 10
    assert incr["chunks_dedup"] == full["chunks_new"] - 1
    history = sim.json("list")["snapshots"]
    assert [s["id"] for s in history] == [full["snapshot"], incr["snapshot"]]
    assert history[1]["predecessor"] == full["snapshot"]
    assert sim.json("verify", "--all")["ok"]


def test_restore_selected_qube_and_volume_targets(sim, tmp_path):
    sim.init()
    snap = sim.json("backup", "work", "tpl")["snapshot"]
    sim.run("restore", snap[:12], "--qube", "work", "--to", str(tmp_path / "a"))
    assert same_bytes(tmp_path / "a/work/private.img", sim.image("work", "private"))
    assert not (tmp_path / "a/tpl").exists()
    target = tmp_path / "b" / "root-copy"
    target.parent.mkdir()
    sim.run("restore", "latest", "--volume-target", f"tpl:root={target}")
    assert same_bytes(target, sim.image("tpl", "root"))


def test_restore_refuses_existing_target_without_force(sim, tmp_path):
    sim.init()
    sim.run("backup", "work")
    out = tmp_path / "out"
    sim.run("restore", "latest", "--to", str(out))
    image = out / "work" / "private.img"
    image.write_bytes(b"precious data")
    refused = sim.run("restore", "latest", "--to", str(out), expect=1)
    assert "exists: refusing to overwrite without --force" in one_error_line(refused)
    assert image.read_bytes() == b"precious data"
    sim.run("restore", "latest", "--to", str(out), "--force")
    assert same_bytes(image, sim.image("work", "private"))


def test_delete_snapshot(sim):
    sim.init()
    first = sim.json("backup", "work")["snapshot"]
    second = sim.json("backup", "work")["snapshot"]
    assert f"deleted snapshot {first}" in sim.run("delete", first[:10]).stdout
    assert [s["id"] for s in sim.json("list")["snapshots"]] == [second]
    assert sim.json("verify", "--all")["ok"]
    gone = sim.run("verify", first, expect=1)
    assert f"no snapshot {first}" in one_error_line(gone)


def test_prune_protect_and_dry_run(sim):
    sim.init()
    ids = [sim.json("backup", "work")["snapshot"] for _ in range(4)]
    protected = sim.run("protect", ids[1][:12])
    assert f"snapshot {ids[1]} is protected" in protected.stdout
    assert [s["protected"] for s in sim.json("list")["snapshots"]] == [False, True, False, False]
    dry = sim.run("prune", "--keep-last", "2", "--dry-run")
    assert "dry run: would delete 1 and keep 3 snapshots" in dry.stdout
    assert f"{ids[0][:16]}" in dry.stdout and "would delete" in dry.stdout
    assert "keep (protected)" in dry.stdout and "keep (newest, last)" in dry.stdout
    assert len(sim.json("list")["snapshots"]) == 4  # a dry run deletes nothing
    pruned = sim.run("prune", "--keep-last", "1", "--json")
    decisions = {s["id"]: (s["keep"], s["reasons"]) for s in json.loads(pruned.stdout)["snapshots"]}
    assert decisions == {ids[3]: (True, ["newest", "last"]), ids[2]: (False, []),
                         ids[1]: (True, ["protected"]), ids[0]: (False, [])}
    assert [s["id"] for s in sim.json("list")["snapshots"]] == [ids[1], ids[3]]
    refused = sim.run("delete", ids[1], expect=1)
    assert "is protected: run `qbackup unprotect" in one_error_line(refused)
    sim.run("unprotect", ids[1])
    again = sim.run("prune", "--keep-within", "0h")  # backups seconds apart
    assert "deleted 1 snapshots, kept 1" in again.stdout and "qbackup gc" in again.stdout
    assert [s["id"] for s in sim.json("list")["snapshots"]] == [ids[3]]
    assert "deleted 0 snapshots, kept 1" in sim.run("prune", "--keep-daily", "1").stdout
    usage = sim.run("prune", expect=2)
    assert "give at least one --keep-* rule" in one_error_line(usage)


def test_verify_sample(sim):
    # about 60 distinct chunks: a 50% sample takes all or none of them once in 2^60
    sim.run("init", "--scrypt-n", "16384", "--chunk-size", "64K", "--pack-size", "8M")
    sim.run("backup", "work", "tpl")
    full = sim.json("verify")["results"][0]
    sampled = sim.run("verify", "--sample", "50")
    assert "sample: 50% of the distinct data chunks" in sampled.stdout
    assert "verify OK" in sampled.stdout and "more not sampled" in sampled.stdout
    result = sim.json("verify", "--sample", "50")["results"][0]
    assert result["chunks"] + result["skipped"] == full["chunks"] and full["skipped"] == 0
    assert 0 < result["chunks"] < full["chunks"]
    usage = sim.run("verify", "--sample", "0", expect=2)
    assert "not a percentage from 0.01 to 100" in one_error_line(usage)


def test_change_passphrase(sim, tmp_path):
    sim.init()
    sim.run("backup", "work")
    new = tmp_path / "new-passphrase"
    new.write_bytes(b"a much better passphrase\n")
    refused = sim.run("key", "change-passphrase", "--new-passphrase-file", str(new),
                      "--scrypt-n", "16384", passphrase_file=new, expect=5)
    assert "wrong passphrase" in one_error_line(refused)
    changed = sim.run("key", "change-passphrase", "--new-passphrase-file", str(new),
                      "--scrypt-n", "16384")
    assert "changed" in changed.stdout
    old_fails = sim.run("list", expect=5)
    assert "wrong passphrase" in one_error_line(old_fails)
    listed = sim.run("list", "--json", passphrase_file=new)
    assert len(json.loads(listed.stdout)["snapshots"]) == 1
    assert "verify OK" in sim.run("verify", passphrase_file=new).stdout


# -- errors: one line, documented exit codes ----------------------------------

def test_wrong_passphrase_exits_5(sim, tmp_path):
    sim.init()
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    for command in (["list"], ["backup", "work"], ["verify"]):
        proc = sim.run(*command, expect=5, passphrase_file=wrong)
        assert "wrong passphrase" in one_error_line(proc)


def test_empty_passphrase_and_no_terminal_are_refused(sim, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    proc = sim.run("init", "--scrypt-n", "16384", expect=1, passphrase_file=empty)
    assert "empty passphrase" in one_error_line(proc)
    asks = subprocess.run([sys.executable, "-m", "qbackup_sim", "run", str(sim.dir), "list"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert asks.returncode == 2
    assert "--passphrase-file" in one_error_line(asks)


@pytest.mark.parametrize("args, message", [
    (["backup", "nosuch"], "no such qube: nosuch"),
    (["backup", "work", "--exclude", "ghost"], "no such qube: ghost"),
    (["backup"], "name the qubes to back up, or give --all"),
    (["backup", "--all", "work"], "name the qubes to back up, or give --all"),
    (["backup", "--all", "--exclude", "tpl", "--exclude", "work"], "nothing to back up"),
    (["init", "--chunk-size", "100K"], "--chunk-size must be a power of two"),
    (["init", "--chunk-size", "lots"], "invalid size 'lots'"),
    (["init", "--chunk-size", "8M"], "--chunk-size must be a power of two"),
    (["init", "--pack-size", "1M"], "--pack-size must be from 8M to 512M"),
    (["init", "--scrypt-n", "1000"], "--scrypt-n must be a power of two"),
    (["init", "--scrypt-n", "4194304"], "--scrypt-n must be a power of two"),
    (["restore", "latest"], "one of the arguments --qubes --to --volume-target is required"),
    (["restore", "latest", "--qubes", "--to", "x"], "not allowed with"),
    (["restore", "latest", "--to", "x", "--rename", "a:b"], "--rename goes with --qubes"),
    (["restore", "latest", "--to", "x", "--dry-run"], "--dry-run goes with --qubes"),
    (["restore", "latest", "--qubes", "--force"], "--qube and --force go with --to"),
    (["restore", "latest", "--qubes", "--rename", "nocolon"], "expected OLD:NEW"),
    (["restore", "latest", "--qubes", "--rename", "a:bad.name"], "invalid qube name"),
    (["restore", "latest", "--qubes", "--rename", "a:dom0"], "invalid qube name"),
    (["restore", "latest", "--to", "x", "--volume-target", "a:b=c"], "not allowed with"),
    (["restore", "latest", "--volume-target", "nocolon=x"], "expected QUBE:VOLUME=PATH"),
    (["verify", "latest", "--all"], "give a snapshot or --all, not both"),
    (["--repo", "../x", "list"], "invalid repository name"),
    (["--backup-vm", "bad name", "list"], "invalid backup qube name"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_exit_2(sim, capsys, args, message):
    # in process (fast): these are refused before anything is contacted
    code, _, err = run_here([*args, "--passphrase-file", str(sim.passphrase_file)], capsys,
                            sim.dir)
    assert code == 2
    assert message in one_error_line(subprocess.CompletedProcess([], code, "", err))
    assert daemon_pid(sim.dir) is None


def test_usage_error_from_a_subprocess(sim):
    proc = sim.run("backup", "nosuch", expect=2)
    assert one_error_line(proc) == "qbackup: error: no such qube: nosuch"


def test_restore_errors(sim, tmp_path):
    sim.init()
    empty = sim.run("restore", "latest", "--to", str(tmp_path), expect=1)
    assert "holds no snapshots" in one_error_line(empty)
    sim.run("backup", "work")
    for spec, message in (("deadbeef00", "no snapshot deadbeef00"),
                          ("xyz", "invalid snapshot"), ("abc", "invalid snapshot")):
        assert message in one_error_line(sim.run("restore", spec, "--to", str(tmp_path),
                                                 expect=1))
    proc = sim.run("restore", "latest", "--qube", "tpl", "--to", str(tmp_path), expect=2)
    assert "qube not in this snapshot: tpl" in one_error_line(proc)
    proc = sim.run("restore", "latest", "--volume-target", f"work:root={tmp_path}/r",
                   expect=2)
    assert "not in this snapshot: work:root" in one_error_line(proc)
    assert list(tmp_path.iterdir()) == []  # nothing created by refused restores


def test_repository_errors(sim):
    missing = sim.run("list", expect=1)
    assert "no_repository" in one_error_line(missing)
    sim.init()
    pinned = sim.run("init", "--scrypt-n", "16384", expect=4)
    assert "is pinned to repository" in one_error_line(pinned) and "--replace" in pinned.stderr
    again = sim.run("init", "--scrypt-n", "16384", "--replace", expect=1)
    assert "exists" in one_error_line(again)
    other_vm = sim.run("--backup-vm", "work2", "list", expect=1)
    assert "backup qube 'work2' does not exist" in one_error_line(other_vm)
    not_a_sim = subprocess.run([sys.executable, "-m", "qbackup_sim", "run", str(sim.dir / "x"),
                                "list"], capture_output=True, text=True)
    assert not_a_sim.returncode == 1 and "not a sim directory" in one_error_line(not_a_sim)


def test_every_command_has_help(capsys):
    for command in (["init"], ["backup"], ["list"], ["verify"], ["restore"], ["delete"],
                    ["prune"], ["protect"], ["unprotect"], ["repo", "list"], ["repo", "trust"],
                    ["stats"], ["gc"], ["check-storage"], ["key", "change-passphrase"]):
        code, out, _ = run_here([*command, "--help"], capsys)
        assert code == 0 and out.startswith("usage: qbackup ") and "--backup-vm VM" in out
    proc = subprocess.run([sys.executable, "-m", "qbackup", "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "130 interrupted" in proc.stdout


# -- rollback and resume --------------------------------------------------------

def test_rollback_is_refused_end_to_end(sim):
    sim.init()
    sim.run("backup", "work")
    newest = sim.json("backup", "work")["snapshot"]
    # the backup qube drops the newest snapshot behind dom0's back
    (sim.dir / "storage/default/snapshots" / newest).unlink()
    refused = sim.run("list", expect=4)
    assert "rolled back" in one_error_line(refused) and "--allow-rollback" in refused.stderr
    sim.run("backup", "work", expect=4)
    accepted = sim.run("list", "--json", "--allow-rollback")
    assert len(json.loads(accepted.stdout)["snapshots"]) == 1
    assert len(sim.json("list")["snapshots"]) == 1  # accepted: no longer refused


def test_substituted_repository_is_refused_until_trusted(sim, tmp_path):
    """The backup qube serves repository 'archive' (same passphrase) under
    the name dom0 pinned for 'default': every command refuses it, naming
    both ids, until `repo trust` re-pins the name explicitly."""
    sim.init()
    sim.run("--repo", "archive", "init", "--scrypt-n", "16384", "--pack-size", "8M")
    sim.run("backup", "work")
    archived = sim.json("--repo", "archive", "backup", "tpl")["snapshot"]
    pins = {p["repo"]: p["repo_id"] for p in sim.json("repo", "list")["pins"]}
    assert set(pins) == {"default", "archive"}
    stop_daemon(sim.dir)
    storage = sim.dir / "storage"
    (storage / "default").rename(storage / "swap")
    (storage / "archive").rename(storage / "default")
    (storage / "swap").rename(storage / "archive")
    for command in (["list"], ["backup", "work"], ["restore", "latest", "--to", str(tmp_path)],
                    ["verify"], ["delete", "latest"], ["prune", "--keep-last", "1"]):
        line = one_error_line(sim.run(*command, expect=4))
        assert pins["default"] in line and pins["archive"] in line and "repo trust" in line
    assert list(tmp_path.iterdir()) == []
    asks = sim.run("repo", "trust", expect=2)  # no terminal: the id must be given
    assert f"--id {pins['archive'][:16]}" in one_error_line(asks)
    wrong = sim.run("repo", "trust", "--id", pins["default"][:12], expect=1)
    assert "nothing changed" in one_error_line(wrong)
    trusted = sim.run("repo", "trust", "--id", pins["archive"][:12])
    assert pins["default"] in trusted.stdout and pins["archive"] in trusted.stdout
    assert "1 snapshots" in trusted.stdout and "now pinned" in trusted.stdout
    assert [s["id"] for s in sim.json("list")["snapshots"]] == [archived]


def test_damaged_snapshot_hides_no_other_end_to_end(sim, tmp_path):
    sim.init()
    first = sim.json("backup", "work")["snapshot"]
    second = sim.json("backup", "work")["snapshot"]
    snapshot_file = sim.dir / "storage/default/snapshots" / first
    rotten = bytearray(snapshot_file.read_bytes())
    rotten[len(rotten) // 2] ^= 1
    snapshot_file.write_bytes(bytes(rotten))
    listed = sim.run("list", expect=3)
    assert second[:16] in listed.stdout and f"{first[:16]}  DAMAGED" in listed.stdout
    verified = sim.run("verify")
    assert "verify OK" in verified.stdout
    assert verified.stderr.startswith(f"qbackup: warning: snapshot {first} is damaged and left out")
    everything = sim.run("verify", "--all", "--json", expect=3)
    assert [r["ok"] for r in json.loads(everything.stdout)["results"]] == [False, True]
    sim.run("restore", "latest", "--to", str(tmp_path / "out"))
    assert same_bytes(tmp_path / "out/work/private.img", sim.image("work", "private"))
    refused = sim.run("restore", first[:12], "--to", str(tmp_path / "bad"), expect=3)
    warning, error = refused.stderr.splitlines()
    assert warning.startswith("qbackup: warning:")
    assert error.startswith(f"qbackup: error: snapshot {first} is damaged: ")
    assert not (tmp_path / "bad").exists()


def test_killed_backup_resumes(sim):
    sim.init()  # 8 MiB packs
    inventory = load_inventory(sim.dir)
    inventory["qubes"]["big"] = {"class": "StandaloneVM", "volumes": {"private": {
        "pool": "varlibqubes", "size": 64 << 20, "path": "volumes/big/private.img",
        "rw": True, "save_on_stop": True, "snap_on_start": False, "revisions_to_keep": 1}}}
    save_inventory(sim.dir, inventory)
    image = sim.image("big", "private")
    image.parent.mkdir()
    with open(image, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))

    packs = sim.dir / "storage/default/packs"
    client = subprocess.Popen(sim.argv("backup", "big"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(packs.rglob("*.pack")) or client.poll() is not None,
                 "a sealed pack")
        assert client.poll() is None, "the backup ended before it could be killed"
    finally:
        client.kill()
        client.wait()
    assert sim.json("list")["snapshots"] == []  # nothing committed
    wait_for(lambda: writer_lock_free(sim), "the daemon to release the dead writer's lock")

    resumed = sim.json("backup", "big")
    assert resumed["chunks_dedup"] > 0  # chunks that reached sealed packs are reused
    assert resumed["bytes_sent"] <= (64 << 20) - (8 << 20)
    assert sim.json("verify")["ok"]
    out = sim.dir / "restored"
    sim.run("restore", "latest", "--to", str(out))
    assert same_bytes(out / "big" / "private.img", image)


INTERRUPTS = 1 << (signal.SIGINT - 1) | 1 << (signal.SIGTERM - 1)


def signal_masks(pid: int) -> dict[int, int]:
    """Each thread's blocked-signal mask, from /proc."""
    masks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("SigBlk:"):
                masks[int(task.name)] = int(line.split()[1], 16)
    return masks


def test_interrupted_backup_exits_130(sim):
    sim.init()
    inventory = load_inventory(sim.dir)
    inventory["qubes"]["work"]["volumes"]["private"]["size"] = 48 << 20
    save_inventory(sim.dir, inventory)
    with open(sim.image("work", "private"), "wb") as f:
        for _ in range(48):
            f.write(os.urandom(1 << 20))
    packs = sim.dir / "storage/default/packs"
    client = subprocess.Popen(sim.argv("backup", "work"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    wait_for(lambda: any(packs.rglob("*.pack")) or client.poll() is not None, "a pack")
    # Freeze the backup qube so the backup cannot finish before the interrupt lands.
    frozen = daemon_pid(sim.dir)
    os.kill(frozen, signal.SIGSTOP)
    try:
        assert client.poll() is None, "the backup ended before the interrupt"
        # The kernel hands SIGINT to a thread that does not block it, and only
        # the main thread acts on it: every other thread must block it.
        masks = signal_masks(client.pid)
        assert len(masks) > 1 and not masks[client.pid] & INTERRUPTS
        assert all(m & INTERRUPTS == INTERRUPTS for tid, m in masks.items() if tid != client.pid)
        client.send_signal(signal.SIGINT)
        out, err = client.communicate(timeout=DEADLINE)
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert client.returncode == 130
    assert err.strip().splitlines()[-1] == "qbackup: error: interrupted"
    wait_for(lambda: writer_lock_free(sim), "the lock")
    assert sim.json("backup", "work")["chunks_dedup"] > 0


# -- the sim's daemon -----------------------------------------------------------

def test_sim_daemon_start_stop_and_restart_after_crash(sim):
    sim_cli = [sys.executable, "-m", "qbackup_sim"]
    status = subprocess.run([*sim_cli, "status", str(sim.dir)], capture_output=True, text=True)
    assert status.returncode == 3 and "daemon not running" in status.stdout
    assert "qube work (AppVM)" in status.stdout
    started = subprocess.run([*sim_cli, "start", str(sim.dir)], capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    pid = daemon_pid(sim.dir)
    assert pid is not None and start_daemon(sim.dir) == pid  # already running: reused
    os.kill(pid, signal.SIGKILL)  # the backup qube crashes
    wait_for(lambda: daemon_pid(sim.dir) is None, "the daemon to die")
    sim.init()  # restarted on demand, stale socket replaced
    assert daemon_pid(sim.dir) not in (None, pid)
    stopped = subprocess.run([*sim_cli, "stop", str(sim.dir)], capture_output=True, text=True)
    assert stopped.returncode == 0 and "daemon stopped" in stopped.stdout
    assert daemon_pid(sim.dir) is None and not (sim.dir / "daemon.sock").exists()


def test_sim_daemon_runs_on_the_interpreter_the_environment_names(sim, tmp_path, monkeypatch):
    """make test points QBACKUP_SIM_DAEMON_PYTHON at the backup qube's floor venv."""
    called = tmp_path / "called"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "$@" > {shlex.quote(str(called))}\n'
                      f'exec {shlex.quote(daemon_command()[0])} "$@"\n')
    python.chmod(0o755)
    monkeypatch.setenv(DAEMON_PYTHON, str(python))
    pid = start_daemon(sim.dir)
    assert called.read_text().split() == [
        "-m", "qbackupd", "serve", "--socket", str(socket_path(sim.dir)),
        "--storage", str(sim.dir / "storage")]
    assert daemon_pid(sim.dir) == pid


def test_sim_create_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qbackup_sim", "create", str(tmp_path / "s"),
                           "--qube", "fed:TemplateVM", "--qube", "app:AppVM:private=2M"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    inventory = load_inventory(tmp_path / "s")
    assert inventory["qubes"]["app"]["template"] == "fed"
    assert inventory["qubes"]["app"]["volumes"]["private"]["size"] == 2 << 20
    assert set(inventory["qubes"]["fed"]["volumes"]) == {"root", "private"}
    bad = subprocess.run([sys.executable, "-m", "qbackup_sim", "create", str(tmp_path / "t"),
                          "--qube", "x:Bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "CLASS one of" in bad.stderr


# -- hostile daemon (in process) --------------------------------------------------

class HostileDaemon:
    """A socket service that answers `hello` correctly, then `reply` to the next request."""

    def __init__(self, path: Path, reply: bytes):
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.reply = reply
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        with self.server:
            conn, _ = self.server.accept()
        with conn:
            f = conn.makefile("rb")
            header = b""
            while not header.endswith(b"\0"):
                header += f.read(1)
            self.read_frame(f)
            conn.sendall(frame({"op": "hello", "rid": 0, "version": 1, "server": "evil",
                                "max_frame": 8 << 20, "max_batch": 4096, "repo": "default"}))
            self.read_frame(f)
            conn.sendall(self.reply)
            conn.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):  # reset by a client that gave up
                f.read()

    @staticmethod
    def read_frame(f) -> dict:
        (length,) = struct.unpack(">I", f.read(4))
        return msgpack.unpackb(f.read(length))


def frame(msg: dict) -> bytes:
    data = msgpack.packb(msg, use_bin_type=True)
    return struct.pack(">I", len(data)) + data


class HostileBackend:
    backup_vm = "backup"

    def __init__(self, path: Path):
        self.path = path

    def list_qubes(self):
        return []

    def connect(self, backup_vm: str, repo: str):
        return transport.unix_socket(str(self.path), repo)


@pytest.mark.parametrize("reply, expected", [
    (frame({"op": "error", "rid": 1, "code": "io\x1b[2J",
            "message": "disk \x1b]0;pwned\x07full\nsecond line" + "x" * 5000}),
     "backup qube error io?[2J: disk ?]0;pwned?full?second line"),
    (frame({"op": "opened", "rid": 1, "config": b"\0" * 100, "pack_size": 8 << 20,
            "format": 1}), "key file"),
    (frame({"op": "opened", "rid": 7, "config": b"", "pack_size": 8 << 20, "format": 1}),
     "rid 7"),
    (struct.pack(">I", 0xFFFFFFFF) + b"junk", "frame length 4294967295"),
    (frame({"op": "stats", "rid": 1, "packs": -1}), "expected 'opened', got 'stats'"),
    (b"\x00\x00", "connection closed"),
])
def test_hostile_daemon_answers_give_one_clean_line(tmp_path, monkeypatch, capsys,
                                                    reply, expected):
    sock = tmp_path / "evil.sock"
    hostile = HostileDaemon(sock, reply)
    passphrase = tmp_path / "pw"
    passphrase.write_text("x\n")
    code, _, err = run_here(["--state-dir", str(tmp_path / "state"), "list",
                             "--passphrase-file", str(passphrase)], capsys,
                            backend=lambda: HostileBackend(sock), config={"backup_vm": "b"})
    assert code in (1, 3)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qbackup: error: "), err
    assert expected in lines[0]
    assert all(c.isprintable() for c in lines[0]) and len(lines[0]) < 1000
    hostile.thread.join(DEADLINE)


def test_progress_is_drawn_on_a_terminal(sim):
    """With stderr on a pseudo-terminal the backup shows progress; the
    summary on stdout is unchanged."""
    sim.init()
    primary, secondary = os.openpty()
    drawn = bytearray()

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: every writer closed the terminal
                return
            if not chunk:
                return
            drawn.extend(chunk)

    reader = threading.Thread(target=read_terminal)
    reader.start()
    proc = subprocess.Popen(sim.argv("backup", "work"), stdout=subprocess.PIPE,
                            stderr=secondary, stdin=subprocess.DEVNULL, text=True)
    os.close(secondary)
    out = proc.communicate(timeout=DEADLINE)[0]
    reader.join(DEADLINE)
    os.close(primary)
    assert proc.returncode == 0 and "snapshot " in out
    assert b"backup work:private: " in drawn and b"MiB/s" in drawn
    assert drawn.endswith(b"\r\n")  # the line was ended (the terminal adds \r)
    assert b"backup" not in out.encode()[:6]  # nothing of it on stdout


# -- configuration ----------------------------------------------------------------

@pytest.mark.parametrize("text, size", [("4096", 4096), ("256K", 256 << 10), ("64m", 64 << 20),
                                        ("1G", 1 << 30), (" 8M ", 8 << 20)])
def test_parse_size(text, size):
    assert common.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "1.5M", "-1", "1T", "M", "12 K", "0x10"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="invalid size"):
        common.parse_size(text)


def test_config_file_gives_defaults(tmp_path, monkeypatch):
    conf = tmp_path / "qbackup.conf"
    conf.write_text("# qbackup settings\n\nbackup_vm = vault-backup\nrepo=laptop\n"
                    f"state_dir = {tmp_path}/state\n")
    monkeypatch.setattr(common, "CONFIG_FILE", str(conf))

    def context(*argv):
        return common.make_context(cli.build_parser().parse_args(argv),
                                   lambda: HostileBackend(tmp_path / "x"))
    ctx = context("list")
    assert (ctx.backup_vm, ctx.repo, ctx.state_dir) == ("vault-backup", "laptop",
                                                        f"{tmp_path}/state")
    ctx = context("--repo", "other", "list", "--backup-vm", "b2")
    assert (ctx.backup_vm, ctx.repo) == ("b2", "other")  # options win, in either place
    conf.write_text("backup_vm = b\nrepository = typo\n")
    with pytest.raises(QbackupError, match=r"qbackup.conf:2: expected one of"):
        context("list")
    conf.unlink()
    with pytest.raises(UsageError, match="no backup qube: give --backup-vm"):
        context("list")
