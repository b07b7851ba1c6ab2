# SPDX-License-Identifier: GPL-2.0-or-later
"""Backup jobs: `/etc/qbackup/jobs.toml`, which qubes a job selects, and what
`qbackup check` says about it (docs/JOBS.md).

A job names its backup qube and repository, the qubes it includes and
excludes (by name, `@tag:TAG`, `@type:CLASS` or `@all`, the selectors of
qrexec policy files), and its options. `select()` turns a job and the qubes of
the system into the qubes included and not included, each with the rule that
decided; `review()` lists what the user must know before the job runs:
errors (the job is refused) and warnings (it runs).

The jobs file is dom0's own configuration (root's), still parsed strictly:
every mistake is one line naming the file, the line and what is wrong.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qbackup.errors import QbackupError
from qbackup.qubes import QubeInfo, volumes_to_backup
from qbackup.transport import QUBE_NAME_RE, REPO_NAME_RE

JOB_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
# Qubes tags: qubes/vm/__init__.py Tags.validate_tag.
TAG_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
CLASSES = ("AppVM", "TemplateVM", "StandaloneVM", "DispVM", "AdminVM")
# Properties naming a qube an included qube needs on restore.
DEPENDENCY_PROPERTIES = ("template", "netvm", "default_dispvm", "audiovm", "guivm",
                         "management_dispvm")
JOB_KEYS = {"backup_vm": str, "repo": str, "include": list, "exclude": list,
            "passphrase_file": str, "live": bool}
TYPE_NAMES = {str: "string", list: "list", bool: "boolean (true or false)"}
MAX_FILE = 1 << 20


class JobError(QbackupError):
    """The jobs file is wrong, or names a job that is not there."""


@dataclass(frozen=True)
class Job:
    name: str
    backup_vm: str
    repo: str
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    passphrase_file: str | None = None
    live: bool = False  # running qubes: a crash-consistent copy of what they wrote (--live)


def _line_of(text: str, table: str, key: str | None = None) -> int:
    """The line of `[table]` (or of `key = ` inside it), 1-based; 0 if not
    found (the value was written in another form tomllib also accepts)."""
    header = re.compile(r"\s*\[\s*" + r"\s*\.\s*".join(
        re.escape(p) if re.fullmatch(r"[A-Za-z0-9_-]+", p) else f"[\"']{re.escape(p)}[\"']"
        for p in table.split(".")) + r"\s*\]\s*(#.*)?")
    in_table, found = False, 0
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(r"\s*\[", line):
            in_table = bool(header.fullmatch(line))
            if in_table and key is None:
                return number
            continue
        if in_table and key is not None and re.match(
                r"\s*[\"']?" + re.escape(key) + r"[\"']?\s*=", line):
            found = found or number
    return found


def _top_line(text: str, key: str) -> int:
    """The first line defining top-level `key` (as `key = `, `key.x = ` or in
    a `[key...]` header), 1-based; 1 if not found."""
    name = r"[\"']?" + re.escape(key) + r"[\"']?"
    pattern = re.compile(r"\s*(\[\[?\s*" + name + r"\s*[.\]]|" + name + r"\s*[.=])")
    in_table = False
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line) and (line.lstrip().startswith("[") or not in_table):
            return number
        if re.match(r"\s*\[", line):
            in_table = True
    return 1


def _selector_ok(selector: Any) -> bool:
    if not isinstance(selector, str):
        return False
    if selector == "@all":
        return True
    if selector.startswith("@tag:"):
        return bool(TAG_RE.fullmatch(selector[5:]))
    if selector.startswith("@type:"):
        return selector[6:] in CLASSES
    return bool(QUBE_NAME_RE.fullmatch(selector))


def parse_jobs(text: str, path: str) -> dict[str, Job]:
    """The jobs of a jobs file's `text`; JobError naming the line otherwise."""
    import tomllib  # here: its regular expressions take a while to compile
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise JobError(f"{path}: {e}") from None

    def fail(line: int, message: str) -> JobError:
        return JobError(f"{path}:{line}: {message}" if line else f"{path}: {message}")

    unknown = sorted(set(doc) - {"jobs"})
    if unknown:
        raise fail(_top_line(text, unknown[0]),
                   f"unknown table or key {unknown[0]!r} (jobs go in [jobs.NAME])")
    tables = doc.get("jobs", {})
    if not isinstance(tables, dict):
        raise fail(1, "'jobs' must be a table of [jobs.NAME] tables")
    jobs = {}
    for name, table in tables.items():
        where = _line_of(text, f"jobs.{name}")
        if not JOB_NAME_RE.fullmatch(name):
            raise fail(where, f"invalid job name {name!r}: lower-case letters, digits, "
                       "'_', '-', at most 32")
        if not isinstance(table, dict):
            raise fail(where, f"job {name!r} must be a table ([jobs.{name}])")
        for key, value in table.items():
            line = _line_of(text, f"jobs.{name}", key) or where
            if key not in JOB_KEYS:
                raise fail(line, f"job {name!r}: unknown key {key!r} (known: "
                           f"{', '.join(sorted(JOB_KEYS))})")
            if not isinstance(value, JOB_KEYS[key]):
                raise fail(line, f"job {name!r}: {key} must be a "
                           f"{TYPE_NAMES[JOB_KEYS[key]]}")
        line = lambda key: _line_of(text, f"jobs.{name}", key) or where  # noqa: E731
        if "backup_vm" not in table:
            raise fail(where, f"job {name!r} has no backup_vm")
        if not QUBE_NAME_RE.fullmatch(table["backup_vm"]) or table["backup_vm"] == "dom0":
            raise fail(line("backup_vm"), f"job {name!r}: invalid backup qube name "
                       f"{table['backup_vm']!r}")
        repo = table.get("repo", name)
        if not REPO_NAME_RE.fullmatch(repo) or ".." in repo:
            raise fail(line("repo"), f"job {name!r}: invalid repository name {repo!r}")
        if not table.get("include"):
            raise fail(line("include"), f"job {name!r} includes nothing: set include = "
                       "[QUBE, \"@tag:TAG\", \"@type:CLASS\" or \"@all\"]")
        for key in ("include", "exclude"):
            for selector in table.get(key, []):
                if not _selector_ok(selector):
                    raise fail(line(key), f"job {name!r}: invalid {key} entry "
                               f"{selector!r} (a qube name, \"@tag:TAG\", \"@type:CLASS\" "
                               "or \"@all\")")
        if "@all" in table.get("exclude", []):
            raise fail(line("exclude"), f"job {name!r}: \"@all\" cannot be excluded")
        passphrase_file = table.get("passphrase_file")
        if passphrase_file is not None and not os.path.isabs(passphrase_file):
            raise fail(line("passphrase_file"), f"job {name!r}: passphrase_file must be "
                       "an absolute path")
        jobs[name] = Job(name=name, backup_vm=table["backup_vm"], repo=repo,
                         include=tuple(table["include"]),
                         exclude=tuple(table.get("exclude", [])),
                         passphrase_file=passphrase_file, live=table.get("live", False))
    return jobs


