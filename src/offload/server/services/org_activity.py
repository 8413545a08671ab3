"""Organisation activity for owners: totals over a chosen period, billed time per day, and the
sessions as CSV rows.  Read only; days are UTC like the ledger's."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session as Db

from offload.core import schemas as s
from offload.core.errors import InvalidInput
from offload.server.db.models import OffloadSession, Organization
from offload.server.services import billing, ledger, org_members
from offload.server.services.dashboard import DayUsage, fill_days
from offload.server.services.tokens import AuthUser

DEFAULT_DAYS = 30
MAX_DAYS = 366
CSV_COLUMNS = (
    "session_id",
    "user",
    "images",
    "start",
    "end",
    "duration_s",
    "status",
    "containers",
)
# A cell starting with one of these is a formula to a spreadsheet: neutralise it.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class Period:
    """Whole UTC days, `first` to `last` included."""

    first: date
    last: date

    @property
    def start(self) -> datetime:
        return datetime.combine(self.first, time(), UTC)

    @property
    def end(self) -> datetime:
        return datetime.combine(self.last + timedelta(days=1), time(), UTC)

    @property
    def days(self) -> int:
        return (self.last - self.first).days + 1


def _parse_day(text: str | None, name: str) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidInput(
            f"The {name} date {text[:20]!r} is not a date.", "Use YYYY-MM-DD, e.g. 2025-01-31."
        ) from None


def period_of(first: str | None, last: str | None, now: datetime) -> Period:
    """The period asked for; by default the last 30 days, today included."""
    today = now.astimezone(UTC).date()
    end = _parse_day(last, "end") or today
    start = _parse_day(first, "start") or end - timedelta(days=DEFAULT_DAYS - 1)
    if start > end:
        raise InvalidInput("The period starts after it ends.", "Pick a start on or before the end.")
    if (end - start).days + 1 > MAX_DAYS:
        raise InvalidInput(f"The period is longer than {MAX_DAYS} days.", "Pick a shorter period.")
    return Period(start, end)


@dataclass(frozen=True)
class OrgSession:
    id: str
    user: str
    images: list[str]
    start: datetime
    end: datetime | None
    duration_s: float
    status: str
    containers: int


@dataclass(frozen=True)
class OrgActivity:
    period: Period
    sessions: int
    total_s: float  # billed time of the sessions started in the period
    average_s: float
    unique_images: int
    unique_users: int
    daily: list[DayUsage]  # billed time per day inside the period, all sessions


def org_sessions(db: Db, org: Organization, period: Period, now: datetime) -> list[OrgSession]:
    """Sessions created in the period, oldest first."""
    rows = db.scalars(
        select(OffloadSession)
        .where(
            OffloadSession.org_id == org.id,
            OffloadSession.created_at >= period.start,
            OffloadSession.created_at < period.end,
        )
        .order_by(OffloadSession.created_at, OffloadSession.id)
    )
    return [
        OrgSession(
            id=row.id,
            user=row.user.username,
            images=sorted(row.images),
            start=row.started_at or row.created_at,
            end=row.ended_at,
            duration_s=ledger.session_seconds(db, row.id, now),
            status=row.state,
            containers=row.containers_max,
        )
        for row in rows
    ]


def activity(db: Db, org: Organization, period: Period, now: datetime) -> OrgActivity:
    found = org_sessions(db, org, period, now)
    total = sum(item.duration_s for item in found)
    pieces = ledger.org_pieces(db, org.id, period.start, period.end)
    per_day = ledger.per_utc_day((p.interval for p in pieces), now)
    return OrgActivity(
        period=period,
        sessions=len(found),
        total_s=total,
        average_s=total / len(found) if found else 0.0,
        unique_images=len({image for item in found for image in item.images}),
        unique_users=len({item.user for item in found}),
        daily=fill_days(per_day, period.first, min(period.last, now.astimezone(UTC).date())),
    )


def _cell(value: str) -> str:
    return "'" + value if value.startswith(_FORMULA_START) else value


def _iso(moment: datetime | None) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z") if moment else ""


def csv_lines(items: Iterable[OrgSession]) -> Iterator[str]:
    """The CSV export, header first, one string per row (RFC 4180 quoting, CRLF)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def take(row: Iterable[str]) -> str:
        writer.writerow(row)
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return text

    yield take(CSV_COLUMNS)
    for item in items:
        yield take(
            [
                item.id,
                _cell(item.user),
                _cell(" ".join(item.images)),
                _iso(item.start),
                _iso(item.end),
                f"{item.duration_s:.0f}",
                item.status,
                str(item.containers),
            ]
        )


@dataclass(frozen=True)
class MonthDay:
    day: date
    used_minutes: float
    spent_cents: float  # on-demand spend so far this month, at the end of the day


def month_by_day(db: Db, org: Organization, now: datetime) -> list[MonthDay]:
    """This UTC month day by day: minutes used, and the on-demand spend as it grew (priced by
    `billing.standing` at each day's end, so it matches what the limits see)."""
    month_start, _ = ledger.utc_month(now)
    terms = billing.terms_of(db, org)
    lo = terms.history_start(now) if terms.metered else month_start
    pieces = ledger.org_pieces(db, org.id, lo, now + timedelta(seconds=1))
    per_day = ledger.per_utc_day((p.interval for p in pieces), now)
    out = []
    for item in fill_days(per_day, month_start.date(), now.astimezone(UTC).date()):
        day_end = datetime.combine(item.day + timedelta(days=1), time(), UTC)
        at = min(now, day_end - timedelta(microseconds=1))
        spent = billing.standing(terms, pieces, at).on_demand_spent_cents if terms.metered else 0.0
        out.append(MonthDay(item.day, item.seconds / 60, spent))
    return out


# ---- owners' requests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BillingPage:
    terms: s.OrgBilling
    month: s.OrgUsage
    days: list[MonthDay]


def owner_activity(
    db: Db, auth: AuthUser, org_name: str, first: str | None, last: str | None, now: datetime
) -> OrgActivity:
    org = org_members.require_owner(db, auth.id, org_name, "its activity")
    return activity(db, org, period_of(first, last, now), now)


def owner_sessions(
    db: Db, auth: AuthUser, org_name: str, first: str | None, last: str | None, now: datetime
) -> tuple[Period, list[OrgSession]]:
    org = org_members.require_owner(db, auth.id, org_name, "its activity")
    period = period_of(first, last, now)
    return period, org_sessions(db, org, period, now)


def owner_billing(db: Db, auth: AuthUser, org_name: str, now: datetime) -> BillingPage:
    org = org_members.require_owner(db, auth.id, org_name, "its billing")
    return BillingPage(
        billing.billing_view(db, org, now),
        billing.usage_view(db, org, now),
        month_by_day(db, org, now),
    )
