"""The usage ledger: billed intervals per session, and the totals every limit is measured with.

A session is billed from the moment it becomes active until it goes idle or ends.  When it
resumes within the grace period, its last interval is reopened, so the idle gap is billed too
and the whole stretch reads as one continuous interval.  When grace runs out, the interval stays
closed at the idle moment.

Two layers:
- pure functions on `Interval` lists (open, close, resume; totals over a window, per UTC day,
  per UTC month) that property tests hammer;
- thin database functions that load a session's intervals, apply a pure step and write back,
  always inside the caller's transaction, so state and ledger change together or not at all.

Days and months are UTC: the fair-use counter resets at 00:00 UTC.

An organisation's builder is billed beside its sessions (`BuilderInterval`): the runner reports
each session's builder time as a running total, and the growth is billed as a stretch ending at
the report, at the builder's instance rate.  It counts in the organisation's minutes and spend,
not in the session's billed time or the user's fair-use hours (those measure the session).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import BindParameter, bindparam, or_, select
from sqlalchemy.orm import Session as Db

from offload.core.schemas import InstanceType
from offload.server.db.engine import Columns, execute_columns
from offload.server.db.models import BuilderInterval, LedgerInterval, OffloadSession

# A builder is an ordinary standard environment (offload.runner.builders.BUILDER_SPEC).
BUILDER_INSTANCE_TYPE = InstanceType.STANDARD.value
# Growth below this is left for the next report (no row per heartbeat of a ping).
MIN_BILLED_BUILD_S = 0.5

# ---- pure ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    start: datetime
    end: datetime | None = None  # None: open, billing now

    @property
    def is_open(self) -> bool:
        return self.end is None

    def end_or(self, now: datetime) -> datetime:
        return self.end if self.end is not None else max(now, self.start)


def opened(intervals: Sequence[Interval], at: datetime) -> list[Interval]:
    """Billing starts at `at` (a no-op while an interval is open)."""
    if intervals and intervals[-1].is_open:
        return list(intervals)
    start = max(at, intervals[-1].end_or(at)) if intervals else at  # never overlap the last one
    return [*intervals, Interval(start)]


def closed(intervals: Sequence[Interval], at: datetime) -> list[Interval]:
    """Billing stops at `at` (a no-op when nothing is open)."""
    if not intervals or not intervals[-1].is_open:
        return list(intervals)
    last = intervals[-1]
    return [*intervals[:-1], replace(last, end=max(at, last.start))]


def resumed(intervals: Sequence[Interval]) -> list[Interval]:
    """Billing goes on as if it never stopped: the last interval is reopened (its gap billed)."""
    if not intervals or intervals[-1].is_open:
        return list(intervals)
    return [*intervals[:-1], replace(intervals[-1], end=None)]


def seconds_within(
    intervals: Iterable[Interval], lo: datetime, hi: datetime, now: datetime
) -> float:
    """Billed seconds of `intervals` inside [lo, hi); open intervals count up to `now`."""
    total = 0.0
    for interval in intervals:
        start, end = max(interval.start, lo), min(interval.end_or(now), hi)
        if end > start:
            total += (end - start).total_seconds()
    return total


def total_seconds(intervals: Iterable[Interval], now: datetime) -> float:
    return sum((i.end_or(now) - i.start).total_seconds() for i in intervals)


def utc_day(at: datetime) -> tuple[datetime, datetime]:
    """The UTC day holding `at`, as [start, end)."""
    start = at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return start, start + timedelta(days=1)


def utc_month(at: datetime) -> tuple[datetime, datetime]:
    """The UTC calendar month holding `at`, as [start, end)."""
    start = at.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


def per_utc_day(intervals: Iterable[Interval], now: datetime) -> dict[date, float]:
    """Billed seconds per UTC day (an interval across midnight counts on both days)."""
    days: dict[date, float] = {}
    for interval in intervals:
        cursor, end = interval.start, interval.end_or(now)
        while cursor < end:
            _, day_end = utc_day(cursor)
            piece_end = min(end, day_end)
            key = cursor.astimezone(UTC).date()
            days[key] = days.get(key, 0.0) + (piece_end - cursor).total_seconds()
            cursor = piece_end
    return days


def is_well_formed(intervals: Sequence[Interval]) -> bool:
    """Sorted, non-overlapping, each ending after it starts, only the last one open."""
    for index, interval in enumerate(intervals):
        if interval.is_open and index != len(intervals) - 1:
            return False
        if interval.end is not None and interval.end < interval.start:
            return False
        if index and intervals[index - 1].end_or(interval.start) > interval.start:
            return False
    return True


# ---- database -----------------------------------------------------------------------------------


def _rows(db: Db, session_id: str) -> list[LedgerInterval]:
    return list(
        db.scalars(
            select(LedgerInterval)
            .where(LedgerInterval.session_id == session_id)
            .order_by(LedgerInterval.start, LedgerInterval.id)
        )
    )


# Every answer about a session runs these two: columns, not ORM rows (no identity map to fill),
# in statements built once with bind parameters (building a statement and its cache key costs
# more than SQLite takes to run it).
_SESSION_INTERVALS = (
    select(LedgerInterval.start, LedgerInterval.end)
    .where(LedgerInterval.session_id == bindparam("session_id"))
    .order_by(LedgerInterval.start, LedgerInterval.id)
)


def session_intervals(db: Columns, session_id: str) -> list[Interval]:
    rows = execute_columns(db, _SESSION_INTERVALS, {"session_id": session_id})
    return [Interval(start, end) for start, end in rows]


def _apply(db: Db, session: OffloadSession, new: list[Interval]) -> None:
    """Write `new` over the session's rows: the pure steps only change the last one or append."""
    rows = _rows(db, session.id)
    for row, interval in zip(rows, new, strict=False):
        row.start, row.end = interval.start, interval.end
    for interval in new[len(rows) :]:
        db.add(
            LedgerInterval(
                session_id=session.id,
                user_id=session.user_id,
                org_id=session.org_id,
                instance_type=session.instance_type,
                start=interval.start,
                end=interval.end,
            )
        )
    db.flush()


