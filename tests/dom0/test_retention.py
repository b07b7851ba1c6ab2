# SPDX-License-Identifier: GPL-2.0-or-later
"""Policy tables for qbackup.retention: which snapshots prune keeps, and why.

Times are written as local times with their UTC offset; the periods are
computed in the zone given (Europe/Berlin, whose daylight saving time ends
on 2023-10-29 at 03:00 CEST -> 02:00 CET and starts on 2023-03-26 at 02:00
CET -> 03:00 CEST), so the tables do not depend on the machine's zone.
"""

import datetime
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

import pytest

from qbackup.retention import Policy, Within, parse_within, plan

BERLIN = ZoneInfo("Europe/Berlin")
UTC = datetime.timezone.utc


@dataclass
class S:
    id: bytes
    time: float
    qubes: dict = field(default_factory=lambda: {"work": {}})


def at(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


def snaps(*times: str, qubes=None) -> list[S]:
    """Snapshots 1, 2, ... at these times (ids follow the order given)."""
    return [S(bytes([n + 1]) * 32, at(t), {q: {} for q in (qubes[n] if qubes else ["work"])})
            for n, t in enumerate(times)]


def kept(decisions) -> dict[int, list[str]]:
    """{snapshot number: reasons} of the snapshots kept."""
    return {d.snapshot.id[0]: d.reasons for d in decisions if d.keep}


def test_empty_repository():
    assert plan([], Policy(last=3)) == []


def test_the_newest_is_always_kept():
    s = snaps("2023-05-01T10:00+02:00", "2023-05-02T10:00+02:00")
    assert kept(plan(s, Policy(), tz=BERLIN)) == {2: ["newest"]}


def test_decisions_come_newest_first():
    s = snaps("2023-05-01T10:00+02:00", "2023-05-03T10:00+02:00", "2023-05-02T10:00+02:00")
    assert [d.snapshot.id[0] for d in plan(s, Policy(last=1), tz=BERLIN)] == [2, 3, 1]


def test_keep_last():
    s = snaps(*[f"2023-05-0{d}T10:00+02:00" for d in range(1, 6)])
    assert kept(plan(s, Policy(last=2), tz=BERLIN)) == {5: ["newest", "last"], 4: ["last"]}
    assert len(kept(plan(s, Policy(last=99), tz=BERLIN))) == 5


def test_keep_daily_keeps_the_newest_of_each_day():
    s = snaps("2023-05-01T08:00+02:00", "2023-05-01T20:00+02:00",
              "2023-05-02T08:00+02:00",
              "2023-05-04T08:00+02:00", "2023-05-04T09:00+02:00", "2023-05-04T23:59+02:00")
    # the newest 3 days that have a snapshot: 4th, 2nd, 1st (the 3rd has none)
    assert kept(plan(s, Policy(daily=3), tz=BERLIN)) == {
        6: ["newest", "daily"], 3: ["daily"], 2: ["daily"]}


def test_equal_times_are_ordered_by_id():
    s = snaps("2023-05-01T10:00+02:00", "2023-05-01T10:00+02:00", "2023-05-01T10:00+02:00")
    assert kept(plan(s, Policy(last=1), tz=BERLIN)) == {3: ["newest", "last"]}
    assert kept(plan(s, Policy(daily=5), tz=BERLIN)) == {3: ["newest", "daily"]}


def test_days_are_local_days():
    """23:30 UTC on the 1st is already the 2nd in Berlin."""
    s = snaps("2023-05-01T12:00+00:00", "2023-05-01T23:30+00:00")
    assert kept(plan(s, Policy(daily=2), tz=UTC)) == {2: ["newest", "daily"]}
    assert kept(plan(s, Policy(daily=2), tz=BERLIN)) == {2: ["newest", "daily"], 1: ["daily"]}


def test_the_hour_repeated_when_dst_ends_is_two_hours():
    s = snaps("2023-10-29T02:15+02:00",  # CEST, 00:15 UTC
              "2023-10-29T02:45+02:00",  # CEST, 00:45 UTC
              "2023-10-29T02:15+01:00",  # CET, the same wall-clock hour an hour later
              "2023-10-29T02:45+01:00")
    assert kept(plan(s, Policy(hourly=2), tz=BERLIN)) == {4: ["newest", "hourly"], 2: ["hourly"]}
    # the day it ends on is one (25-hour) day
    assert kept(plan(s, Policy(daily=2), tz=BERLIN)) == {4: ["newest", "daily"]}


def test_the_hour_skipped_when_dst_starts():
    s = snaps("2023-03-26T01:30+01:00", "2023-03-26T03:30+02:00")  # one real hour apart
    assert kept(plan(s, Policy(hourly=2), tz=BERLIN)) == {2: ["newest", "hourly"], 1: ["hourly"]}


def test_weeks_are_iso_weeks_and_years_calendar_years():
    s = snaps("2022-12-31T10:00+01:00",  # Saturday, ISO week 2022-52
              "2023-01-01T10:00+01:00",  # Sunday, still ISO week 2022-52, calendar year 2023
              "2023-01-02T10:00+01:00")  # Monday, ISO week 2023-01
    assert kept(plan(s, Policy(weekly=5), tz=BERLIN)) == {3: ["newest", "weekly"], 2: ["weekly"]}
    assert kept(plan(s, Policy(yearly=5), tz=BERLIN)) == {3: ["newest", "yearly"], 1: ["yearly"]}
    assert kept(plan(s, Policy(monthly=5), tz=BERLIN)) == {3: ["newest", "monthly"], 1: ["monthly"]}


def test_rules_combine_and_every_reason_is_listed():
    s = snaps("2023-01-15T10:00+01:00", "2023-02-15T10:00+01:00", "2023-03-14T10:00+01:00",
              "2023-03-15T09:00+01:00", "2023-03-15T10:00+01:00")
    decisions = plan(s, Policy(last=2, daily=2, monthly=3), tz=BERLIN)
    assert kept(decisions) == {5: ["newest", "last", "daily", "monthly"], 4: ["last"],
                               3: ["daily"], 2: ["monthly"], 1: ["monthly"]}


def test_keep_within_counts_back_from_the_newest_snapshot_not_now():
    s = snaps("2020-01-01T10:00+01:00", "2020-01-05T09:59+01:00", "2020-01-05T10:00+01:00",
              "2020-01-07T10:00+01:00")
    assert kept(plan(s, Policy(within=parse_within("2d")), tz=BERLIN)) == {
        4: ["newest", "within"], 3: ["within"]}


@pytest.mark.parametrize("newest, within, oldest_kept, oldest_gone", [
    ("2024-03-31T12:00+02:00", "1m", "2024-02-29T12:00+01:00", "2024-02-29T11:59+01:00"),
    ("2024-02-29T12:00+01:00", "1y", "2023-02-28T12:00+01:00", "2023-02-28T11:59+01:00"),
    ("2023-05-10T12:00+02:00", "1w2d", "2023-05-01T12:00+02:00", "2023-05-01T11:59+02:00"),
    # across the end of DST: a calendar day is 25 real hours, 24h is 24
    ("2023-10-29T12:00+01:00", "1d", "2023-10-28T12:00+02:00", "2023-10-28T11:59+02:00"),
    ("2023-10-29T12:00+01:00", "24h", "2023-10-28T13:00+02:00", "2023-10-28T12:59+02:00"),
    ("2023-10-29T12:00+01:00", "1d1h", "2023-10-28T11:00+02:00", "2023-10-28T10:59+02:00"),
])
def test_keep_within_calendar_units(newest, within, oldest_kept, oldest_gone):
    s = snaps(oldest_gone, oldest_kept, newest)
    assert kept(plan(s, Policy(within=parse_within(within)), tz=BERLIN)) == {
        3: ["newest", "within"], 2: ["within"]}


def test_keep_within_longer_than_the_calendar_keeps_everything():
    s = snaps("1999-01-01T00:00+00:00", "2023-01-01T00:00+00:00")
    assert len(kept(plan(s, Policy(within=parse_within("99999y")), tz=UTC))) == 2


def test_protected_snapshots_are_always_kept():
    s = snaps(*[f"2023-05-0{d}T10:00+02:00" for d in range(1, 6)])
    decisions = plan(s, Policy(last=1), protected={s[0].id, s[2].id}, tz=BERLIN)
    assert kept(decisions) == {5: ["newest", "last"], 3: ["protected"], 1: ["protected"]}


def test_per_qube_rules_apply_to_each_qube_and_a_snapshot_goes_only_if_no_qube_keeps_it():
    s = snaps("2023-05-01T10:00+02:00",   # 1: work, mail
              "2023-05-02T10:00+02:00",   # 2: work
              "2023-05-03T10:00+02:00",   # 3: work
              "2023-05-04T10:00+02:00",   # 4: mail
              "2023-05-05T10:00+02:00",   # 5: work
              qubes=[["work", "mail"], ["work"], ["work"], ["mail"], ["work"]])
    assert kept(plan(s, Policy(last=2), tz=BERLIN)) == {5: ["newest", "last"], 4: ["last"]}
    assert kept(plan(s, Policy(last=2), per_qube=True, tz=BERLIN)) == {
        5: ["newest", "newest (work)", "last (work)"],
        4: ["newest (mail)", "last (mail)"],
        3: ["last (work)"],
        1: ["last (mail)"]}
    # the newest snapshot of every qube is kept, whatever the rules
    assert kept(plan(s, Policy(daily=1), per_qube=True, tz=BERLIN)) == {
        5: ["newest", "newest (work)", "daily (work)"], 4: ["newest (mail)", "daily (mail)"]}


@pytest.mark.parametrize("text, within", [
    ("7d", Within(days=7)), ("2w", Within(days=14)), ("1y6m", Within(1, 6)), ("36h", Within(hours=36)),
    ("1y1m1w1d1h", Within(1, 1, 8, 1)), ("0d", Within()),
])
def test_parse_within(text, within):
    assert parse_within(text) == within


@pytest.mark.parametrize("text", ["", "7", "d", "7x", "-1d", "1.5d", "7 d", "123456d", "1D"])
def test_parse_within_rejects(text):
    with pytest.raises(ValueError, match="invalid duration"):
        parse_within(text)


def test_policy_empty():
    assert Policy().empty()
    assert not Policy(yearly=1).empty() and not Policy(within=Within()).empty()
