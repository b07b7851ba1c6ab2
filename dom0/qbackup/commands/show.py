# SPDX-License-Identifier: GPL-2.0-or-later
"""`qbackup show SNAPSHOT [--json]`: the qubes of a snapshot, their
settings, volumes and sizes, and what changed since its predecessor (qubes
added or removed, settings changed, chunks changed per volume, found by
comparing chunk maps: shared subtrees are not fetched)."""

from __future__ import annotations

import argparse
from typing import Any

from qbackup.chunkmap import count_changed
from qbackup.commands.common import (EXIT_OK, Context, ask_passphrase, clean, find_snapshot,
                                     local_time, open_history, print_json)
from qbackup.errors import IntegrityError
from qbackup.progress import human_bytes
from qbackup.restore import SnapshotInfo

SETTINGS = ("properties", "features", "dependencies", "volume_config")


def jsonable(value: Any) -> Any:
    """A manifest value as JSON: bin as hex (format 1 allowed it anywhere)."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


def _qube_json(entry: dict) -> dict:
    volumes = {}
    for name, config in sorted(entry["volume_config"].items()):
        volumes[name] = {"size": config["size"], "backed_up": name in entry["volumes"],
                         "config": config}
    for name, vol in sorted(entry["volumes"].items()):
        volumes.setdefault(name, {"config": None, "backed_up": True})["size"] = vol["size"]
    return jsonable({"class": entry["class"], "properties": entry["properties"],
                     "features": entry["features"], "tags": entry["tags"],
                     "dependencies": entry["dependencies"], "firewall": entry["firewall"],
                     "devices": entry["devices"], "volumes": dict(sorted(volumes.items()))})


def _device_key(dev: dict) -> str:
    return f"{dev['class']} {dev['backend']}:{dev['ident']}"


def setting_changes(old: dict, new: dict) -> list[dict]:
    """[{"setting", "old", "new"}] between two qube entries (None: absent)."""
    changes = []

    def differ(setting: str, a: Any, b: Any) -> None:
        if a != b:
            changes.append({"setting": setting, "old": jsonable(a), "new": jsonable(b)})

    differ("class", old["class"], new["class"])
    for group in SETTINGS:
        singular = {"properties": "property", "features": "feature",
                    "dependencies": "dependency", "volume_config": "volume"}[group]
        for key in sorted(set(old[group]) | set(new[group])):
            differ(f"{singular} {key}", old[group].get(key), new[group].get(key))
    for tag in sorted(set(old["tags"]) ^ set(new["tags"])):
        differ(f"tag {tag}", tag in old["tags"], tag in new["tags"])
    differ("firewall", old["firewall"], new["firewall"])
    old_devices = {_device_key(d): d for d in old["devices"] or []}
    new_devices = {_device_key(d): d for d in new["devices"] or []}
    if old["devices"] is None or new["devices"] is None:
        differ("devices", old["devices"], new["devices"])
    else:
        for key in sorted(set(old_devices) | set(new_devices)):
            differ(f"device {key}", old_devices.get(key), new_devices.get(key))
    return changes


def changes_since(session, keys, snap: SnapshotInfo, history: list[SnapshotInfo]) -> dict:
    previous = next((s for s in history if s.id == snap.predecessor), None)
    result: dict[str, Any] = {
        "predecessor": snap.predecessor.hex() if snap.predecessor else None,
        "predecessor_time": previous.time if previous else None,
        "predecessor_missing": snap.predecessor is not None and previous is None,
        "added": sorted(set(snap.qubes) - set(previous.qubes if previous else {})),
        "removed": sorted(set(previous.qubes) - set(snap.qubes)) if previous else [],
        "settings": {}, "volumes": {}}
    if previous is None:
        return result
    cs = keys.chunk_size
    for name in sorted(set(snap.qubes) & set(previous.qubes)):
        old, new = previous.qubes[name], snap.qubes[name]
        settings = setting_changes(old, new)
        if settings:
            result["settings"][name] = settings
        for vol_name, vol in sorted(new["volumes"].items()):
            before = old["volumes"].get(vol_name)
            empty = {"root": vol["root"], "depth": 1, "chunks": 0}
            try:
                changed = count_changed(session, keys, before or empty, vol)
                error = None
            except IntegrityError as e:
                changed, error = None, str(e)
            result["volumes"].setdefault(name, {})[vol_name] = {
                "size_before": before["size"] if before else None, "size_after": vol["size"],
                "changed_chunks": changed,
                "changed_bytes": None if changed is None else min(changed * cs, vol["size"]),
                "error": error}
    return result


def _short(value: Any, limit: int = 200) -> str:
    if value is None:
        return "(none)"
    return clean(value if isinstance(value, str) else repr(value), limit)


def print_snapshot(snap: SnapshotInfo, qubes: dict, changes: dict, version: int) -> None:
    volumes = sum(len(q["volumes"]) for q in snap.qubes.values())
    print(f"snapshot {snap.id.hex()} ({local_time(snap.time)}, host {clean(snap.host)}, "
          f"manifest format {version})")
    print(f"{len(qubes)} qubes, {volumes} volumes backed up, {human_bytes(snap.bytes_total)}")
    for name, q in qubes.items():
        print(f"\n{name} ({q['class']})")
        props = q["properties"]
        if props:
            print("  properties: " + ", ".join(f"{k}={_short(v, 80)}" for k, v in props.items()))
        deps = q["dependencies"]
        if deps:
            print("  uses: " + ", ".join(f"{k}={_short(v)}{'' if k in props else ' (default)'}"
                                         for k, v in deps.items()))
        if q["features"]:
            print("  features: " + ", ".join(f"{clean(k)}={_short(v, 80)}"
                                             for k, v in q["features"].items()))
        if q["tags"]:
            print("  tags: " + ", ".join(clean(t) for t in q["tags"]))
        if q["firewall"] is None:
            print("  firewall: not recorded")
        else:
            count = len(q["firewall"])
            print(f"  firewall: {count} rule{'' if count == 1 else 's'}")
            for rule in q["firewall"]:
                print(f"    {clean(rule)}")
        if q["devices"] is None:
            print("  devices: not recorded")
        for dev in q["devices"] or []:
            options = " ".join(f"{k}={v}" for k, v in dev["options"].items())
            print(f"  device: {_device_key(dev)} "
                  f"{'persistent' if dev['persistent'] else 'attached while running only'}"
                  + (f" {clean(options)}" if options else ""))
        for vol, info in q["volumes"].items():
            config = info["config"] or {}
            settings = " ".join(f"{k}={v}" for k, v in config.items() if k != "size")
            print(f"  volume {vol}: {human_bytes(info['size'])}"
                  + (" backed up" if info["backed_up"] else " (settings only)")
                  + (f"; {clean(settings)}" if settings else ""))
    print()
    if changes["predecessor"] is None:
        print("no predecessor: the first snapshot of this history")
        return
    if changes["predecessor_missing"]:
        print(f"predecessor {changes['predecessor'][:16]} is no longer in the repository: "
              "nothing to compare with")
        return
    print(f"changes since {changes['predecessor'][:16]} "
          f"({local_time(changes['predecessor_time'])}):")
    lines = [f"  added: {', '.join(changes['added'])}"] if changes["added"] else []
    if changes["removed"]:
        lines.append(f"  removed: {', '.join(changes['removed'])}")
    for name, settings in changes["settings"].items():
        for change in settings:
            lines.append(f"  {name}: {clean(change['setting'])}: {_short(change['old'], 120)} "
                         f"-> {_short(change['new'], 120)}")
    for name, volumes in changes["volumes"].items():
        for vol, c in volumes.items():
            if c["error"]:
                lines.append(f"  {name}:{vol}: cannot compare: {clean(c['error'])}")
            elif c["changed_chunks"] or c["size_before"] != c["size_after"]:
                size = (f"{human_bytes(c['size_before'])} -> " if c["size_before"] is not None
                        and c["size_before"] != c["size_after"] else "")
                lines.append(f"  {name}:{vol}: {human_bytes(c['changed_bytes'])} changed "
                             f"({c['changed_chunks']} chunks) of {size}"
                             f"{human_bytes(c['size_after'])}")
    print("\n".join(lines) if lines else "  nothing")


def cmd_show(ctx: Context, args: argparse.Namespace) -> int:
    passphrase = ask_passphrase(args)
    with ctx.session() as session:
        keys, history = open_history(ctx, args, session, passphrase)
        snap = find_snapshot(history, args.snapshot)
        changes = changes_since(session, keys, snap, history)
    qubes = {name: _qube_json(entry) for name, entry in sorted(snap.qubes.items())}
    if args.json:
        print_json({"snapshot": {"id": snap.id.hex(), "time": snap.time, "host": snap.host,
                                 "predecessor": changes["predecessor"],
                                 "format": snap.version, "bytes_total": snap.bytes_total},
                    "qubes": qubes, "changes": changes})
        return EXIT_OK
    print_snapshot(snap, qubes, changes, snap.version)
    return EXIT_OK