def start_billing(db: Db, session: OffloadSession, at: datetime) -> None:
    _apply(db, session, opened(session_intervals(db, session.id), at))


def stop_billing(db: Db, session: OffloadSession, at: datetime) -> None:
    _apply(db, session, closed(session_intervals(db, session.id), at))


def resume_billing(db: Db, session: OffloadSession) -> None:
    _apply(db, session, resumed(session_intervals(db, session.id)))


@dataclass(frozen=True)
class Piece:
    """A ledger interval with what pricing needs."""

    session_id: str
    instance_type: str
    interval: Interval


_When = datetime | BindParameter[datetime]  # a bound value, or a parameter of a prebuilt statement


def _overlapping(lo: _When, hi: _When):  # type: ignore[no-untyped-def]
    return (LedgerInterval.start < hi) & or_(LedgerInterval.end.is_(None), LedgerInterval.end > lo)


_USER_PIECES = (
    select(
        LedgerInterval.session_id,
        LedgerInterval.instance_type,
        LedgerInterval.start,
        LedgerInterval.end,
    )
    .where(
        LedgerInterval.user_id == bindparam("user_id"),
        _overlapping(
            bindparam("lo", type_=LedgerInterval.start.type),
            bindparam("hi", type_=LedgerInterval.start.type),
        ),
    )
    .order_by(LedgerInterval.start)
)


def user_pieces(db: Columns, user_id: str, lo: datetime, hi: datetime) -> list[Piece]:
    rows = execute_columns(db, _USER_PIECES, {"user_id": user_id, "lo": lo, "hi": hi})
    return [Piece(sid, kind, Interval(start, end)) for sid, kind, start, end in rows]


def org_pieces(db: Db, org_id: str, lo: datetime, hi: datetime) -> list[Piece]:
    """What the organisation is billed for: its sessions' time and its builder's time."""
    columns = (LedgerInterval.session_id, LedgerInterval.instance_type)
    rows = db.execute(
        select(*columns, LedgerInterval.start, LedgerInterval.end)
        .where(LedgerInterval.org_id == org_id, _overlapping(lo, hi))
        .order_by(LedgerInterval.start)
    )
    pieces = [Piece(sid, kind, Interval(start, end)) for sid, kind, start, end in rows]
    builds = db.execute(
        select(
            BuilderInterval.session_id,
            BuilderInterval.instance_type,
            BuilderInterval.start,
            BuilderInterval.end,
        ).where(
            BuilderInterval.org_id == org_id, BuilderInterval.start < hi, BuilderInterval.end > lo
        )
    )
    pieces += [Piece(sid, kind, Interval(start, end)) for sid, kind, start, end in builds]
    return sorted(pieces, key=lambda piece: piece.interval.start)


