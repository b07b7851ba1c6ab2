# SPDX-License-Identifier: GPL-2.0-or-later
"""LVM thin volumes: qbackup's read-only snapshots and `thin_delta` between them.

Every command goes through `qbackup.tools.run` (tests replace the runner):

  lvm lvcreate --snapshot --setactivationskip=n --activate=y --permission=r
               --name=NAME -- VG/ORIGIN          a read-only thin snapshot
  lvm lvs --reportformat=json ... VG/LV...       uuid, thin id, size, pool
  lvm lvchange --activate=y|n -- VG/LV           (de)activate a snapshot
  lvm lvremove --force -- VG/LV                  drop one
  dmsetup message VG-POOL-tpool 0 reserve_metadata_snap | release_metadata_snap
  thin_delta -m --snap1 A --snap2 B /dev/mapper/VG-POOL_tmeta

`thin_delta` reads the pool's metadata through a metadata snapshot, which
is reserved just before and released on every path (`metadata_snapshot`);
SIGINT and SIGTERM are held back in between, so Ctrl-C cannot leave it
reserved (SIGKILL can: the reservation is recorded first and the next run
releases it). Its XML output is parsed line by line against the exact
shape thin_delta prints (`parse_delta`): anything else is an error, and the
caller then reads the volume in full.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass

from qbackup import tools
from qbackup.tools import ToolError

SECTOR = 512
MAX_THIN_ID = (1 << 24) - 1
LV_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")
CHANGED_KINDS = ("different", "left_only", "right_only")


@dataclass(frozen=True)
class LvInfo:
    vg: str
    name: str
    uuid: str
    thin_id: int
    size: int
    attr: str
    pool: str

    @property
    def read_only(self) -> bool:
        return len(self.attr) > 1 and self.attr[1] == "r"


def dm_name(vg: str, lv: str) -> str:
    """device-mapper's name for VG/LV (each '-' doubled, joined by '-')."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def check_name(vg: str, lv: str) -> None:
    if not (LV_NAME.fullmatch(vg) and LV_NAME.fullmatch(lv)):
        raise ToolError(f"invalid LVM name {vg}/{lv}")


def snapshot(vg: str, origin: str, name: str) -> None:
    """A read-only, active thin snapshot VG/NAME of VG/ORIGIN."""
    check_name(vg, origin)
    check_name(vg, name)
    tools.run(["lvm", "lvcreate", "--snapshot", "--setactivationskip=n", "--activate=y",
               "--permission=r", f"--name={name}", "--", f"{vg}/{origin}"])


def activate(vg: str, name: str, active: bool = True) -> None:
    check_name(vg, name)
    tools.run(["lvm", "lvchange", f"--activate={'y' if active else 'n'}", "--",
               f"{vg}/{name}"])


def remove(vg: str, name: str) -> None:
    check_name(vg, name)
    tools.run(["lvm", "lvremove", "--force", "--", f"{vg}/{name}"])


def _size(text: str) -> int:
    text = text.strip().removesuffix("B")
    if not text.isdigit():
        raise ToolError(f"lvm lvs: unexpected size {text[:40]!r}")
    return int(text)


def lv_info(vg: str, names: list[str]) -> dict[str, LvInfo]:
    """What lvs says about VG/NAME for each name that exists."""
    for name in names:
        check_name(vg, name)
    out = tools.run(["lvm", "lvs", "--reportformat=json", "--units=b", "--nosuffix",
                     "-o", "vg_name,lv_name,lv_uuid,thin_id,lv_size,lv_attr,pool_lv",
                     *(f"{vg}/{n}" for n in names)])
    return {i.name: i for i in _parse_lvs(out) if i.vg == vg and i.name in names}


def list_lvs(vg: str) -> list[LvInfo]:
    """Every logical volume of a volume group."""
    check_name(vg, "x")
    out = tools.run(["lvm", "lvs", "--reportformat=json", "--units=b", "--nosuffix",
                     "-o", "vg_name,lv_name,lv_uuid,thin_id,lv_size,lv_attr,pool_lv", vg])
    return [i for i in _parse_lvs(out) if i.vg == vg]


def _parse_lvs(out: str) -> list[LvInfo]:
    try:
        rows = json.loads(out)["report"][0]["lv"]
        result = []
        for row in rows:
            thin_id = str(row.get("thin_id", "")).strip()
            result.append(LvInfo(vg=str(row["vg_name"]), name=str(row["lv_name"]),
                                 uuid=str(row.get("lv_uuid", "")),
                                 thin_id=int(thin_id) if thin_id.isdigit() else -1,
                                 size=_size(str(row["lv_size"])), attr=str(row["lv_attr"]),
                                 pool=str(row.get("pool_lv", ""))))
        return result
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ToolError(f"lvm lvs: unexpected output ({e})") from None


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends, then act as they would
    have (Ctrl-C: KeyboardInterrupt). Python runs signal handlers in the
    main thread only, which is where this is used; elsewhere it holds
    nothing back."""
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    try:
        old = {s: signal.signal(s, lambda signum, _frame: caught.append(signum)) for s in held}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if caught:
            if caught[0] == signal.SIGINT and old[signal.SIGINT] is signal.default_int_handler:
                raise KeyboardInterrupt
            os.kill(os.getpid(), caught[0])


def tpool(vg: str, pool: str) -> str:
    """The thin-pool target's device-mapper name."""
    return dm_name(vg, pool) + "-tpool"


