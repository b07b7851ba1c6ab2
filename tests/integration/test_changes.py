# SPDX-License-Identifier: GPL-2.0-or-later
"""Point-in-time copies and change tracking through the whole command line,
on file-reflink pools on real btrfs and xfs file systems (loop devices): the
sim's `--pool-dir`, Qubes' layout, the real daemon.

What an incremental reads (asserted in bytes), byte-identical restores, bases
that are foreign, damaged or replaced never trusted, a qube shutting down
while its volume is read, --live, cleanup, and SIGKILL at random points."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qbackup.volume import VolumeFile
from qbackup_sim import create_sim, load_inventory, run_qbackup, save_inventory, stop_daemon

pytestmark = pytest.mark.root

MiB = 1 << 20
CS = 256 << 10
PASSPHRASE = "change tracking\n"


class PoolSim:
    """A sim whose qubes live in a file-reflink pool at `pool`."""

    def __init__(self, dir: Path, pool: Path):
        self.dir, self.pool = dir, pool
        self.pw = dir / "pw"
        self.pw.write_text(PASSPHRASE)

    def image(self, qube: str, volume: str = "private") -> Path:
        sub = "vm-templates" if qube == "tpl" else "appvms"
        return self.pool / sub / qube / f"{volume}.img"

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "qbackup_sim", "run", str(self.dir), *args,
                "--passphrase-file", str(self.pw)]

    def run(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == expect, (args, proc.stdout, proc.stderr)
        return proc

    def json(self, *args: str) -> dict:
        return json.loads(self.run(*args, "--json").stdout)

    def backup(self, *args: str) -> dict:
        """backup --json, with its reads by QUBE:VOLUME."""
        result = self.json("backup", *args)
        result["by"] = {f"{r['qube']}:{r['volume']}": r for r in result["reads"]}
        return result

    def copies(self) -> list[Path]:
        return sorted(self.pool.glob("*/*/*.qbackup-*.img"))


def fill(path: Path, seed: int) -> None:
    """Random data over the whole image (no holes: bytes read are exact)."""
    rng = random.Random(seed)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for offset in range(0, size, MiB):
            f.write(rng.randbytes(min(MiB, size - offset)))


def write_blocks(path: Path, offsets: list[int]) -> None:
    with open(path, "r+b") as f:
        for offset in offsets:
            f.seek(offset)
            f.write(os.urandom(4096))


def _pool_sim(tmp_path_factory, fs_dir: Path):
    root = create_sim(tmp_path_factory.mktemp("sim"), {
        "tpl": {"class": "TemplateVM", "label": "black",
                "volumes": {"root": 8 * MiB, "private": 2 * MiB}},
        "work": {"class": "AppVM", "label": "red", "template": "tpl",
                 "volumes": {"private": 12 * MiB, "volatile": MiB}}}, pool_dir=fs_dir / "pool")
    sim = PoolSim(root, fs_dir / "pool")
    fill(sim.image("tpl", "root"), 1)
    fill(sim.image("work"), 2)
    sim.run("init", "--scrypt-n", "16384", "--pack-size", "8M")
    yield sim
    stop_daemon(root)


@pytest.fixture
def psim(tmp_path_factory, reflink_fs) -> PoolSim:
    """A sim whose pool is on btrfs, then on xfs."""
    yield from _pool_sim(tmp_path_factory, reflink_fs)


@pytest.fixture
def bsim(tmp_path_factory, btrfs_dir) -> PoolSim:
    """A sim whose pool is on btrfs."""
    yield from _pool_sim(tmp_path_factory, btrfs_dir)


def restore_matches(sim: PoolSim, snapshot: str, expected: dict[str, bytes]) -> None:
    out = sim.dir / f"restored-{time.monotonic_ns()}"
    sim.run("restore", snapshot, "--to", str(out))
    for name, data in expected.items():
        assert (out / f"{name}.img").read_bytes() == data, name
    shutil.rmtree(out)


def test_incremental_reads_only_the_chunks_written(psim):
    work, root = psim.image("work"), psim.image("tpl", "root")
    original = {"work/private": work.read_bytes(), "tpl/root": root.read_bytes()}
    full = psim.backup("work", "tpl")
    assert full["by"]["work:private"]["read"] == "full"
    assert full["by"]["work:private"]["reason"] == "no base copy yet for this repository"
    assert full["bytes_read"] == sum(len(d) for d in original.values())
    assert full["by"]["tpl:root"]["state"] == "shutdown"
    assert len(psim.copies()) == 3  # work:private, tpl:private, tpl:root: the bases

    again = psim.backup("work", "tpl")  # nothing changed: nothing read
    assert again["bytes_read"] == 0 and again["chunks_new"] == 0
    assert {r["read"] for r in again["reads"]} == {"changed"}
    assert again["chunks_unchanged"] == again["chunks_total"]

    offsets = random.Random(3).sample(range(0, 12 * MiB, 4096), 20)
    write_blocks(work, offsets)
    write_blocks(root, [5 * MiB + 8192])
    incr = psim.backup("work", "tpl")
    touched = len({o // CS for o in offsets})
    assert incr["by"]["work:private"] | {"taken": 0} == {
        "qube": "work", "volume": "private", "read": "changed", "reason": None,
        "bytes_read": touched * CS, "chunks_unchanged": 48 - touched, "state": "shutdown",
        "taken": 0}
    assert incr["by"]["tpl:root"]["bytes_read"] == CS
    assert incr["bytes_read"] == (touched + 1) * CS
    assert incr["chunks_new"] == touched + 1
    assert len(psim.copies()) == 3 and incr["copies_removed"] == 3

    restore_matches(psim, "latest", {"work/private": work.read_bytes(),
                                     "tpl/root": root.read_bytes()})
    restore_matches(psim, full["snapshot"], original)
    assert psim.json("verify", "--all")["ok"]
    cleanup = psim.json("cleanup", "--dry-run")
    assert cleanup["would_remove"] == [] and len(cleanup["kept"]) == 3


def test_volume_size_changes(bsim):
    work = bsim.image("work")
    bsim.backup("work")
    with open(work, "r+b") as f:  # grown by 2 MiB, new data in the last one
        f.truncate(14 * MiB)
        f.seek(13 * MiB)
        f.write(os.urandom(MiB))
    grown = bsim.backup("work")["by"]["work:private"]
    assert grown["read"] == "changed"
    assert grown["bytes_read"] == MiB  # the new data (the rest of the new end is a hole)
    restore_matches(bsim, "latest", {"work/private": work.read_bytes()})
    os.truncate(work, 5 * MiB + 1000)  # shrunk to a short last chunk
    shrunk = bsim.backup("work")["by"]["work:private"]
    assert shrunk["bytes_read"] == 1000  # only the now shorter last chunk
    restore_matches(bsim, "latest", {"work/private": work.read_bytes()})


def test_bases_of_another_repository_or_damaged_ones_are_never_trusted(bsim):
    work = bsim.image("work")
    bsim.run("--repo", "other", "init", "--scrypt-n", "16384", "--pack-size", "8M")
    bsim.backup("work")
    [ours] = bsim.copies()
    tag = ours.name.split("-")[1]

    def our_copies() -> list[Path]:
        return [p for p in bsim.copies() if f"-{tag}-" in p.name]
    other = bsim.backup("--repo", "other", "work")["by"]["work:private"]
    assert other["read"] == "full"  # the other repository has no base: ours is not its
    assert len(bsim.copies()) == 2

    # dom0's record of "other" made to claim our copy as its base: refused,
    # and never removed by "other" (its name carries our repository's tag)
    state = bsim.dir / "dom0-state"
    records = {p: json.loads(p.read_text()) for p in state.glob("*.copies.json")}
    mine = next(d for d in records.values() if d["copies"][0]["where"] == str(ours))
    theirs_path = next(p for p, d in records.items() if d is not mine)
    theirs = records[theirs_path]
    theirs["copies"][0].update(where=str(ours), id=mine["copies"][0]["id"],
                               fingerprint=mine["copies"][0]["fingerprint"])
    theirs_path.write_text(json.dumps(theirs))
    write_blocks(work, [0])
    forged = bsim.backup("--repo", "other", "work")["by"]["work:private"]
    assert forged["read"] == "full" and forged["bytes_read"] == 12 * MiB
    assert ours.exists()

    # our base replaced by a reflink copy of today's image: it shares every
    # extent with the new copy, so trusting it would read nothing
    base_copy = str(ours)
    os.unlink(ours)
    src, dst = os.open(work, os.O_RDONLY), os.open(base_copy, os.O_WRONLY | os.O_CREAT, 0o400)
    from qbackup import fiemap
    fiemap.clone(src, dst)
    os.close(src)
    os.close(dst)
    replaced = bsim.backup("work")["by"]["work:private"]
    assert replaced["read"] == "fallback"
    assert "was changed or replaced since it was made" in replaced["reason"]
    assert replaced["bytes_read"] == 12 * MiB
    assert not Path(base_copy).exists()  # removed once the backup committed

    # our base written to in place (chmod, write, chmod back)
    [base] = our_copies()
    os.chmod(base, 0o600)
    write_blocks(base, [MiB])
    os.chmod(base, 0o400)
    damaged = bsim.backup("work")["by"]["work:private"]
    assert damaged["read"] == "fallback" and "changed or replaced" in damaged["reason"]
    # gone altogether
    [base] = our_copies()
    base.unlink()
    gone = bsim.backup("work")["by"]["work:private"]
    assert gone["read"] == "fallback" and "base copy not usable" in gone["reason"]
    restore_matches(bsim, "latest", {"work/private": work.read_bytes()})
    assert bsim.json("verify", "--all")["ok"]


def _commit_during_read(monkeypatch, image: Path, new_content: bytes) -> list[str]:
    """Make the next read of a chunk first do what Qubes does when the qube
    shuts down: the changes become the committed image (rename of
    -dirty.img onto it), then the old image is discarded (zeros)."""
    read = VolumeFile._read
    done: list[str] = []

    def read_then_commit(self, *args):
        if not done:
            done.append(self.path)
            old = os.open(image, os.O_RDWR)
            dirty = image.with_name(image.name.removesuffix(".img") + "-dirty.img")
            dirty.write_bytes(new_content)
            os.rename(dirty, image)
            size = os.fstat(old).st_size
            os.pwrite(old, bytes(size), 0)  # as blkdiscard would leave it
            os.fsync(old)
            os.close(old)
        return read(self, *args)
    monkeypatch.setattr(VolumeFile, "_read", read_then_commit)
    return done


def test_a_shutdown_during_the_read_never_stores_zeros(psim, monkeypatch, capsys):
    work = psim.image("work")
    before = work.read_bytes()
    done = _commit_during_read(monkeypatch, work, os.urandom(len(before)))
    assert run_qbackup(psim.dir, ["backup", "work", "--passphrase-file", str(psim.pw)]) == 0
    assert done and ".qbackup-" in done[0]  # it read its own copy
    monkeypatch.undo()
    assert work.read_bytes() != before  # the shutdown happened
    restore_matches(psim, "latest", {"work/private": before})


def test_without_a_copy_a_shutdown_during_the_read_fails_the_backup(tmp_path_factory,
                                                                     monkeypatch, capsys):
    """A plain image (no pool: read in place, held open) that changes under
    the reader: the backup fails, nothing is committed."""
    root = create_sim(tmp_path_factory.mktemp("plain"), {
        "work": {"class": "AppVM", "volumes": {"private": 4 * MiB}}})
    try:
        image = root / "volumes/work/private.img"
        fill(image, 4)
        (root / "pw").write_text(PASSPHRASE)
        pw = ["--passphrase-file", str(root / "pw")]
        assert run_qbackup(root, ["init", "--scrypt-n", "16384", *pw]) == 0
        _commit_during_read(monkeypatch, image, os.urandom(4 * MiB))
        capsys.readouterr()
        assert run_qbackup(root, ["backup", "work", *pw]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "changed while it was read" in err[0], err
        monkeypatch.undo()
        assert run_qbackup(root, ["list", "--json", *pw]) == 0
        assert json.loads(capsys.readouterr().out)["snapshots"] == []
    finally:
        stop_daemon(root)


def test_live_backups_read_the_running_qubes_changes(bsim):
    work = bsim.image("work")
    shutdown_state = work.read_bytes()
    bsim.backup("work")
    inventory = load_inventory(bsim.dir)
    inventory["qubes"]["work"]["running"] = True
    save_inventory(bsim.dir, inventory)
    dirty = work.with_name("private-dirty.img")  # as qubesd starts the qube: a reflink copy
    subprocess.run(["cp", "--reflink=always", str(work), str(dirty)], check=True)
    write_blocks(dirty, [0, 3 * MiB])
    default = bsim.backup("work")["by"]["work:private"]
    assert default["state"] == "shutdown" and default["bytes_read"] == 0
    live = bsim.backup("work", "--live")["by"]["work:private"]
    assert live["state"] == "live" and live["read"] == "changed"
    assert live["bytes_read"] == 2 * CS
    restore_matches(bsim, "latest", {"work/private": dirty.read_bytes()})
    history = bsim.json("list")["snapshots"]
    restore_matches(bsim, history[1]["id"], {"work/private": shutdown_state})
    # a job with live = true: check says so, and its runs copy the live state
    jobs_file = bsim.dir / "jobs.toml"
    jobs_file.write_text('[jobs.now]\nbackup_vm = "backup"\nrepo = "default"\n'
                         'include = ["work"]\nlive = true\n')
    check = subprocess.run(bsim.argv("--jobs-file", str(jobs_file), "check", "now")[:-2],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 6, check.stderr
    assert "work is running: private backed up live: a crash-consistent copy" in check.stdout
    run = json.loads(bsim.run("--jobs-file", str(jobs_file), "backup", "--job", "now",
                              "--json").stdout)
    assert [(r["state"], r["bytes_read"]) for r in run["reads"]] == [("live", 0)]


def test_a_qube_restored_into_the_pool_is_tracked_like_the_others(bsim):
    """restore --qubes of a format 3 snapshot creates the qube in the
    file-reflink pool, as qubesd would; its volume is then copied and
    compared like any other."""
    bsim.backup("work")
    bsim.run("restore", "latest", "--qubes", "work", "--rename", "work:work2")
    image = bsim.image("work2")
    assert image.read_bytes() == bsim.image("work").read_bytes()
    assert bsim.backup("work2")["by"]["work2:private"]["read"] == "full"
    write_blocks(image, [5 * MiB])
    again = bsim.backup("work2")["by"]["work2:private"]
    assert (again["read"], again["bytes_read"]) == ("changed", CS)


def test_a_pool_without_reflinks_is_read_in_place(tmp_path_factory, no_reflink_dir):
    root = create_sim(tmp_path_factory.mktemp("noreflink"), {
        "work": {"class": "AppVM", "volumes": {"private": 2 * MiB}}},
        pool_dir=no_reflink_dir / "pool")
    try:
        sim = PoolSim(root, no_reflink_dir / "pool")
        fill(sim.image("work"), 6)
        sim.run("init", "--scrypt-n", "16384", "--pack-size", "8M")
        for _ in range(2):
            read = sim.backup("work")["by"]["work:private"]
            assert read["read"] == "fallback" and "cannot make reflink copies" in read["reason"]
        assert sim.copies() == []
        restore_matches(sim, "latest", {"work/private": sim.image("work").read_bytes()})
    finally:
        stop_daemon(root)


def test_cleanup_lists_and_removes_leftovers(bsim):
    bsim.backup("work")
    [base] = bsim.copies()
    tag = base.name.split("-")[1]
    orphan = base.with_name(f"private.qbackup-{tag}-0123456789ab.img")  # killed mid-copy
    orphan.write_bytes(b"x")
    foreign = base.with_name("private.qbackup-00000000000000ff-0123456789ab.img")
    foreign.write_bytes(b"y")
    dry = bsim.json("cleanup", "--dry-run")
    assert [d["where"] for d in dry["would_remove"]] == [str(orphan)]
    assert "no record of it" in dry["would_remove"][0]["reason"]
    assert [k["where"] for k in dry["kept"]] == [str(base)]
    assert dry["other_repositories"] == [str(foreign)]
    assert orphan.exists()
    text = bsim.run("cleanup").stdout
    assert f"removed reflink copy {orphan}" in text and not orphan.exists()
    assert foreign.exists() and base.exists()
    bsim.run("cleanup", "--all")
    assert bsim.copies() == [foreign]
    assert bsim.backup("work")["by"]["work:private"]["read"] == "full"


# -- SIGKILL at random points, then a re-run ----------------------------------------

KILLS = 30


def test_sigkill_at_random_points_then_rerun(btrfs_dir, tmp_path_factory):
    """A backup killed at any instant leaves the previous base usable and
    resumes from its copies (one point in time); after the next successful
    runs every snapshot verifies, each restores byte for byte as the images
    were at one instant, and the only copies left are the bases."""
    root = create_sim(tmp_path_factory.mktemp("kill"), {
        "a": {"class": "AppVM", "volumes": {"private": 6 * MiB}},
        "b": {"class": "AppVM", "volumes": {"private": 6 * MiB}}}, pool_dir=btrfs_dir / "pool")
    sim = PoolSim(root, btrfs_dir / "pool")
    rng = random.Random(30)

    def images() -> tuple[bytes, bytes]:
        return sim.image("a").read_bytes(), sim.image("b").read_bytes()

    try:
        for qube in ("a", "b"):
            fill(sim.image(qube), rng.randrange(1000))
        sim.run("init", "--scrypt-n", "16384", "--pack-size", "8M")
        sim.run("backup", "a", "b")
        write_blocks(sim.image("a"), [0])
        started = time.monotonic()
        sim.run("backup", "a", "b")
        span = time.monotonic() - started  # how long an incremental run takes here
        states = [images()]  # the images whenever a run started
        killed_in_run = 0
        for _ in range(KILLS):
            write_blocks(sim.image(rng.choice("ab")), rng.sample(range(0, 6 * MiB, 4096), 4))
            states.append(images())
            proc = subprocess.Popen(sim.argv("backup", "a", "b"), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            time.sleep(rng.uniform(0, span))
            if proc.poll() is None:
                killed_in_run += 1
            else:  # the run ended first (the machine got less busy than when span was timed)
                span *= 0.7
            proc.send_signal(signal.SIGKILL)
            proc.wait()  # the next run waits for the daemon to drop the dead writer's lock
        assert killed_in_run >= KILLS // 3  # kills landed inside runs
        resumed = sim.backup("a", "b")
        assert {r["read"] for r in resumed["reads"]} <= {"changed", "full"}
        out = sim.dir / "resumed"
        sim.run("restore", "latest", "--to", str(out))
        restored = ((out / "a/private.img").read_bytes(), (out / "b/private.img").read_bytes())
        assert restored in states  # both volumes as they were at one instant
        now = sim.backup("a", "b")  # no run left to resume: copies of the present
        assert {r["read"] for r in now["reads"]} == {"changed"}
        restore_matches(sim, "latest", {f"{q}/private": sim.image(q).read_bytes()
                                        for q in "ab"})
        assert sim.json("verify", "--all")["ok"]
        assert len(sim.copies()) == 2  # the two bases, nothing orphaned
        record = json.loads(next((root / "dom0-state").glob("*.copies.json")).read_text())
        assert sorted(c["where"] for c in record["copies"]) == [str(p) for p in sim.copies()]
        assert record["run"] is None
        assert sim.json("cleanup", "--dry-run")["would_remove"] == []
    finally:
        stop_daemon(root)