def bill_builder_time(db: Db, session: OffloadSession, total_s: float, now: datetime) -> None:
    """The runner's running total of the session's builder time grew: bill the growth, as a
    stretch ending now (a retried report, or a smaller total after a runner restart: nothing)."""
    growth = total_s - session.build_seconds_billed
    if growth < MIN_BILLED_BUILD_S:
        return
    db.add(
        BuilderInterval(
            session_id=session.id,
            org_id=session.org_id,
            instance_type=BUILDER_INSTANCE_TYPE,
            start=now - timedelta(seconds=growth),
            end=now,
        )
    )
    session.build_seconds_billed = total_s


def sessions_build_seconds(db: Db, session_ids: Sequence[str]) -> dict[str, float]:
    """Builder seconds of each session (one query for a page of sessions); none: absent."""
    rows = db.execute(
        select(BuilderInterval.session_id, BuilderInterval.start, BuilderInterval.end).where(
            BuilderInterval.session_id.in_(session_ids)
        )
    )
    seconds: dict[str, float] = {}
    for session_id, start, end in rows:
        seconds[session_id] = seconds.get(session_id, 0.0) + (end - start).total_seconds()
    return seconds


def user_day_seconds(db: Columns, user_id: str, now: datetime) -> float:
    """The user's billed seconds in the UTC day of `now`, across sessions and organisations."""
    lo, hi = utc_day(now)
    pieces = user_pieces(db, user_id, lo, hi)
    return seconds_within((p.interval for p in pieces), lo, hi, now)


_DAY_PIECES = (
    select(LedgerInterval.user_id, LedgerInterval.start, LedgerInterval.end)
    .where(
        _overlapping(
            bindparam("lo", type_=LedgerInterval.start.type),
            bindparam("hi", type_=LedgerInterval.start.type),
        )
    )
    .order_by(LedgerInterval.start)
)
_USERS_DAY_PIECES = _DAY_PIECES.where(
    LedgerInterval.user_id.in_(bindparam("user_ids", expanding=True))
)


def day_seconds_by_user(
    db: Columns, now: datetime, user_ids: Collection[str] | None = None
) -> dict[str, float]:
    """Each user's billed seconds in the UTC day of `now`, every user's or those of `user_ids`
    (one query: the lifecycle tick and the activity lane ask for many at once); users with none
    are absent."""
    lo, hi = utc_day(now)
    if user_ids is None:
        rows = execute_columns(db, _DAY_PIECES, {"lo": lo, "hi": hi})
    else:
        params = {"lo": lo, "hi": hi, "user_ids": list(user_ids)}
        rows = execute_columns(db, _USERS_DAY_PIECES, params)
    by_user: dict[str, list[Interval]] = {}
    for user_id, start, end in rows:
        by_user.setdefault(user_id, []).append(Interval(start, end))
    return {user: seconds_within(found, lo, hi, now) for user, found in by_user.items()}


def session_seconds(db: Columns, session_id: str, now: datetime) -> float:
    return total_seconds(session_intervals(db, session_id), now)


_SESSIONS_INTERVALS = (
    select(LedgerInterval.session_id, LedgerInterval.start, LedgerInterval.end)
    .where(LedgerInterval.session_id.in_(bindparam("session_ids", expanding=True)))
    .order_by(LedgerInterval.start, LedgerInterval.id)
)


def sessions_seconds(db: Columns, session_ids: Sequence[str], now: datetime) -> dict[str, float]:
    """Billed seconds of each session (one query for a page of sessions); none: absent."""
    by_session: dict[str, list[Interval]] = {}
    rows = execute_columns(db, _SESSIONS_INTERVALS, {"session_ids": list(session_ids)})
    for session_id, start, end in rows:
        by_session.setdefault(session_id, []).append(Interval(start, end))
    return {sid: total_seconds(intervals, now) for sid, intervals in by_session.items()}
