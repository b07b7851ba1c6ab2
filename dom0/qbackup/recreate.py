# SPDX-License-Identifier: GPL-2.0-or-later
"""Recreating qubes from a snapshot, through a `qubes.Backend`.

`plan()` turns the (authenticated, validated) settings of a snapshot's
qubes and what the system has (`SystemInfo`) into a `Plan`: every check is
made there, before anything changes, and every change is one `Step`, in the
order it will be made. `--dry-run` prints exactly those steps; `execute()`
makes them:

1. remove the qubes given with --replace;
2. per qube, in dependency order (templates, then qubes providing network,
   then disposable templates, then the rest, named disposables last):
   create it (class, label, template, pools), tag it
   `backup-restore-in-progress` (qubesd refuses to start it: qubes/ext/
   backup_restore.py), set its properties, features, tags, firewall and
   volume settings, and import its volumes (VolumeStream: authenticated
   before any byte reaches the volume; a short stream is never committed);
3. then the properties that name other qubes (netvm, default_dispvm,
   management_dispvm, audiovm, guivm), once every qube exists, and the
   persistent device assignments;
4. last, take `backup-restore-in-progress` off every qube whose restore
   completed. A qube that failed keeps it (so it cannot start) and gets
   `qbackup-restore-failed`; the others go on. See docs/RESTORE.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from qbackup.errors import ProtocolError, QbackupError, RemoteError, UsageError
from qbackup.manifest import DEPENDENCIES
from qbackup.progress import human_bytes
from qbackup.qubes import RESTORE_IN_PROGRESS, Backend, Device, SystemInfo
from qbackup.restore import SnapshotInfo, VolumeStream

RESTORE_FAILED = "qbackup-restore-failed"
CREATED_BY_DOM0 = "created-by-dom0"  # qubesd tags every qube dom0 creates
CLASSES = ("TemplateVM", "AppVM", "StandaloneVM", "DispVM")
# Classes whose root volume is their own (others snapshot their template's).
OWN_ROOT = ("TemplateVM", "StandaloneVM")
# Properties set when the qube is created, or last (they name other qubes).
AT_CREATION = ("label", "template")
REFERENCES = tuple(p for p in DEPENDENCIES if p != "template")
# Set first: later settings and qubes depend on them (a DispVM needs its
# template's template_for_dispvms, netvm needs provides_network, PCI devices
# a virt_mode other than pvh, memory at most maxmem).
FIRST = ("template_for_dispvms", "provides_network", "virt_mode", "maxmem")
DEFAULT_FIREWALL = ["action=accept"]
# The global property a qube's reference defaults to.
SYSTEM_DEFAULT = {"netvm": "default_netvm", "default_dispvm": "default_dispvm",
                  "management_dispvm": "management_dispvm", "audiovm": "default_audiovm",
                  "guivm": "default_guivm"}
# qubesd's rules for a qube name (qubes/vm/__init__.py validate_name).
QUBE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,30}")
RESERVED_NAMES = ("none", "default", "Domain-0", "dom0")


def check_new_name(name: str) -> str:
    if not QUBE_NAME.fullmatch(name) or name in RESERVED_NAMES:
        raise UsageError(f"invalid qube name {name!r} (a letter, then letters, digits, '_' "
                         "or '-', at most 31)")
    return name


@dataclass
class Options:
    qubes: list[str]                      # snapshot qubes to restore; empty: all
    renames: dict[str, str] = field(default_factory=dict)   # snapshot name -> new name
    pool: str | None = None               # every volume into this pool
    replace: set[str] = field(default_factory=set)  # existing qubes restore may remove
    skip_missing: bool = False
    backup_vm: str | None = None          # never replaced


@dataclass
class Step:
    qube: str      # the qube it changes (its new name)
    kind: str      # remove, create, set, import, reference, device, finish
    text: str      # the plan's line
    action: tuple  # what execute() does: (verb, *arguments)


@dataclass
class Plan:
    snapshot: SnapshotInfo
    names: dict[str, str]       # snapshot name -> new name, in creation order
    steps: list[Step]
    warnings: list[str]
    problems: list[str]         # any: nothing may be done

    def lines(self) -> list[str]:
        return [f"{step.text}" for step in self.steps]


@dataclass
class Outcome:
    restored: list[str] = field(default_factory=list)          # complete, startable
    failed: dict[str, list[str]] = field(default_factory=dict)  # qube -> why
    integrity: bool = False     # a volume failed authentication
    warnings: list[str] = field(default_factory=list)
    volumes: int = 0
    bytes: int = 0


def _show(value: Any) -> str:
    if value is None:
        return "none"
    return str(value)


class _Planner:
    def __init__(self, snapshot: SnapshotInfo, system: SystemInfo, options: Options):
        self.snapshot, self.system, self.options = snapshot, system, options
        self.qubes = snapshot.qubes
        self.steps: list[Step] = []
        self.warnings: list[str] = []
        self.problems: list[str] = []
        self.names: dict[str, str] = {}

    def add(self, qube: str, kind: str, text: str, *action: Any) -> None:
        self.steps.append(Step(qube, kind, text, action))

    # -- names

    def select(self) -> list[str]:
        options = self.options
        selected = list(dict.fromkeys(options.qubes)) or sorted(self.qubes)
        unknown = [q for q in selected if q not in self.qubes]
        if unknown:
            raise UsageError(f"not in snapshot {self.snapshot.id.hex()[:16]}: "
                             f"{', '.join(unknown)}")
        for old, new in options.renames.items():
            if old not in selected:
                raise UsageError(f"--rename {old}:{new}: {old} is not restored")
            check_new_name(new)
        names = {q: options.renames.get(q, q) for q in selected}
        for q, new in names.items():
            if q not in options.renames and not QUBE_NAME.fullmatch(new):
                raise UsageError(f"{q} is not a valid qube name on this system: restore it "
                                 "under another name with --rename")
        targets = list(names.values())
        twice = sorted({t for t in targets if targets.count(t) > 1})
        if twice:
            raise UsageError(f"two qubes would be restored as {twice[0]}")
        unknown = sorted(options.replace - set(targets))
        if unknown:
            raise UsageError(f"--replace {unknown[0]}: no qube is restored under that name")
        return sorted(selected, key=lambda q: self._rank(q))

    def _rank(self, qube: str) -> tuple:
        entry = self.qubes[qube]
        props = entry["properties"]
        if entry["class"] == "TemplateVM":
            rank = 0
        elif entry["class"] == "DispVM":
            rank = 4
        elif props.get("provides_network"):
            rank = 1
        elif props.get("template_for_dispvms"):
            rank = 2
        else:
            rank = 3
        return rank, qube

    def resolve(self, qube: str, what: str, name: str, fallback: str) -> str | None:
        """The qube `name` (as the snapshot knows it) becomes: its new name
        if it is restored, itself if it is on the system; else a problem,
        or with --skip-missing a warning and None (`fallback` says what
        happens then)."""
        if name in self.names:
            return self.names[name]
        if name in self.system.qubes and name not in self.options.replace:
            return name
        where = (f"{name} is in the snapshot but not restored (add it to --qubes)"
                 if name in self.qubes else f"{name} is neither in the snapshot nor on this system")
        if self.options.skip_missing:
            self.warnings.append(f"{self.names[qube]}: {what} {name} is missing ({where}): "
                                 f"{fallback} (--skip-missing)")
        else:
            self.problems.append(f"{self.names[qube]}: {what} {name} is missing: {where}; "
                                 f"--skip-missing would {fallback.replace('using', 'use')}")
        return None

    # -- the plan

    def build(self) -> Plan:
        order = self.select()
        self.names = {q: self.options.renames.get(q, q) for q in order}
        self.check_existing()
        for old in reversed(order):
            new = self.names[old]
            if new in self.options.replace and new in self.system.qubes:
                self.add(new, "remove", f"remove {new} (--replace)", "remove", new)
        for qube in order:
            self.plan_qube(qube)
        for qube in order:
            self.plan_references(qube)
        for qube in order:
            self.plan_devices(qube)
        for qube in order:
            new = self.names[qube]
            self.add(new, "finish", f"untag {new} {RESTORE_IN_PROGRESS} (restore complete)",
                     "untag", new, RESTORE_IN_PROGRESS)
        return Plan(self.snapshot, self.names, self.steps, self.warnings, self.problems)

    def check_existing(self) -> None:
        for old, new in self.names.items():
            if new not in self.system.qubes:
                continue
            if new == "dom0" or self.system.qubes[new] == "AdminVM":
                self.problems.append(f"{new}: dom0 cannot be restored")
            elif new not in self.options.replace:
                self.problems.append(
                    f"{new} exists: restore never touches an existing qube without "
                    f"--replace {new} (or restore it as another qube: --rename {old}:NEW)")
            elif new == self.options.backup_vm:
                self.problems.append(f"{new} is the backup qube the restore reads from: it "
                                     "cannot be replaced")
            elif new in self.system.running:
                self.problems.append(f"{new} is running: shut it down before replacing it")

    def plan_qube(self, qube: str) -> None:
        entry, new = self.qubes[qube], self.names[qube]
        klass, props = entry["class"], entry["properties"]
        if klass not in CLASSES:
            self.problems.append(f"{new}: qubes of class {klass} cannot be restored")
            return
        label = props.get("label")
        if not isinstance(label, str) or label not in self.system.labels:
            self.problems.append(f"{new}: label {_show(label)} does not exist on this system")
        template = None
        if klass in ("AppVM", "DispVM"):
            template = self.template(qube)
        pools = self.pools(qube)
        source = f" (from {qube})" if new != qube else ""
        self.add(new, "create",
                 f"create {klass} {new}{source} label={_show(label)}"
                 + (f" template={template}" if template else "")
                 + "".join(f" pool:{v}={p}" for v, p in sorted(pools.items())),
                 "create", new, klass, label, template, pools)
        self.add(new, "set", f"tag {new} {RESTORE_IN_PROGRESS} (qubesd will not start it "
                 "until its restore completes)", "tag", new, RESTORE_IN_PROGRESS)
        settable = {k: v for k, v in props.items() if k not in AT_CREATION + REFERENCES}
        for prop in sorted(settable, key=lambda p: (p not in FIRST, FIRST.index(p)
                                                     if p in FIRST else 0, p)):
            value = settable[prop]
            if value is not None and not isinstance(value, (bool, int, str)):
                self.problems.append(f"{new}: property {prop} has a value qbackup cannot "
                                     "restore")
                continue
            self.add(new, "set", f"set {new} {prop}={_show(value)}", "property", new, prop, value)
        for name, value in sorted(entry["features"].items()):
            if not isinstance(value, str):
                self.problems.append(f"{new}: feature {name} has a value qbackup cannot restore")
                continue
            self.add(new, "set", f"set {new} feature {name}={value}", "feature", new, name, value)
        tags = [t for t in entry["tags"] if isinstance(t, str) and t != RESTORE_IN_PROGRESS]
        for tag in sorted(set(tags) - {CREATED_BY_DOM0}):
            self.add(new, "set", f"tag {new} {tag}", "tag", new, tag)
        if CREATED_BY_DOM0 not in tags:
            self.add(new, "set", f"untag {new} {CREATED_BY_DOM0} (the original did not have it)",
                     "untag", new, CREATED_BY_DOM0)
        firewall = entry["firewall"]
        if firewall is None:
            self.warnings.append(f"{new}: the snapshot has no firewall rules recorded (manifest "
                                 "format 1): the new qube keeps the default (accept all)")
        elif firewall != DEFAULT_FIREWALL:
            self.add(new, "set", f"set {new} firewall: {len(firewall)} rules: "
                     + " | ".join(firewall), "firewall", new, list(firewall))
        for vol, config in sorted(entry["volume_config"].items()):
            if vol not in entry["volumes"] and not config["save_on_stop"] and \
                    config["snap_on_start"]:
                continue  # a snapshot of another qube's volume: nothing of its own
            shown = " ".join(f"{k}={_show(config[k])}" for k in ("revisions_to_keep", "rw",
                                                                 "ephemeral")
                             if config.get(k) is not None)
            if vol not in entry["volumes"]:
                shown += f" size={config['size']}"
            self.add(new, "set", f"set {new} volume {vol}: {shown} (where it differs)",
                     "volume", new, vol, dict(config), vol in entry["volumes"])
        for vol, info in sorted(entry["volumes"].items()):
            self.add(new, "import",
                     f"import {new} volume {vol}: {human_bytes(info['size'])} "
                     f"({info['size']} bytes) from snapshot volume {qube}:{vol}",
                     "import", new, vol, qube, info)
        if entry["devices"] is None:
            self.warnings.append(f"{new}: the snapshot has no device assignments recorded "
                                 "(manifest format 1): none are restored")

    def template(self, qube: str) -> str | None:
        entry, new = self.qubes[qube], self.names[qube]
        klass = entry["class"]
        name = entry["properties"].get("template") or entry["dependencies"].get("template")
        default = self.system.defaults.get("default_template" if klass == "AppVM"
                                           else "default_dispvm")
        fallback = (f"using the system's default {'template' if klass == 'AppVM' else 'disposable template'} "
                    f"{_show(default)}")
        resolved = None
        if isinstance(name, str):
            resolved = self.resolve(qube, "template", name, fallback)
            wanted = "TemplateVM" if klass == "AppVM" else "AppVM"
            if resolved is not None:
                actual = (self.qubes[name]["class"] if name in self.names
                          else self.system.qubes.get(resolved))
                if actual != wanted:
                    self.problems.append(f"{new}: its template {resolved} is of class {actual}, "
                                         f"not {wanted}")
        else:
            self.problems.append(f"{new}: the snapshot does not say which template it uses")
            return None
        if resolved is None and self.options.skip_missing:
            if default is None:
                self.problems.append(f"{new}: its template {name} is missing and this system "
                                     "has no default to use instead")
            return default
        return resolved

    def pools(self, qube: str) -> dict[str, str]:
        entry, new = self.qubes[qube], self.names[qube]
        config = entry["volume_config"]
        if not config:
            self.warnings.append(f"{new}: the snapshot has no volume configuration: the "
                                 "system's default pools and sizes")
            return {}
        pools = {}
        for vol, settings in sorted(config.items()):
            if settings["snap_on_start"]:
                continue  # a snapshot of the template's volume: in the template's pool
            pool = self.options.pool or settings["pool"]
            if pool in self.system.pools:
                pools[vol] = pool
            elif self.options.skip_missing and not self.options.pool:
                self.warnings.append(f"{new}: volume {vol}: pool {pool} does not exist on this "
                                     "system: using the system's default pool "
                                     f"{_show(self.system.defaults.get('default_pool'))} "
                                     "(--skip-missing)")
            else:
                self.problems.append(f"{new}: volume {vol}: pool {pool} does not exist on this "
                                     "system (--pool POOL puts every volume in another pool"
                                     + ("" if self.options.pool else
                                        "; --skip-missing, in the default pool") + ")")
        return pools

    def plan_references(self, qube: str) -> None:
        entry, new = self.qubes[qube], self.names[qube]
        for prop in REFERENCES:
            if prop not in entry["properties"]:
                continue
            value = entry["properties"][prop]
            if value is not None and not isinstance(value, str):
                self.problems.append(f"{new}: property {prop} has a value qbackup cannot restore")
                continue
            if value is not None:
                default = self.system.defaults.get(SYSTEM_DEFAULT[prop])
                value = self.resolve(qube, prop, value, f"leaving {prop} at the system's default "
                                     f"({_show(default)})")
                if value is None:
                    continue
            self.add(new, "reference", f"set {new} {prop}={_show(value)}",
                     "property", new, prop, value)

    def plan_devices(self, qube: str) -> None:
        entry, new = self.qubes[qube], self.names[qube]
        for dev in entry["devices"] or []:
            label = f"{dev['class']} device {dev['backend']}:{dev['ident']}"
            if not dev["persistent"]:
                self.warnings.append(f"{new}: {label} is not restored: it was attached only "
                                     "while the qube ran (not persistent)")
                continue
            backend = self.resolve(qube, f"the backend of {label}", dev["backend"],
                                   "not attaching it") if dev["backend"] != "dom0" else "dom0"
            if backend is None:
                continue
            device = Device(dev["class"], backend, dev["ident"], dict(dev["options"]), True)
            options = " ".join(f"{k}={v}" for k, v in dev["options"].items())
            self.add(new, "device", f"attach {new} {dev['class']} {backend}:{dev['ident']} "
                     f"persistent{' ' + options if options else ''}", "device", new, device)


def plan(snapshot: SnapshotInfo, system: SystemInfo, options: Options) -> Plan:
    """Every step of restoring the chosen qubes of `snapshot` on `system`.

    UsageError for impossible options (a qube not in the snapshot, a bad
    rename); anything else that would stop the restore is in `problems`."""
    return _Planner(snapshot, system, options).build()


class _Executor:
    def __init__(self, plan: Plan, backend: Backend, session, keys, progress):
        self.plan, self.backend, self.session, self.keys = plan, backend, session, keys
        self.progress = progress
        self.outcome = Outcome()
        self.not_created: set[str] = set()
        self.volume_configs: dict[str, dict] = {}

    def run(self) -> Outcome:
        outcome = self.outcome
        created: list[str] = []
        for step in self.plan.steps:
            if step.qube in self.not_created:
                continue
            if step.kind == "finish" and step.qube in outcome.failed:
                continue
            try:
                getattr(self, "_" + step.action[0])(*step.action[1:])
            except (ProtocolError, RemoteError) as e:  # the backup qube is gone: stop
                incomplete = [q for q in created if q not in outcome.restored]
                raise QbackupError(f"{e} (restore stopped; {', '.join(incomplete) or 'no qube'} "
                                   f"created so far, tagged {RESTORE_IN_PROGRESS}: qubesd "
                                   "will not start them)") from None
            except QbackupError as e:
                if step.kind == "remove":
                    raise  # nothing of the restore has been made yet: stop here
                outcome.failed.setdefault(step.qube, []).append(str(e))
                if step.kind == "create":
                    self.not_created.add(step.qube)
            else:
                if step.kind == "create":
                    created.append(step.qube)
        for qube in self.plan.names.values():
            if qube in outcome.failed and qube not in self.not_created:
                try:  # best effort: RESTORE_IN_PROGRESS already keeps it from starting
                    self.backend.add_tag(qube, RESTORE_FAILED)
                except QbackupError as e:
                    outcome.failed[qube].append(str(e))
            elif qube not in outcome.failed:
                outcome.restored.append(qube)
        return outcome

    def _remove(self, name: str) -> None:
        self.backend.remove_qube(name)

    def _create(self, name: str, klass: str, label: str, template: str | None,
                pools: dict[str, str]) -> None:
        self.backend.create_qube(name, klass, label, template, pools)

    def _tag(self, name: str, tag: str) -> None:
        self.backend.add_tag(name, tag)

    def _untag(self, name: str, tag: str) -> None:
        self.backend.remove_tag(name, tag)

    def _property(self, name: str, prop: str, value: Any) -> None:
        self.backend.set_property(name, prop, value)

    def _feature(self, name: str, feature: str, value: str) -> None:
        self.backend.set_feature(name, feature, value)

    def _firewall(self, name: str, rules: list[str]) -> None:
        self.backend.set_firewall(name, rules)

    def _device(self, name: str, device: Device) -> None:
        self.backend.attach_device(name, device)

    def _volume(self, name: str, vol: str, config: dict, imported: bool) -> None:
        if name not in self.volume_configs:
            self.volume_configs[name] = self.backend.volume_config(name)
        current = self.volume_configs[name].get(vol)
        if current is None:
            raise QbackupError(f"{name}: has no volume {vol}")
        for key in ("revisions_to_keep", "rw", "ephemeral"):
            if config.get(key) is not None and config[key] != getattr(current, key):
                self.backend.set_volume(name, vol, key, config[key])
        if imported:
            return  # its size comes with its data
        if config["size"] > current.size:
            self.backend.resize_volume(name, vol, config["size"])
        elif config["size"] < current.size:
            self.outcome.warnings.append(
                f"{name}: volume {vol} stays {human_bytes(current.size)}: qubesd does not "
                f"shrink volumes (it was {human_bytes(config['size'])})")

    def _import(self, name: str, vol: str, source: str, info: dict) -> None:
        stream = VolumeStream(self.session, self.keys, f"{source}:{vol}", info,
                              progress=self.progress)
        try:
            self.backend.import_volume(name, vol, stream, info["size"])
        except QbackupError as e:
            if stream.error is None:
                raise
            self.outcome.integrity = True
            raise QbackupError(f"{name}: volume {vol} not restored (qubesd discarded the "
                               f"import): {stream.error}") from e
        finally:
            stream.close()
        if not stream.complete:  # the importer took fewer bytes than it was told
            self.outcome.integrity = stream.error is not None
            raise QbackupError(f"{name}: volume {vol}: the import ended after {stream.bytes} of "
                               f"{stream.size} bytes" + (f": {stream.error}" if stream.error else ""))
        self.outcome.volumes += 1
        self.outcome.bytes += stream.size


def execute(plan: Plan, backend: Backend, session, keys, *, progress=None) -> Outcome:
    """Make every step of `plan` (which must have no problems).

    A failing step marks its qube failed and the restore goes on; a qube
    that could not be created is skipped from then on. A failure to remove
    a qube given with --replace stops everything (QbackupError): nothing of
    the restore has been made yet."""
    if plan.problems:
        raise QbackupError(f"the restore plan has {len(plan.problems)} problems: "
                           f"{plan.problems[0]}")
    return _Executor(plan, backend, session, keys, progress).run()
