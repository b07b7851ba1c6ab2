# SPDX-License-Identifier: GPL-2.0-or-later
"""Reflink copies and FIEMAP change tracking on real btrfs and xfs file
systems (loop devices): what changed between two copies of an image is
found exactly, and every extent whose address does not name its bytes
(inline, compressed, unknown flags) counts as changed."""

from __future__ import annotations

import os
import subprocess

import pytest

from qbackup import fiemap
from qbackup.fiemap import Extent, NoReflink, Untrackable

pytestmark = pytest.mark.root

KiB, MiB = 1 << 10, 1 << 20


def image(path, size: int, seed: int = 1) -> None:
    """An image full of data (no holes)."""
    rng = __import__("random").Random(seed)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(rng.randbytes(MiB))
        f.flush()
        os.fsync(f.fileno())


def copy(src, dst) -> None:
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o400)
    try:
        fiemap.clone(s, d)
    finally:
        os.close(s)
        os.close(d)


def changes(base, new) -> list[tuple[int, int]]:
    b, n = os.open(base, os.O_RDONLY), os.open(new, os.O_RDONLY)
    try:
        return fiemap.changed_ranges(b, os.fstat(b).st_size, n, os.fstat(n).st_size)
    finally:
        os.close(b)
        os.close(n)


def test_scattered_writes_are_found_exactly(reflink_fs):
    img = reflink_fs / "private.img"
    image(img, 16 * MiB)
    copy(img, reflink_fs / "base")
    offsets = [0, 4 * KiB, 3 * MiB + 8 * KiB, 7 * MiB, 15 * MiB + 1020 * KiB]
    with open(img, "r+b") as f:
        for offset in offsets:
            f.seek(offset)
            f.write(os.urandom(4 * KiB))  # no fsync: FIEMAP_FLAG_SYNC writes it out
    copy(img, reflink_fs / "new")
    assert changes(reflink_fs / "base", reflink_fs / "new") == [
        (0, 8 * KiB), (3 * MiB + 8 * KiB, 3 * MiB + 12 * KiB), (7 * MiB, 7 * MiB + 4 * KiB),
        (15 * MiB + 1020 * KiB, 16 * MiB)]
    assert changes(reflink_fs / "new", reflink_fs / "new") == []


def test_holes_unwritten_extents_and_sizes(reflink_fs):
    img = reflink_fs / "private.img"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
        f.write(os.urandom(MiB))
    copy(img, reflink_fs / "base")
    fd = os.open(img, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 4 * MiB, MiB)  # unwritten: still reads zeros
        os.ftruncate(fd, 10 * MiB)  # grown
        os.pwrite(fd, b"x" * 4096, 9 * MiB)
    finally:
        os.close(fd)
    copy(img, reflink_fs / "new")
    # the unwritten extent over a hole is no change; the tail past the old size is
    assert changes(reflink_fs / "base", reflink_fs / "new") == [(8 * MiB, 10 * MiB)]
    # shrunk below the base: nothing to read past the new end
    os.truncate(img, 512 * KiB)
    copy(img, reflink_fs / "small")
    assert changes(reflink_fs / "base", reflink_fs / "small") == []


def test_data_turned_to_zeros_is_a_change(reflink_fs):
    img = reflink_fs / "private.img"
    image(img, 4 * MiB)
    copy(img, reflink_fs / "base")
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(MiB), "--length",
                    str(64 * KiB), str(img)], check=True)
    copy(img, reflink_fs / "new")
    assert changes(reflink_fs / "base", reflink_fs / "new") == [(MiB, MiB + 64 * KiB)]


