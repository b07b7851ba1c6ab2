# SPDX-License-Identifier: GPL-2.0-or-later
"""Benchmark workloads shared by the bench scripts.

A "volume" here is a real ext4 image filled with real files (shared libraries,
Python, data files from this machine's /usr), made without mounting with
`mkfs.ext4 -d`, so it compresses and dedups like a qube's volume does.
A "day of use" rewrites scattered 4 KiB blocks, as DESIGN §6 describes.
"""

from __future__ import annotations

import os
import platform
import random
import shutil
import subprocess
import time
from pathlib import Path

SOURCES = ("/usr/lib", "/usr/share", "/usr/local", "/usr/bin")


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


def timed(argv: list[str], **kw) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, **kw)
    return time.perf_counter() - t


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
