# SPDX-License-Identifier: GPL-2.0-or-later
"""Benchmark workloads shared by the bench scripts.

A "volume" here is a real ext4 image filled with real files (shared libraries,
Python, data files from this machine's /usr), made without mounting with
`mkfs.ext4 -d`, so it compresses and dedups like a qube's volume does.
A "day of use" rewrites scattered 4 KiB blocks, as DESIGN §6 describes.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

SOURCES = ("/usr/lib", "/usr/share", "/usr/local", "/usr/bin")
PASSWORD = "bench-passphrase"
DEVNULL = subprocess.DEVNULL


def _collect(target_bytes: int, staging: Path) -> int:
    """Hard-link regular files from SOURCES into staging until target_bytes."""
    total = 0
    for top in SOURCES:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                src = os.path.join(dirpath, name)
                try:
                    st = os.lstat(src)
                except OSError:
                    continue
                if not os.path.isfile(src) or os.path.islink(src) or st.st_size == 0:
                    continue
                dst = staging / os.path.relpath(src, "/")
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
                total += st.st_size
                if total >= target_bytes:
                    return total
    return total


def make_image(path: Path, size: int, fill: float = 0.65) -> int:
    """An ext4 image of `size` bytes, `fill` of it real files. Returns file bytes."""
    staging = path.parent / (path.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        data = _collect(int(size * fill), staging)
        if path.exists():
            path.unlink()
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(staging), "-b", "4096",
                        str(path), str(size // 1024) + "k"], check=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return data


def day_of_use(path: Path, fraction: float, seed: int = 1) -> int:
    """Rewrite `fraction` of the image's 4 KiB blocks (scattered, random data,
    the first MiB spared so the superblock stays). Returns bytes written."""
    rng = random.Random(seed)
    size = path.stat().st_size
    blocks = size // 4096
    n = int(blocks * fraction)
    chosen = rng.sample(range(256, blocks), n)
    with open(path, "r+b") as f:
        for b in sorted(chosen):
            f.seek(b * 4096)
            f.write(rng.randbytes(4096))
        f.flush()
        os.fsync(f.fileno())
    return n * 4096


def drop_caches() -> bool:
    """Write back and drop the page cache; False if this machine does not let us."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(argv: list[str], **kw) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, **kw)
    return time.perf_counter() - t


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's children that ended."""
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) a running process has used so far."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def du(path: Path) -> int:
    """Bytes allocated under path."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, "
            f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")


def _real_files(total: int, rng: random.Random) -> list[Path]:
    """Regular files of this machine (real content) adding up to about `total` bytes."""
    pool = []
    for top in SOURCES:
        for dirpath, _, filenames in os.walk(top):
            for name in filenames:
                path = Path(dirpath, name)
                try:
                    st = path.lstat()
                except OSError:
                    continue
                if path.is_file() and not path.is_symlink() and 0 < st.st_size < (8 << 20):
                    pool.append(path)
            if len(pool) > 20000:
                break
    rng.shuffle(pool)
    chosen, size = [], 0
    for path in pool:
        if size >= total:
            break
        chosen.append(path)
        size += path.stat().st_size
    return chosen


def realistic_day(image: Path, seed: int, rewrite: float = 0.015, new_bytes: int = 48 << 20) -> dict:
    """A day of use of the ext4 file system in `image`, through the kernel
    (loop mount, as root): pages rewritten in place inside existing files
    (`rewrite` of all 4 KiB blocks, in runs of 1-16 pages at random places
    of random files: databases, edited documents), logs appended to, whole
    files replaced (saved by an editor: new blocks), new files of real
    content (`new_bytes`: downloads, caches), a few files deleted. Returns
    what was done."""
    rng = random.Random(seed)
    mnt = image.parent / (image.name + ".mnt")
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    done = {"pages_rewritten": 0, "appended": 0, "replaced": 0, "new": 0, "deleted": 0}
    try:
        files = [p for p in mnt.rglob("*") if p.is_file() and not p.is_symlink()]
        budget = int(os.statvfs(mnt).f_blocks * rewrite)
        big = [p for p in files if p.stat().st_size >= 64 << 10]
        while done["pages_rewritten"] < budget and big:
            path = rng.choice(big)
            pages = path.stat().st_size // 4096
            run = min(rng.randint(1, 16), pages)
            start = rng.randrange(0, pages - run + 1)
            with open(path, "r+b") as f:
                f.seek(start * 4096)
                f.write(rng.randbytes(run * 4096))
            done["pages_rewritten"] += run
        for path in rng.sample(files, 30):  # logs
            with open(path, "ab") as f:
                f.write(rng.randbytes(rng.randint(8, 64) << 10))
            done["appended"] += 1
        for path in rng.sample(files, 40):  # saved by an editor: written anew, renamed over
            data = path.read_bytes()
            tmp = path.with_name(path.name + ".new")
            tmp.write_bytes(data[:len(data) // 2] + rng.randbytes(min(4096, len(data))) +
                            data[len(data) // 2:])
            os.replace(tmp, path)
            done["replaced"] += 1
        target = mnt / "home" / f"day-{seed}"
        target.mkdir(parents=True, exist_ok=True)
        for i, src in enumerate(_real_files(new_bytes, rng)):
            shutil.copyfile(src, target / f"{i}-{src.name}")
            done["new"] += 1
        for path in rng.sample([p for p in files if p.exists()], 20):
            path.unlink()
            done["deleted"] += 1
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        mnt.rmdir()
    return done


def touched(before: Path, after: Path, chunk_size: int) -> tuple[int, int]:
    """(4 KiB blocks, chunks of chunk_size) whose content differs between two images."""
    blocks = chunks = 0
    with open(before, "rb") as a, open(after, "rb") as b:
        while True:
            x, y = a.read(chunk_size), b.read(chunk_size)
            if not x and not y:
                return blocks, chunks
            if x != y:
                chunks += 1
                blocks += sum(1 for i in range(0, max(len(x), len(y)), 4096)
                              if x[i:i + 4096] != y[i:i + 4096])


# -- the tools, backing up an image file ------------------------------------------

class QbackupCli:
    """qbackup's command line against a sim in `sim` (the real daemon)."""
    name = "qbackup"

    def __init__(self, sim: Path, work: Path, chunk_size: str = "256K") -> None:
        self.sim = sim
        self.pw = work / "qbackup.pw"
        self.pw.write_text(PASSWORD)
        self.chunk_size = chunk_size
        self.last: dict = {}

    def cli(self, *args: str, json_out: bool = False) -> float:
        argv = [sys.executable, "-m", "qbackup_sim", "run", str(self.sim),
                "--passphrase-file", str(self.pw), *args]
        t = time.perf_counter()
        out = subprocess.run(argv, check=True, stdout=subprocess.PIPE).stdout
        elapsed = time.perf_counter() - t
        if json_out:
            self.last = json.loads(out)
        return elapsed

    def init(self) -> None:
        self.cli("init", "--chunk-size", self.chunk_size, "--scrypt-n", "16384")

    def backup(self, tag: str) -> float:
        return self.cli("backup", "--all", "--json", json_out=True)

    def repo_bytes(self) -> int:
        return du(self.sim / "storage")

    def close(self) -> None:
        from qbackup_sim.daemon import stop_daemon
        stop_daemon(self.sim)


