"""Usage insights: what `offload usage` and the dashboard show a user about their own use.

Recent sessions and total time, top 10 images, live sessions, recent stretches of activity, today's
fair-use figures, and this month's usage of each of the user's organisations against its allowance.
Everything is read from the ledger and the sessions table: nothing here writes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session as Db

from offload.core import schemas as s
from offload.server.db.models import LedgerInterval, Membership, OffloadSession, Organization
from offload.server.services import billing, ledger, lifecycle, placement
from offload.server.services.tokens import AuthUser

RECENT = 20
TOP_IMAGES = 10
IMAGE_HISTORY = 200  # sessions the top images are counted over


def _summaries(db: Db, rows: Sequence[OffloadSession], now: datetime) -> list[s.SessionSummary]:
    ids = [row.id for row in rows]
    billed = ledger.sessions_seconds(db, ids, now)
    built = ledger.sessions_build_seconds(db, ids)
    return [_summary(row, billed.get(row.id, 0.0), built.get(row.id, 0.0)) for row in rows]


def _summary(row: OffloadSession, billed_s: float, build_s: float) -> s.SessionSummary:
    return s.SessionSummary(
        id=row.id,
        org=row.org.name,
        state=s.SessionState(row.state),
        instance_type=s.InstanceType(row.instance_type),
        client_name=row.client_name,
        created_at=row.created_at,
        started_at=row.started_at,
        ended_at=row.ended_at,
        billed_s=round(billed_s, 1),
        containers=row.containers_max,
        end_reason=row.end_reason,
        gpu_model=row.gpu_model,
        gpu_devices=placement.session_gpus(row),
        build_s=round(build_s, 1),
    )


def _recent_sessions(db: Db, user_id: str) -> list[OffloadSession]:
    return list(
        db.scalars(
            select(OffloadSession)
            .where(OffloadSession.user_id == user_id)
            .order_by(OffloadSession.created_at.desc(), OffloadSession.id)
            .limit(RECENT)
        )
    )


def _top_images(rows: Sequence[OffloadSession]) -> list[s.ImageUse]:
    counts = Counter(image for row in rows for image in set(row.images))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:TOP_IMAGES]
    return [s.ImageUse(image=image, sessions=n) for image, n in ranked]


def _recent_activity(db: Db, user_id: str, now: datetime) -> list[s.ActivityEntry]:
    rows = db.execute(
        select(LedgerInterval, OffloadSession.containers_max)
        .join(OffloadSession, OffloadSession.id == LedgerInterval.session_id)
        .where(LedgerInterval.user_id == user_id)
        .order_by(LedgerInterval.start.desc(), LedgerInterval.id.desc())
        .limit(RECENT)
    ).all()
    return [
        s.ActivityEntry(
            session_id=interval.session_id,
            start=interval.start,
            duration_s=round(
                ledger.total_seconds([ledger.Interval(interval.start, interval.end)], now), 1
            ),
            containers=containers,
        )
        for interval, containers in rows
    ]


def _total_seconds(db: Db, user_id: str, now: datetime) -> float:
    rows = db.scalars(select(LedgerInterval).where(LedgerInterval.user_id == user_id))
    return ledger.total_seconds((ledger.Interval(r.start, r.end) for r in rows), now)


def _orgs(db: Db, user_id: str) -> list[Organization]:
    return list(
        db.scalars(
            select(Organization)
            .join(Membership, Membership.org_id == Organization.id)
            .where(Membership.user_id == user_id)
            .order_by(Organization.name)
        )
    )


def user_report(db: Db, auth: AuthUser, now: datetime, rules: lifecycle.Rules) -> s.UsageReport:
    recent = _recent_sessions(db, auth.id)
    live = db.scalars(
        select(OffloadSession)
        .where(OffloadSession.user_id == auth.id, OffloadSession.state.in_(lifecycle.LIVE_STATES))
        .order_by(OffloadSession.created_at.desc(), OffloadSession.id)
    ).all()
    image_rows = db.scalars(
        select(OffloadSession)
        .where(OffloadSession.user_id == auth.id)
        .order_by(OffloadSession.created_at.desc(), OffloadSession.id)
        .limit(IMAGE_HISTORY)
    ).all()
    today = ledger.user_day_seconds(db, auth.id, now)
    return s.UsageReport(
        user=auth.username,
        now=now,
        total_billed_s=round(_total_seconds(db, auth.id, now), 1),
        today_billed_s=round(today, 1),
        fair_use_limit_s=rules.fair_use_day_s,
        fair_use_remaining_s=max(0.0, rules.fair_use_day_s - today),
        recent_sessions=_summaries(db, recent, now),
        active_sessions=_summaries(db, live, now),
        top_images=_top_images(image_rows),
        recent_activity=_recent_activity(db, auth.id, now),
        orgs=[billing.usage_view(db, org, now) for org in _orgs(db, auth.id)],
    )
