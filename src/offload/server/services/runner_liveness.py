"""Runners that stop heartbeating: their sessions end `failed`, billed to the last heartbeat.

A runner silent for `runner_timeout_s` takes no new sessions (placement); silent for
`runner_lost_after_s` it is lost: the engines of its sessions are out of reach, and may be gone
(a host that died, a network that went away).  Keeping those sessions live would bill time
nobody can use, so they end `failed` with the reason, stamped at the runner's last heartbeat
(the last moment it was known to hold them).  The user's agent then says what happened and
starts a new session on the next docker command.  A runner that comes back registers again and
wipes what was left on its host (`offload runner` does that before registering).

The same ending serves a runner that restarts (registration): its engines were wiped.

With several control-plane replicas every one runs this; each session row is claimed with
`FOR UPDATE SKIP LOCKED` in a short transaction of its own and re-checked under the lock, so a
session fails exactly once and no transaction waits on another or spans a network call.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session as Db

from offload.core.schemas import SessionState as S
from offload.server.context import ServerContext
from offload.server.db.models import OffloadSession, Runner
from offload.server.services import lifecycle

log = logging.getLogger(__name__)

END_RUNNER_RESTARTED = "runner restarted: the session's engine was lost"


def end_runner_lost(runner: Runner) -> str:
    last = (
        runner.last_heartbeat_at.isoformat(timespec="seconds")
        if runner.last_heartbeat_at
        else "never"
    )
    return f"runner {runner.name} lost: no heartbeat since {last}"


def fail_session(db: Db, row: OffloadSession, runner: Runner, now: datetime, reason: str) -> None:
    """End `row` failed at the runner's last heartbeat (never before the session's own last
    step, so its record reads in time order)."""
    lost_at = min(now, runner.last_heartbeat_at or now)
    marks = [t for t in (lost_at, row.started_at, row.idle_since) if t is not None]
    lifecycle.move(db, row, S.FAILED, min(now, max(marks)), reason)


def fail_engines_of(db: Db, runner: Runner, now: datetime) -> list[str]:
    """A restarting runner wiped its engines: its live sessions that had one end failed.

    Sessions still `starting` (no engine bound yet) stay: the runner binds them as usual."""
    rows = db.scalars(
        select(OffloadSession).where(
            OffloadSession.runner_id == runner.id,
            OffloadSession.state.in_(lifecycle.LIVE_STATES),
            OffloadSession.env_id.is_not(None),
        )
    ).all()
    for row in rows:
        fail_session(db, row, runner, now, END_RUNNER_RESTARTED)
    if rows:
        log.warning(
            "runner %s registered again: %d live session(s) lost their engine and failed",
            runner.name,
            len(rows),
        )
    return [row.id for row in rows]


def _lost_sessions_tx(db: Db, now: datetime, lost_after: timedelta) -> list[str]:
    silent = select(Runner.id).where(Runner.last_heartbeat_at <= now - lost_after)
    return list(
        db.scalars(
            select(OffloadSession.id).where(
                OffloadSession.runner_id.in_(silent),
                OffloadSession.state.in_(lifecycle.LIVE_STATES),
            )
        )
    )


def _fail_tx(db: Db, session_id: str, now: datetime, lost_after: timedelta) -> bool:
    """Claim the session (skipped if another replica holds it) and re-check under the lock."""
    row = db.scalars(
        select(OffloadSession)
        .where(OffloadSession.id == session_id)
        .with_for_update(skip_locked=True)
    ).one_or_none()
    if row is None or not S(row.state).live or row.runner is None:
        return False
    runner = row.runner
    if runner.last_heartbeat_at is not None and runner.last_heartbeat_at > now - lost_after:
        return False  # it came back meanwhile
    fail_session(db, row, runner, now, end_runner_lost(runner))
    log.warning("session %s failed: %s", row.id, row.end_reason)
    return True


async def tick(ctx: ServerContext, now: datetime) -> int:
    """Fail the live sessions of lost runners; returns how many ended."""
    lost_after = timedelta(
        seconds=max(ctx.settings.runner_lost_after_s, ctx.settings.runner_timeout_s)
    )
    failed = 0
    for session_id in await ctx.db.read(_lost_sessions_tx, now, lost_after):
        failed += await ctx.db.run(_fail_tx, session_id, now, lost_after)
    return failed
