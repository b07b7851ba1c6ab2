# SPDX-License-Identifier: GPL-2.0-or-later
"""Real ext4 volume images holding real files, made and changed without root.

`make_ext4_image` builds a file system with `mkfs.ext4 -d` (e2fsprogs);
`write_files` replaces files inside an existing image with `debugfs -w`,
touching only the blocks a guest writing those files would touch;
`read_file` reads one back with `debugfs`. Paths inside the image are
restricted to plain names (letters, digits, `._-`; not `.` or `..`)
separated by `/`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from qbackup_sim.inventory import SimError

_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise SimError(f"{name} not found: install e2fsprogs")
    return found


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True)
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip().splitlines()
        raise SimError(f"{Path(argv[0]).name} failed: {message[-1] if message else proc.returncode}")
    return proc


def _checked(path: str) -> str:
    if not all(_NAME.fullmatch(name) and name not in (".", "..") for name in path.split("/")):
        raise SimError(f"unsupported path inside image: {path!r}")
    return path


def make_ext4_image(image: str | os.PathLike, size: int, files: dict[str, bytes]) -> None:
    """(Re)create `image` as an ext4 file system of `size` bytes holding `files`."""
    with tempfile.TemporaryDirectory() as src:
        for name, data in files.items():
            target = Path(src, _checked(name))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        with open(image, "wb") as f:
            f.truncate(size)
        _run([_tool("mkfs.ext4"), "-q", "-F", "-b", "4096", "-m", "0",
              "-E", "root_owner=0:0", "-d", src, os.fspath(image)])


def write_files(image: str | os.PathLike, files: dict[str, bytes]) -> None:
    """Create or replace `files` inside the ext4 `image`, then read each back."""
    with tempfile.TemporaryDirectory() as tmp:
        commands = []
        for i, (name, data) in enumerate(files.items()):
            parts = _checked(name).split("/")
            commands += [f"mkdir {'/'.join(parts[:n])}" for n in range(1, len(parts))]
            host = Path(tmp, str(i))
            host.write_bytes(data)
            commands += [f"rm {name}", f"write {host} {name}"]
        script = Path(tmp, "commands")
        script.write_text("\n".join(commands) + "\n")
        # debugfs reports "exists"/"not found" for mkdir/rm of the commands
        # above on stderr and always exits 0: the read-back is the check.
        _run([_tool("debugfs"), "-w", "-f", str(script), os.fspath(image)])
    for name, data in files.items():
        if read_file(image, name) != data:
            raise SimError(f"writing {name} into {image} failed")


def read_file(image: str | os.PathLike, name: str) -> bytes:
    """The content of file `name` inside the ext4 `image`."""
    proc = _run([_tool("debugfs"), "-R", f"cat {_checked(name)}", os.fspath(image)])
    errors = [line for line in proc.stderr.decode(errors="replace").splitlines()
              if line.strip() and not line.startswith("debugfs ")]
    if errors:
        raise SimError(f"cannot read {name} in {image}: {errors[-1].strip()}")
    return proc.stdout
