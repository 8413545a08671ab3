"""Sessions as users see them: create (placement + certificate), read, renew, stop.

Each public function is async and does its database work in one short transaction on a worker
thread (`Database.run`); signing and waking the runner happen after the transaction ended.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session as Db

from offload.core import schemas as s
from offload.core.config import ServerSettings
from offload.core.errors import Conflict, NotFound
from offload.core.schemas import SessionState as S
from offload.server.context import ServerContext
from offload.server.db.models import OffloadSession, Runner, User
from offload.server.services import accounts, lifecycle, placement
from offload.server.services.ca import parse_public_key
from offload.server.services.tokens import AuthUser

SESSION_ID_PREFIX = "ses_"
START_FIX = "Run `docker offload start` to start a session."
STOPPED_BY_USER = "stopped by user"


def new_session_id() -> str:
    return SESSION_ID_PREFIX + secrets.token_hex(6)


# ---- views --------------------------------------------------------------------------------------


def runner_endpoint(runner: Runner) -> s.RunnerEndpoint:
    return s.RunnerEndpoint(
        id=runner.id,
        name=runner.name,
        ssh_host=runner.ssh_host,
        ssh_port=runner.ssh_port,
        host_key=runner.host_key,
    )


def session_info(row: OffloadSession) -> s.SessionInfo:
    return s.SessionInfo(
        id=row.id,
        state=S(row.state),
        user=row.user.username,
        org=row.org.name,
        instance_type=s.InstanceType(row.instance_type),
        gpu=row.gpu,
        idle_timeout_s=row.idle_timeout_s,
        client_name=row.client_name,
        created_at=row.created_at,
        started_at=row.started_at,
        ended_at=row.ended_at,
        runner=runner_endpoint(row.runner) if row.runner else None,
    )


# ---- queries ------------------------------------------------------------------------------------


def live_session_of(db: Db, user_id: str) -> OffloadSession | None:
    return db.scalar(
        select(OffloadSession)
        .where(
            OffloadSession.user_id == user_id,
            OffloadSession.state.in_(lifecycle.LIVE_STATES),
        )
        .order_by(OffloadSession.created_at.desc())
        .limit(1)
    )


def owned_session(db: Db, auth: AuthUser, session_id: str) -> OffloadSession:
    """The user's own session; another user's session is reported as missing, never as denied."""
    row = db.get(OffloadSession, session_id)
    if row is None or row.user_id != auth.id:
        raise NotFound(
            f"You have no session {session_id}.",
            "Check the id: `offload status` shows your current session.",
        )
    return row


# ---- transactions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    info: s.SessionInfo
    runner_id: str | None  # the runner to wake, if the change concerns one
    changed: bool


def _create_tx(
    db: Db, auth: AuthUser, request: s.SessionCreate, now: datetime, settings: ServerSettings
) -> _Outcome:
    # Lock the user row (PostgreSQL; SQLite's write transactions are serial already) so that
    # two concurrent starts cannot both create a session.
    user = db.scalars(select(User).where(User.id == auth.id).with_for_update()).one()
    org = accounts.resolve_org(db, user, request.org)
    live = live_session_of(db, user.id)
    if live is not None:
        # One session per user: the new client joins it with its own key.
        live.client_public_key = request.client_public_key
        live.client_name = request.client_name
        return _Outcome(session_info(live), live.runner_id, changed=False)
    instance_type = s.InstanceType.GPU if request.gpu else s.InstanceType.STANDARD
    runner = placement.choose_runner(db, instance_type, now, settings.runner_timeout_s)
    row = OffloadSession(
        id=_unused_session_id(db),
        user=user,
        org=org,
        runner=runner,
        state=S.STARTING.value,
        instance_type=instance_type.value,
        gpu=request.gpu,
        idle_timeout_s=request.idle_timeout_s or settings.default_idle_timeout_s,
        client_name=request.client_name,
        client_public_key=request.client_public_key,
        created_at=now,
    )
    db.add(row)
    db.flush()
    return _Outcome(session_info(row), runner.id, changed=True)


def _unused_session_id(db: Db) -> str:
    while True:  # 48 random bits: a clash is rare, but the id is a primary key
        session_id = new_session_id()
        if db.get(OffloadSession, session_id) is None:
            return session_id


def _get_tx(db: Db, auth: AuthUser, session_id: str) -> s.SessionInfo:
    return session_info(owned_session(db, auth, session_id))


def _current_tx(db: Db, auth: AuthUser) -> s.SessionInfo:
    row = live_session_of(db, auth.id)
    if row is None:
        raise NotFound("You have no live session.", START_FIX)
    return session_info(row)


def _renew_tx(db: Db, auth: AuthUser, session_id: str, public_key: str) -> s.SessionInfo:
    row = owned_session(db, auth, session_id)
    if not S(row.state).live:
        raise Conflict(
            f"Session {session_id} has ended ({row.state}); its certificate cannot be renewed.",
            START_FIX,
        )
    row.client_public_key = public_key
    return session_info(row)


def _stop_tx(db: Db, auth: AuthUser, session_id: str, now: datetime) -> _Outcome:
    row = owned_session(db, auth, session_id)
    if lifecycle.can_transition(S(row.state), S.TERMINATED):
        lifecycle.transition(row, S.TERMINATED, now, STOPPED_BY_USER)
        return _Outcome(session_info(row), row.runner_id, changed=True)
    return _Outcome(session_info(row), row.runner_id, changed=False)  # stopping twice is fine


# ---- the service --------------------------------------------------------------------------------


def _with_certificate(
    ctx: ServerContext, info: s.SessionInfo, public_key: str, now: datetime
) -> s.SessionInfo:
    certificate, valid_before = ctx.ca.sign_session_certificate(
        public_key, info.id, now, ctx.settings.cert_validity_s
    )
    return info.model_copy(
        update={"certificate": certificate, "certificate_valid_before": valid_before}
    )


async def create_session(
    ctx: ServerContext, auth: AuthUser, request: s.SessionCreate
) -> s.SessionInfo:
    """Place a new session on a live runner (or rejoin the user's live one) and certify the key."""
    parse_public_key(request.client_public_key)  # refuse a bad key before anything is written
    now = ctx.now()
    outcome = await ctx.db.run(_create_tx, auth, request, now, ctx.settings)
    if outcome.changed and outcome.runner_id:
        ctx.signals.notify(outcome.runner_id)
    return _with_certificate(ctx, outcome.info, request.client_public_key, now)


async def get_session(ctx: ServerContext, auth: AuthUser, session_id: str) -> s.SessionInfo:
    return await ctx.db.read(_get_tx, auth, session_id)


async def current_session(ctx: ServerContext, auth: AuthUser) -> s.SessionInfo:
    return await ctx.db.read(_current_tx, auth)


async def renew_certificate(
    ctx: ServerContext, auth: AuthUser, session_id: str, public_key: str
) -> s.SessionInfo:
    """A fresh certificate for the owner's live session (the agent calls it before expiry)."""
    parse_public_key(public_key)
    now = ctx.now()
    info = await ctx.db.run(_renew_tx, auth, session_id, public_key)
    return _with_certificate(ctx, info, public_key, now)


async def stop_session(ctx: ServerContext, auth: AuthUser, session_id: str) -> s.SessionInfo:
    """End the session now; its runner learns it on its next (woken) heartbeat and wipes it."""
    outcome = await ctx.db.run(_stop_tx, auth, session_id, ctx.now())
    if outcome.changed and outcome.runner_id:
        ctx.signals.notify(outcome.runner_id)
    return outcome.info