def load_jobs(path: str) -> dict[str, Job]:
    """The jobs of the file at `path` ({} if it does not exist)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except FileNotFoundError:
        return {}
    if len(data) > MAX_FILE:
        raise JobError(f"{path}: larger than {MAX_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise JobError(f"{path}:{line}: not UTF-8") from None
    return parse_jobs(text, path)


def get_job(name: str, path: str) -> Job:
    jobs = load_jobs(path)
    if name not in jobs:
        known = ", ".join(sorted(jobs)) or f"none: {path} has no jobs"
        raise JobError(f"no job {name!r} (jobs: {known})")
    return jobs[name]


def check_passphrase_file(path: str) -> None:
    """A job's passphrase file must be a regular file only root can read
    (owned by root, no group or other permissions), not a symlink."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError as e:
        raise JobError(f"passphrase file {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise JobError(f"passphrase file {path} is not a regular file")
    if st.st_uid != 0 or st.st_mode & 0o077:
        raise JobError(f"passphrase file {path} must be owned by root with mode 0600 or "
                       f"0400 (it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")


# -- selection ---------------------------------------------------------------

@dataclass(frozen=True)
class Selection:
    """Which qubes a job includes, each with the rule that included it, and
    which it does not, each with why."""
    included: dict[str, str]
    not_included: dict[str, str]


def _matches(selector: str, qube: QubeInfo) -> bool:
    if selector == "@all":
        return True
    if selector.startswith("@tag:"):
        return selector[5:] in qube.tags
    if selector.startswith("@type:"):
        return qube.klass == selector[6:]
    return qube.name == selector


def select(job: Job, qubes: list[QubeInfo]) -> Selection:
    """The job's qubes: those an include rule matches and no exclude rule
    does; never the job's backup qube (its private volume holds the
    repository). The first matching rule is given as the reason."""
    included, not_included = {}, {}
    for qube in sorted(qubes, key=lambda q: q.name):
        include = next((s for s in job.include if _matches(s, qube)), None)
        exclude = next((s for s in job.exclude if _matches(s, qube)), None)
        if qube.name == job.backup_vm:
            not_included[qube.name] = "the backup qube (it holds the repository)"
        elif include is None:
            not_included[qube.name] = "not selected"
        elif exclude is not None:
            not_included[qube.name] = f"excluded by {exclude}"
        else:
            included[qube.name] = "named" if include == qube.name else include
    return Selection(included, not_included)


@dataclass
class Review:
    """What `qbackup check` says about a job."""
    selection: Selection
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    volumes: int = 0
    bytes_total: int = 0      # virtual size of the volumes backed up
    bytes_used: int = 0       # what they hold (allocated), as Qubes reports it


def review(job: Job, qubes: list[QubeInfo]) -> Review:
    """Errors (the job is refused) and warnings (it runs) for `job` on these
    qubes, before anything is read: names the job gives that do not exist,
    dependencies left out, running qubes, volumes that cannot be read
    consistently; and the size of what would be backed up."""
    by_name = {q.name: q for q in qubes}
    result = Review(select(job, qubes))
    if job.backup_vm not in by_name:
        result.errors.append(f"backup qube {job.backup_vm} does not exist")
    for key, selectors in (("include", job.include), ("exclude", job.exclude)):
        for selector in selectors:
            if not selector.startswith("@") and selector not in by_name:
                result.errors.append(f"{key} names {selector}, which does not exist")
            elif selector.startswith("@") and not any(_matches(selector, q) for q in qubes):
                result.warnings.append(f"{key} rule {selector} matches no qube")
    if job.backup_vm in job.include:
        result.errors.append(f"the job includes its own backup qube {job.backup_vm}")
    if not result.selection.included:
        result.errors.append("the job includes no qube")
    for name in result.selection.included:
        qube = by_name[name]
        for prop in DEPENDENCY_PROPERTIES:
            dep = qube.properties.get(prop)
            if isinstance(dep, str) and dep and dep != "dom0" and \
                    dep not in result.selection.included:
                result.warnings.append(f"{name} uses {dep} as its {prop}, which the job "
                                       "does not include")
        if qube.running:
            result.warnings.append(_running(job, qube))
        for vol in volumes_to_backup(qube):
            if vol.path is None:
                result.errors.append(f"{name}: volume {vol.name} cannot be read: "
                                     f"{vol.unreadable}")
            result.volumes += 1
            result.bytes_total += vol.size
            result.bytes_used += vol.usage
    if job.passphrase_file is not None:
        try:
            check_passphrase_file(job.passphrase_file)
        except JobError as e:
            result.errors.append(str(e))
    return result


def _running(job: Job, qube: QubeInfo) -> str:
    """What a backup takes of a running qube (docs/CHANGES.md §2): without
    `live`, its volumes as they were at its last shutdown; with it, a
    crash-consistent copy of what it has written so far, for each volume
    whose pool has one (the others: as at the last shutdown)."""
    volumes = [v for v in volumes_to_backup(qube) if v.path is not None]
    live = [v.name for v in volumes if job.live and v.live_path is not None]
    shutdown = [v.name for v in volumes if v.name not in live]
    if not job.live:
        return (f"{qube.name} is running: it is backed up as it was at its last shutdown, "
                "without what it wrote since (live = true backs up a crash-consistent copy "
                "of that)")
    parts = []
    if live:
        parts.append(f"{', '.join(live)} backed up live: a crash-consistent copy of what it "
                     "has written so far, as after a power cut")
    if shutdown:
        parts.append(f"{', '.join(shutdown)} as it was at its last shutdown (its pool has "
                     "no live copy)")
    return f"{qube.name} is running: {'; '.join(parts)}"


def state_path(state_dir: str, job: str) -> Path:
    """Where the outcome of a job's last run is kept."""
    return Path(state_dir) / "jobs" / f"{job}.json"