def release(vg: str, pool: str) -> None:
    tools.run(["dmsetup", "message", tpool(vg, pool), "0", "release_metadata_snap"])


@contextlib.contextmanager
def _flocked(path: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def metadata_snapshot(vg: str, pool: str, state_dir: str) -> Iterator[str]:
    """Reserve the pool's metadata snapshot; yield the metadata device to
    give thin_delta -m; release it on the way out, whatever happens.

    In dom0's state directory, `thin-POOL.lock` (flock) lets one qbackup at
    a time use the pool's metadata snapshot, and `thin-POOL.reserved` exists
    while qbackup holds it: found there by the next holder of the lock, it
    was left by a qbackup that was killed, and is released first."""
    check_name(vg, pool)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    stem = os.path.join(state_dir, "thin-" + dm_name(vg, pool))
    marker = stem + ".reserved"
    with _flocked(stem + ".lock"), _signals_held():
        if os.path.exists(marker):
            with contextlib.suppress(ToolError):
                release(vg, pool)  # ours, from a run that was killed
            os.unlink(marker)
        with open(marker, "w") as f:
            f.write(f"{os.getpid()}\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            tools.run(["dmsetup", "message", tpool(vg, pool), "0", "reserve_metadata_snap"])
        except BaseException:
            os.unlink(marker)  # not reserved: it may be another program's
            raise
        try:
            yield "/dev/mapper/" + dm_name(vg, pool + "_tmeta")
        finally:
            release(vg, pool)  # a failure keeps the marker: the next run retries
            os.unlink(marker)


def delta(metadata: str, old_id: int, new_id: int) -> tuple[int, list[tuple[int, int]]]:
    """thin_delta between two thin devices: (block size in bytes, changed
    block ranges [begin, end))."""
    out = tools.run(["thin_delta", "-m", "--snap1", str(old_id), "--snap2", str(new_id),
                     metadata])
    return parse_delta(out, old_id, new_id)


_TAG = re.compile(r'\s*<(/?)([a-z_]+)((?:\s+[a-z_]+="[^"<>&]*")*)\s*(/?)>\s*')
_ATTR = re.compile(r'([a-z_]+)="([^"<>&]*)"')


def _int(attrs: dict[str, str], key: str, line: int, low: int = 0,
         high: int = 1 << 62) -> int:
    value = attrs.get(key, "")
    if not value.isdigit() or not low <= int(value) <= high:
        raise ToolError(f"thin_delta output line {line}: bad {key}={value[:20]!r}")
    return int(value)


def parse_delta(text: str, old_id: int, new_id: int) -> tuple[int, list[tuple[int, int]]]:
    """(block size in bytes, changed block ranges) from thin_delta's XML.

    Only this shape is accepted, one element per line, nothing else:

        <superblock ... data_block_size="N" ...>
          <diff left="OLD" right="NEW">
            <same|different|left_only|right_only begin="B" length="L"/>  (ascending)
          </diff>
        </superblock>

    different / left_only / right_only are changes (left_only: mapped in the
    old device only, so the new one reads zeros there); same and ranges
    not listed (unmapped in both) are not."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    expect = ["superblock", "diff"]
    block = 0
    changed: list[tuple[int, int]] = []
    end = 0
    closed: list[str] = []
    for number, line in enumerate(lines, 1):
        m = _TAG.fullmatch(line)
        if m is None:
            raise ToolError(f"thin_delta output line {number} is not one XML element")
        closing, tag, attr_text, empty = m.group(1), m.group(2), m.group(3), m.group(4)
        attrs = dict(_ATTR.findall(attr_text))
        if expect:
            if closing or empty or tag != expect[0]:
                raise ToolError(f"thin_delta output line {number}: expected <{expect[0]}>")
            expect.pop(0)
            if tag == "superblock":
                block = _int(attrs, "data_block_size", number, 1, 1 << 22) * SECTOR
            elif (_int(attrs, "left", number) != old_id
                  or _int(attrs, "right", number) != new_id):
                raise ToolError("thin_delta compared other devices than asked")
            continue
        if closing:
            if len(closed) == 2 or tag != ("diff", "superblock")[len(closed)]:
                raise ToolError(f"thin_delta output line {number}: unexpected </{tag}>")
            closed.append(tag)
            continue
        if closed or not empty or tag not in ("same",) + CHANGED_KINDS or attr_text.count("=") != 2:
            raise ToolError(f"thin_delta output line {number}: unexpected <{tag}>")
        begin, length = _int(attrs, "begin", number), _int(attrs, "length", number, 1)
        if begin < end:
            raise ToolError(f"thin_delta output line {number}: ranges out of order")
        end = begin + length
        if tag in CHANGED_KINDS:
            if changed and changed[-1][1] == begin:
                changed[-1] = (changed[-1][0], end)
            else:
                changed.append((begin, end))
    if expect or closed != ["diff", "superblock"]:
        raise ToolError("thin_delta output is incomplete")
    return block, changed