class Restic:
    name = "restic"

    def __init__(self, work: Path, image: Path) -> None:
        self.repo, self.image = work / "restic", image
        self.env = dict(os.environ, RESTIC_PASSWORD=PASSWORD, RESTIC_REPOSITORY=str(self.repo))

    def init(self) -> None:
        subprocess.run(["restic", "init", "--repository-version", "2"], env=self.env,
                       check=True, stdout=DEVNULL)

    def backup(self, tag: str) -> float:
        return timed(["restic", "backup", "--quiet", "--tag", tag, str(self.image)],
                     env=self.env, stdout=DEVNULL)

    def repo_bytes(self) -> int:
        return du(self.repo)


class Borg:
    name = "borg"

    def __init__(self, work: Path, image: Path) -> None:
        self.repo, self.image = work / "borg", image
        self.env = dict(os.environ, BORG_PASSPHRASE=PASSWORD,
                        BORG_BASE_DIR=str(work / "borg-base"))

    def init(self) -> None:
        subprocess.run(["borg", "init", "-e", "repokey-blake2", str(self.repo)],
                       env=self.env, check=True, stdout=DEVNULL, stderr=DEVNULL)

    def backup(self, tag: str) -> float:
        return timed(["borg", "create", "--compression", "zstd,3",
                      f"{self.repo}::{tag}", str(self.image)], env=self.env, stdout=DEVNULL)

    def repo_bytes(self) -> int:
        return du(self.repo)
