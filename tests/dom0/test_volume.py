# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests for qbackup.volume: sparse-aware chunking of files and devices."""

import os
import subprocess

import pytest
from engine_helpers import write_file

from qbackup.errors import QbackupError
from qbackup.volume import iter_chunks, volume_size

CS = 64 * 1024  # chunk size used here: a multiple of the fs block size


def expected_chunks(path, size):
    with open(path, "rb") as f:
        content = f.read()
    assert len(content) == size
    out = []
    for i in range(0, size, CS):
        part = content[i:i + CS]
        out.append((i // CS, None if part.count(0) == len(part) else part))
    return out


def test_dense_random_with_short_last_chunk(tmp_path):
    size = 5 * CS + 123
    data = os.urandom(size)
    path = write_file(tmp_path / "v", size, [(0, data)])
    reader = iter_chunks(path, size, CS)
    chunks = list(reader)
    assert [i for i, _ in chunks] == list(range(6))
    assert b"".join(d for _, d in chunks) == data
    assert len(chunks[-1][1]) == 123  # not padded
    assert reader.bytes_read == size


def test_holes_are_not_read(tmp_path):
    size = 64 * CS
    a, b = os.urandom(CS), os.urandom(CS // 2)
    path = write_file(tmp_path / "v", size, [(10 * CS, a), (40 * CS + CS // 4, b)])
    reader = iter_chunks(path, size, CS)
    chunks = list(reader)
    assert chunks == expected_chunks(path, size)
    assert chunks[10] == (10, a)
    assert chunks[40][1] == bytes(CS // 4) + b + bytes(CS // 4)
    assert sum(d is not None for _, d in chunks) == 2
    # only the data extents were read: much less than the file
    assert reader.bytes_read <= 2 * CS + 2 * 4096
    assert reader.bytes_read >= len(a) + len(b)


def test_written_zero_chunks_are_none(tmp_path):
    size = 4 * CS
    data = bytes(CS) + os.urandom(CS) + bytes(2 * CS)
    path = write_file(tmp_path / "v", size, [(0, data)])  # zeros written, not holes
    reader = iter_chunks(path, size, CS)
    chunks = list(reader)
    assert [d is None for _, d in chunks] == [True, False, True, True]
    assert chunks[1][1] == data[CS:2 * CS]
    assert reader.bytes_read == size


def test_chunk_with_a_single_nonzero_byte(tmp_path):
    size = 2 * CS
    path = write_file(tmp_path / "v", size, [(2 * CS - 1, b"\x01")])
    chunks = list(iter_chunks(path, size, CS))
    assert chunks[0] == (0, None)
    assert chunks[1] == (1, bytes(CS - 1) + b"\x01")


def test_empty_file(tmp_path):
    path = write_file(tmp_path / "v", 0, [])
    assert volume_size(path) == 0
    reader = iter_chunks(path, 0, CS)
    assert list(reader) == []
    assert reader.bytes_read == 0


@pytest.mark.parametrize("size", [1, CS - 1, CS, CS + 1, 3 * CS + 4097])
def test_sizes_not_multiple_of_chunk(tmp_path, size):
    data = os.urandom(size)
    path = write_file(tmp_path / "v", size, [(0, data)])
    chunks = list(iter_chunks(path, size, CS))
    assert len(chunks) == -(-size // CS)
    assert b"".join(d for _, d in chunks) == data


def test_sparse_tail_short_chunk(tmp_path):
    size = 3 * CS + 1000  # the last, short chunk is a hole
    path = write_file(tmp_path / "v", size, [(0, b"x" * 10)])
    reader = iter_chunks(path, size, CS)
    chunks = list(reader)
    assert chunks == [(0, b"x" * 10 + bytes(CS - 10)), (1, None), (2, None), (3, None)]
    assert reader.bytes_read <= CS


def test_volume_size_regular_file(tmp_path):
    path = write_file(tmp_path / "v", 12345, [])
    assert volume_size(path) == 12345


def test_volume_size_rejects_other_types(tmp_path):
    with pytest.raises(QbackupError, match="neither a regular file nor a block device"):
        volume_size(str(tmp_path))
    with pytest.raises(QbackupError, match="cannot open volume"):
        volume_size(str(tmp_path / "missing"))


def test_file_shorter_than_expected(tmp_path):
    path = write_file(tmp_path / "v", CS, [(0, b"a")])
    with pytest.raises(QbackupError, match="expected"):
        list(iter_chunks(path, 2 * CS, CS))


@pytest.mark.parametrize("cut", [CS, CS + CS // 2])
def test_file_that_shrinks_while_read(tmp_path, cut):
    """A volume cut short under the reader (nothing at all, or half, of the
    next chunk left) fails at the first missing byte: never padded, never
    taken for zeros."""
    data = os.urandom(4 * CS)
    path = write_file(tmp_path / "v", 4 * CS, [(0, data)])
    reader = iter(iter_chunks(path, 4 * CS, CS))
    assert next(reader) == (0, data[:CS])
    os.truncate(path, cut)
    with pytest.raises(QbackupError, match=f"volume ended at offset {cut} while being read"):
        next(reader)


def test_only_a_prefix_is_read(tmp_path):
    # a size below the file's (e.g. the qube's volume size) reads only that part
    data = os.urandom(3 * CS)
    path = write_file(tmp_path / "v", 3 * CS, [(0, data)])
    reader = iter_chunks(path, CS + 10, CS)
    assert b"".join(d for _, d in reader) == data[:CS + 10]
    assert reader.bytes_read == CS + 10


@pytest.mark.root
def test_block_device(tmp_path):
    """A loop device: size by ioctl, every chunk read (no hole information)."""
    size = 4 * CS
    data = os.urandom(CS)
    image = write_file(tmp_path / "img", size, [(2 * CS, data)])
    dev = subprocess.run(["losetup", "--find", "--show", image], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        assert volume_size(dev) == size
        chunks = list(iter_chunks(dev, size, CS))
        assert chunks == [(0, None), (1, None), (2, data), (3, None)]
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
