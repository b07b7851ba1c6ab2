# SPDX-License-Identifier: GPL-2.0-or-later
"""Repository maintenance done by the backup qube, started from dom0: garbage
collection, the keyless storage check, space usage (docs/GC.md, PROTOCOL.md
§5, version 2).

The backup qube does the work without keys; what it answers is untrusted
(bounded and type-checked by `proto.Session`, text sanitised) and only ever
*reported*: nothing here decides anything about the history. Mapping the
ids it names to qubes and volumes uses dom0's own authenticated history
(`restore.load_history`), never the backup qube's word alone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

from .progress import human_bytes

ProgressCallback = Callable[[str, int, int], None]


def collect_garbage(session, *, repack_below: int = 70, dry_run: bool = False,
                    progress: ProgressCallback | None = None) -> dict:
    """Run the backup qube's garbage collection on the session's repository.

    Opens it read-only (the collector takes the writer lock itself, in short
    rounds, so backups may run meanwhile). Returns the untrusted summary:
    dry_run, snapshots, live_blobs, packs_deleted, packs_repacked,
    packs_written, packs_kept, bytes_copied, bytes_freed. Raises RemoteError
    `locked` (another collection runs), `damaged` (see `storage_check`).
    """
    session.open(write=False)
    return session.gc(repack_below=repack_below, dry_run=dry_run, progress=progress)


def storage_check(session, *, read_data: bool = False,
                  progress: ProgressCallback | None = None) -> dict:
    """The backup qube's keyless check (every byte of every pack with `read_data`)."""
    session.open(write=False)
    return session.check(read_data=read_data, progress=progress)


def usage(session, *, progress: ProgressCallback | None = None) -> dict:
    """Stored bytes only each snapshot reaches, shared, unreferenced (untrusted)."""
    session.open(write=False)
    return session.usage(progress=progress)


@dataclass(frozen=True)
class Affected:
    """A volume of a snapshot that reaches a damaged blob, per the backup qube."""
    snapshot: bytes
    qube: str | None      # None: the backup qube named a ref the manifest does not have
    volume: str | None


def affected_volumes(history: Iterable, untrusted_report: dict) -> list[Affected]:
    """Map a `check` answer's (snapshot id, refs) to the qubes and volumes of
    dom0's authenticated `history` (restore.SnapshotInfo). A snapshot the
    report names but the history lacks is left out (the history is dom0's
    truth); one listed without refs ("roots": damage too wide to attribute,
    or its file damaged) is reported for each of its volumes."""
    by_id = {snap.id: snap for snap in history}
    found: list[Affected] = []
    for snapshot_id, untrusted_roots in untrusted_report["affected"]:
        snap = by_id.get(snapshot_id)
        if snap is None:
            continue
        volumes = {(qube, name): entry["root"]
                   for qube, info in snap.qubes.items()
                   for name, entry in info["volumes"].items()}
        roots = set(untrusted_roots)
        named = [(q, v) for (q, v), root in sorted(volumes.items()) if not roots or root in roots]
        found += [Affected(snapshot_id, q, v) for q, v in named]
        if roots - set(volumes.values()):
            found.append(Affected(snapshot_id, None, None))
    for snapshot_id in untrusted_report["bad_snapshots"]:
        if snapshot_id in by_id:
            found.append(Affected(snapshot_id, None, None))
    return found


class PhaseProgress:
    """A `progress` callback drawing one line on a terminal (nothing otherwise):
    `LABEL: PHASE DONE/TOTAL` (bytes for gc's `repack`)."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled = self.stream.isatty()
        self.label = label
        self.drawn = False

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        show = human_bytes if phase == "repack" else str
        of = f" / {show(total)}" if total else ""
        self.stream.write(f"\r{self.label}: {phase} {show(done)}{of}\x1b[K")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
