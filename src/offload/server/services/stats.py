"""Counts for the Prometheus endpoint (and, later, the dashboard)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session as Db

from offload.core.schemas import SessionState
from offload.server.db.models import OffloadSession, Runner
from offload.server.services.placement import online_since


@dataclass(frozen=True)
class Snapshot:
    sessions_by_state: dict[str, int]
    runners_registered: int
    runners_online: int
    warm_environments: int


def snapshot(db: Db, now: datetime, runner_timeout_s: float) -> Snapshot:
    counts = {state.value: 0 for state in SessionState}
    for state, n in db.execute(
        select(OffloadSession.state, func.count()).group_by(OffloadSession.state)
    ).all():
        counts[state] = n
    online = Runner.last_heartbeat_at >= online_since(now, runner_timeout_s)
    return Snapshot(
        sessions_by_state=counts,
        runners_registered=db.scalar(select(func.count()).select_from(Runner)) or 0,
        runners_online=db.scalar(select(func.count()).select_from(Runner).where(online)) or 0,
        warm_environments=db.scalar(select(func.sum(Runner.warm)).where(online)) or 0,
    )