def test_inline_and_compressed_extents_always_count_as_changed(btrfs_dir):
    small = btrfs_dir / "small.img"
    small.write_bytes(b"tiny volume\n")  # btrfs keeps this inline in its metadata
    copy(small, btrfs_dir / "small-base")
    copy(small, btrfs_dir / "small-new")
    assert changes(btrfs_dir / "small-base", btrfs_dir / "small-new") == [(0, 12)]
    packed = btrfs_dir / "packed.img"
    packed.touch()
    subprocess.run(["btrfs", "property", "set", str(packed), "compression", "zstd"],
                   check=True)
    with open(packed, "wb") as f:
        f.write(b"compressible " * 100000)
        f.flush()
        os.fsync(f.fileno())
    copy(packed, btrfs_dir / "packed-base")
    copy(packed, btrfs_dir / "packed-new")  # identical, but compressed extents
    assert changes(btrfs_dir / "packed-base", btrfs_dir / "packed-new") == [(0, 1300000)]


def test_copies_on_other_file_systems_are_refused(reflink_fs, tmp_path):
    img = reflink_fs / "private.img"
    image(img, MiB)
    other = tmp_path / "elsewhere.img"
    other.write_bytes(img.read_bytes())
    with pytest.raises(Untrackable, match="another file system"):
        changes(other, img)


def test_an_extent_map_that_moves_is_not_trusted(reflink_fs, monkeypatch):
    img = reflink_fs / "private.img"
    image(img, MiB)
    copy(img, reflink_fs / "base")
    real, calls = fiemap._raw_map, []

    def moving(fd, size):  # the base's second reading finds it elsewhere
        calls.append(fd)
        raw = real(fd, size)
        return raw[:8] + bytes([raw[8] ^ 0x10]) + raw[9:] if len(calls) == 3 else raw
    monkeypatch.setattr(fiemap, "_raw_map", moving)
    with pytest.raises(Untrackable, match="moved while they were compared"):
        changes(reflink_fs / "base", img)


def test_no_reflinks_on_tmpfs(no_reflink_dir):
    src = no_reflink_dir / "a"
    src.write_bytes(b"data" * 1000)
    with pytest.raises(NoReflink, match="cannot make reflink copies"):
        copy(src, no_reflink_dir / "b")


def raw(found: list[Extent]) -> bytes:
    """Extent records as FIEMAP returns them."""
    return b"".join(fiemap._EXTENT.pack(e.logical, e.physical, e.length, 0, 0, e.flags, 0, 0, 0)
                    for e in found)


@pytest.mark.parametrize("flags", [fiemap.EXTENT_DATA_INLINE, fiemap.EXTENT_DELALLOC,
                                   fiemap.EXTENT_UNKNOWN, fiemap.EXTENT_ENCODED,
                                   fiemap.EXTENT_NOT_ALIGNED, 0x10000])
def test_opaque_extents_are_changes(monkeypatch, tmp_path, flags):
    """Same address on both sides, but a flag that says the address does not
    name the bytes one to one (or an unknown one): changed."""
    base, new = (os.open(tmp_path / name, os.O_RDWR | os.O_CREAT) for name in ("b", "n"))

    def fake(fd, size):
        return raw([Extent(0, 1 << 30, 64 * KiB, fiemap.EXTENT_SHARED | (flags if fd == new else 0)),
                    Extent(64 * KiB, 2 << 30, 64 * KiB, fiemap.EXTENT_SHARED | fiemap.EXTENT_LAST)])
    monkeypatch.setattr(fiemap, "_raw_map", fake)
    try:
        assert fiemap.changed_ranges(base, 128 * KiB, new, 128 * KiB) == [(0, 64 * KiB)]
    finally:
        os.close(base)
        os.close(new)


def test_identical_maps_with_opaque_extents_still_count_as_changed(monkeypatch, tmp_path):
    """The fast path (the very same extents) does not skip opaque ones."""
    base, new = (os.open(tmp_path / name, os.O_RDWR | os.O_CREAT) for name in ("b", "n"))
    same = raw([Extent(0, 1 << 30, 64 * KiB, fiemap.EXTENT_ENCODED | fiemap.EXTENT_LAST)])
    monkeypatch.setattr(fiemap, "_raw_map", lambda fd, size: same)
    try:
        assert fiemap.changed_ranges(base, 64 * KiB, new, 64 * KiB) == [(0, 64 * KiB)]
    finally:
        os.close(base)
        os.close(new)
