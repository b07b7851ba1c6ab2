# SPDX-License-Identifier: GPL-2.0-or-later
"""Retention: which snapshots `qbackup prune` keeps, and the rules that keep each.

Pure policy over authenticated snapshot times and qubes (dom0 decides; the
backup qube only deletes what it is told). Snapshots are ordered newest
first by (time, id). Rules, as in restic and borg:

- last N: the N newest snapshots;
- hourly/daily/weekly/monthly/yearly N: for the N newest periods that have
  a snapshot, the newest snapshot of each. Periods are calendar periods in
  dom0's local time (or `tz`): weeks are ISO weeks (Monday first); hours are
  real hours, so the hour repeated when daylight saving time ends counts as
  two hours, and the day it ends on is one (25-hour) day;
- within DURATION: every snapshot at most DURATION older than the newest
  snapshot (not than now: a repository whose backups stopped is not
  emptied); DURATION is a sequence of NUMBER UNIT with units y, m, w, d
  (calendar years, months, weeks, days of local time) and h (real hours);
- protected snapshots, and the newest snapshot, are always kept.

Per qube, the rules apply to each qube's own timeline (the snapshots that
hold it), and a snapshot is deleted only if no qube in it keeps it, since a
snapshot can only be deleted whole; the newest snapshot of each qube is
always kept. See docs/CLI.md (prune).
"""

from __future__ import annotations

import calendar
import datetime
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

PERIODS = ("hourly", "daily", "weekly", "monthly", "yearly")
_DURATION = re.compile(r"(?:[0-9]{1,5}[ymwdh])+")
_PART = re.compile(r"([0-9]+)([ymwdh])")


class Dated(Protocol):
    id: bytes
    time: float
    qubes: dict


@dataclass(frozen=True)
class Within:
    years: int = 0
    months: int = 0
    days: int = 0     # weeks count as 7 days
    hours: int = 0

    def cutoff(self, newest: float, tz: datetime.tzinfo | None = None) -> float:
        """The oldest time kept: `newest` less this duration (calendar units in
        local time, hours in real time)."""
        local = datetime.datetime.fromtimestamp(newest, tz)
        months = local.year * 12 + local.month - 1 - self.years * 12 - self.months
        year, month = months // 12, months % 12 + 1
        try:
            day = min(local.day, calendar.monthrange(year, month)[1])
            wall = local.replace(year=year, month=month, day=day) - datetime.timedelta(days=self.days)
            return wall.timestamp() - self.hours * 3600
        except (ValueError, OverflowError, OSError):  # before year 1, or before the epoch
            return float("-inf")


def parse_within(text: str) -> Within:
    """`1y6m`, `2w`, `36h`, ... (ValueError if not)."""
    if not _DURATION.fullmatch(text):
        raise ValueError(f"invalid duration {text!r} (examples: 7d, 2w, 6m, 1y6m, 36h)")
    amounts = {"y": 0, "m": 0, "w": 0, "d": 0, "h": 0}
    for number, unit in _PART.findall(text):
        amounts[unit] += int(number)
    return Within(amounts["y"], amounts["m"], amounts["d"] + 7 * amounts["w"], amounts["h"])


@dataclass
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Within | None = None

    def empty(self) -> bool:
        return self.within is None and not any(
            getattr(self, rule) for rule in ("last",) + PERIODS)


@dataclass
class Decision:
    snapshot: Dated
    reasons: list[str] = field(default_factory=list)  # empty: the snapshot goes

    @property
    def keep(self) -> bool:
        return bool(self.reasons)


def _period(t: float, rule: str, tz: datetime.tzinfo | None) -> tuple:
    local = datetime.datetime.fromtimestamp(t, tz)
    if rule == "hourly":  # fold tells the two real hours of a repeated wall-clock hour apart
        return local.year, local.month, local.day, local.hour, local.fold
    if rule == "daily":
        return local.year, local.month, local.day
    if rule == "weekly":
        return tuple(local.isocalendar())[:2]
    if rule == "monthly":
        return local.year, local.month
    return (local.year,)


def _keep(timeline: Sequence[Dated], policy: Policy, tz: datetime.tzinfo | None
          ) -> Iterable[tuple[bytes, str]]:
    """(snapshot id, rule) for every rule that keeps a snapshot of `timeline`
    (newest first)."""
    if not timeline:
        return
    yield timeline[0].id, "newest"
    for snap in timeline[:policy.last]:
        yield snap.id, "last"
    for rule in PERIODS:
        wanted, periods = getattr(policy, rule), set()
        for snap in timeline:
            if len(periods) >= wanted:
                break
            period = _period(snap.time, rule, tz)
            if period not in periods:
                periods.add(period)
                yield snap.id, rule
    if policy.within is not None:
        cutoff = policy.within.cutoff(timeline[0].time, tz)
        for snap in timeline:
            if snap.time >= cutoff:
                yield snap.id, "within"


def plan(snapshots: Sequence[Dated], policy: Policy, protected: Collection[bytes] = (), *,
         per_qube: bool = False, tz: datetime.tzinfo | None = None) -> list[Decision]:
    """Which snapshots to keep, and why: one Decision per snapshot, newest first.

    `tz` None means dom0's local time zone."""
    ordered = sorted(snapshots, key=lambda s: (s.time, s.id), reverse=True)
    decisions = {s.id: Decision(s) for s in ordered}
    if ordered:
        decisions[ordered[0].id].reasons.append("newest")
    for snap in ordered:
        if snap.id in protected:
            decisions[snap.id].reasons.append("protected")
    if per_qube:
        qubes = sorted({q for s in ordered for q in s.qubes})
        timelines = [([s for s in ordered if q in s.qubes], f" ({q})") for q in qubes]
    else:
        timelines = [(ordered, "")]
    for timeline, suffix in timelines:
        for snap_id, rule in _keep(timeline, policy, tz):
            reason = rule + suffix
            if reason not in decisions[snap_id].reasons:
                decisions[snap_id].reasons.append(reason)
    return [decisions[s.id] for s in ordered]
