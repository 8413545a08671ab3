"""What the dashboard shows a user beyond `usage.user_report`: the page frame (who, which
organisations, an open prompt), daily usage for the chart, and their sessions page by page.
Read only."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session as Db

from offload.core import schemas as s
from offload.server.db.models import OffloadSession, User
from offload.server.services import accounts, ledger, lifecycle, org_settings, sessions
from offload.server.services.tokens import AuthUser

PAGE_SIZE = 20


@dataclass(frozen=True)
class OpenPrompt:
    session_id: str
    prompt: s.Prompt


@dataclass(frozen=True)
class Frame:
    """What every page's layout needs."""

    user: s.UserInfo
    prompt: OpenPrompt | None

    def owns(self, org: str) -> bool:
        return any(m.name == org and m.role is s.Role.OWNER for m in self.user.orgs)

    @property
    def owned_orgs(self) -> list[str]:
        return [m.name for m in self.user.orgs if m.role is s.Role.OWNER]


@dataclass(frozen=True)
class DayUsage:
    day: date
    seconds: float


@dataclass(frozen=True)
class SessionRow:
    id: str
    org: str
    state: s.SessionState
    started: datetime  # started_at, else created_at (a session that never became active)
    ended: datetime | None
    billed_s: float
    containers: int
    images: list[str]


@dataclass(frozen=True)
class Page:
    rows: list[SessionRow]
    number: int  # 1-based
    pages: int
    total: int


def frame(db: Db, auth: AuthUser, now: datetime, rules: lifecycle.Rules) -> Frame:
    user = db.get_one(User, auth.id)
    live = sessions.live_session_of(db, auth.id)
    prompt = None
    if live is not None and live.prompt_id:
        info = sessions.session_info(db, live, now, rules)
        if info.prompt is not None:
            prompt = OpenPrompt(live.id, info.prompt)
    return Frame(accounts.user_info(db, user), prompt)


def daily_usage(db: Db, user_id: str, now: datetime, days: int = 14) -> list[DayUsage]:
    """Billed seconds per UTC day over the last `days` days, today included, zeros kept."""
    first = ledger.utc_day(now)[0] - timedelta(days=days - 1)
    pieces = ledger.user_pieces(db, user_id, first, now + timedelta(seconds=1))
    return fill_days(
        ledger.per_utc_day((p.interval for p in pieces), now), first.date(), now.date()
    )


def fill_days(per_day: dict[date, float], first: date, last: date) -> list[DayUsage]:
    out = []
    day = first
    while day <= last:
        out.append(DayUsage(day, per_day.get(day, 0.0)))
        day += timedelta(days=1)
    return out


def session_row(db: Db, row: OffloadSession, now: datetime) -> SessionRow:
    return SessionRow(
        id=row.id,
        org=row.org.name,
        state=s.SessionState(row.state),
        started=row.started_at or row.created_at,
        ended=row.ended_at,
        billed_s=ledger.session_seconds(db, row.id, now),
        containers=row.containers_max,
        images=list(row.images),
    )


def sessions_page(db: Db, auth: AuthUser, now: datetime, number: int) -> Page:
    total = (
        db.scalar(
            select(func.count())
            .select_from(OffloadSession)
            .where(OffloadSession.user_id == auth.id)
        )
        or 0
    )
    pages = max(1, -(-total // PAGE_SIZE))
    number = min(max(1, number), pages)
    rows = db.scalars(
        select(OffloadSession)
        .where(OffloadSession.user_id == auth.id)
        .order_by(OffloadSession.created_at.desc(), OffloadSession.id)
        .offset((number - 1) * PAGE_SIZE)
        .limit(PAGE_SIZE)
    )
    return Page([session_row(db, row, now) for row in rows], number, pages, total)


@dataclass(frozen=True)
class PersonalSettings:
    settings: s.UserSettings
    orgs: list[s.OrgMembership]
    # The default organisation's access state, which decides what the personal switch means.
    access: s.OffloadAccess | None
    member_choice: bool


def personal_settings(db: Db, auth: AuthUser) -> PersonalSettings:
    user = db.get_one(User, auth.id)
    policy = org_settings.policy_of(db, user.default_org) if user.default_org else None
    return PersonalSettings(
        settings=org_settings.user_settings(db, auth),
        orgs=accounts.memberships(db, user),
        access=policy.offload_access if policy else None,
        member_choice=policy.member_choice if policy else False,
    )
