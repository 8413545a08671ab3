"""Sessions as users see them: create (limits, placement, certificate), read, renew, stop, and
the user's side of the lifecycle: activity reports, prompt answers, idle now.

Each public function is async and does its database work in one short transaction on a worker
thread (`Database.run`); signing and waking the runner happen after the transaction ended.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import asyncssh
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session as Db
from sqlalchemy.orm import joinedload

from offload.core import schemas as s
from offload.core.config import ServerSettings
from offload.core.errors import Conflict, NotFound, PermissionDenied
from offload.core.schemas import PromptReason
from offload.core.schemas import SessionState as S
from offload.server.context import ServerContext
from offload.server.db.models import GpuClaim, OffloadSession, Organization, Runner, User
from offload.server.services import (
    accounts,
    audit,
    billing,
    ledger,
    lifecycle,
    org_settings,
    placement,
)
from offload.server.services.ca import parse_public_key
from offload.server.services.lifecycle import Rules
from offload.server.services.tokens import AuthUser

SESSION_ID_PREFIX = "ses_"
START_FIX = "Run `docker offload start` to start a session."
STOPPED_BY_USER = "stopped by user"
TAKEOVER_FIX = (
    "Stop it there with `docker offload stop`, or move it to this machine with "
    "`docker offload start --takeover` (the other machine's connection is dropped)."
)
REPLACED_NOTICE = (
    "Your previous session {old} ended after idling for 5 minutes and its environment was "
    "wiped; this is a new session on a clean environment."
)
PROMPT_MESSAGES = {
    s.PromptReason.QUIET: "No Docker activity for a while: keep the session, or let it go idle?",
    s.PromptReason.LONG_SESSION: "This session has run for 3 hours: keep it going, or idle now?",
    s.PromptReason.FAIR_USE: (
        "You are past today's 8 fair-use compute hours: keep the session, or idle now?"
    ),
}


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


def _prompt_view(facts: lifecycle.Facts) -> s.Prompt | None:
    prompt = facts.prompt
    if prompt is None:
        return None
    return s.Prompt(
        id=prompt.id,
        reason=prompt.reason,
        message=PROMPT_MESSAGES[prompt.reason],
        asked_at=prompt.asked_at,
        expires_at=prompt.expires_at,
    )


def session_info(
    db: Db,
    row: OffloadSession,
    now: datetime,
    rules: Rules,
    notice: str | None = None,
    cache: lifecycle.FactCache | None = None,
) -> s.SessionInfo:
    return info_view(
        row,
        lifecycle.facts_of(db, row, now, cache),
        now,
        rules,
        user=row.user.username,
        runner=runner_endpoint(row.runner) if row.runner else None,
        billed_s=ledger.session_seconds(db, row.id, now),
        gpus=placement.session_gpus(row),
        notice=notice,
    )


class SessionColumns(Protocol):
    """What an answer shows of a session besides its facts: an ORM row, or a row of a plain
    select (the activity lane, services/activity_lane.py)."""

    @property
    def id(self) -> str: ...
    @property
    def instance_type(self) -> str: ...
    @property
    def gpu(self) -> bool: ...
    @property
    def idle_timeout_s(self) -> int: ...
    @property
    def client_name(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def started_at(self) -> datetime | None: ...
    @property
    def ended_at(self) -> datetime | None: ...
    @property
    def end_reason(self) -> str | None: ...


def info_view(
    row: SessionColumns,
    facts: lifecycle.Facts,
    now: datetime,
    rules: Rules,
    *,
    user: str,
    runner: s.RunnerEndpoint | None,
    billed_s: float,
    gpus: list[s.GpuDevice],
    notice: str | None = None,
) -> s.SessionInfo:
    """The answer about a session at `now` (pure): its state and clocks come from `facts`."""
    idle_at = facts.idle_at()
    return s.SessionInfo(
        id=row.id,
        state=facts.state,
        user=user,
        org=facts.org,
        instance_type=s.InstanceType(row.instance_type),
        gpu=row.gpu,
        idle_timeout_s=row.idle_timeout_s,
        client_name=row.client_name,
        created_at=row.created_at,
        started_at=row.started_at,
        ended_at=row.ended_at,
        runner=runner,
        last_activity_at=facts.last_activity_at,
        time_until_idle_s=max(0.0, (idle_at - now).total_seconds()) if idle_at else None,
        idle_since=facts.idle_since if facts.state is S.IDLE else None,
        grace_ends_at=facts.grace_ends_at(rules),
        prompt=_prompt_view(facts),
        fair_use_remaining_s=max(0.0, rules.fair_use_day_s - facts.used_today_s),
        fair_use_policy=facts.fair_use_policy,
        billed_s=billed_s,
        gpu_devices=gpus,
        warnings=lifecycle.warnings(facts, now, rules),
        end_reason=row.end_reason,
        replaced_session_notice=notice,
    )


# ---- queries ------------------------------------------------------------------------------------


_WITH_PARTIES = (
    joinedload(OffloadSession.user),
    joinedload(OffloadSession.org),
    joinedload(OffloadSession.runner),
)


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


# Built once (services/ledger.py says why): every request about a session starts with it.
_SESSION_WITH_PARTIES = (
    select(OffloadSession)
    .where(OffloadSession.id == bindparam("session_id"))
    .options(*_WITH_PARTIES)
)


_LOCKED_SESSION_WITH_PARTIES = _SESSION_WITH_PARTIES.with_for_update(of=OffloadSession)


def owned_session(db: Db, auth: AuthUser, session_id: str, lock: bool = False) -> OffloadSession:
    """The user's own session; another user's session is reported as missing, never as denied.
    Its user, organisation and runner come in the same query: every answer shows them.  `lock`:
    the session's row is locked until the transaction ends (its parties' rows are not)."""
    query = _LOCKED_SESSION_WITH_PARTIES if lock else _SESSION_WITH_PARTIES
    row = db.scalars(query, {"session_id": session_id}).one_or_none()
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


def _join_live(
    db: Db, live: OffloadSession, request: s.SessionCreate, now: datetime, rules: Rules
) -> _Outcome:
    """One session per user: the same machine rejoins it (new key), another needs takeover."""
    if live.client_name != request.client_name and not request.takeover:
        other = live.client_name or "another machine"
        raise Conflict(
            f"You already have a live session ({live.id}) on {other}; Offload runs one session "
            "per user.",
            TAKEOVER_FIX,
        )
    key_changed = live.client_public_key.strip() != request.client_public_key.strip()
    if live.client_name != request.client_name:
        audit.record(
            db,
            now,
            s.AuditAction.SESSION_TAKEOVER,
            AuthUser(live.user.id, live.user.username),
            org=live.org,
            target=live.id,
            details={"from": live.client_name or "another machine", "to": request.client_name},
        )
    live.client_public_key = request.client_public_key
    live.client_name = request.client_name
    state_before = live.state
    lifecycle.note_activity(db, live, now)  # a start is the user at work: resume if idle
    changed = key_changed or live.state != state_before
    return _Outcome(session_info(db, live, now, rules), live.runner_id, changed=changed)


def _check_limits(
    db: Db,
    user: User,
    org: Organization,
    policy: org_settings.OrgPolicy,
    instance_type: str,
    now: datetime,
    rules: Rules,
) -> None:
    """Refuse a new session the organisation or the user's fair use does not allow."""
    org_settings.check_enabled(db, policy, org, user)
    if policy.fair_use_policy is s.FairUsePolicy.STOP:
        used = ledger.user_day_seconds(db, user.id, now)
        if used >= rules.fair_use_day_s:
            until = lifecycle.describe_duration((ledger.utc_day(now)[1] - now).total_seconds())
            raise PermissionDenied(
                "You have used today's 8 fair-use compute hours, and organisation "
                f"{org.name} stops sessions beyond them.",
                f"The counter resets at 00:00 UTC (in {until}); an owner of {org.name} "
                f"({', '.join(org_settings.owner_names(db, org)) or 'none'}) can change the "
                "fair-use policy.",
            )
    terms, current = billing.org_standing(db, org, now)
    left = current.minutes_left(terms.rate(instance_type))
    if left is not None and left <= 0:
        raise billing.exhausted_error(org, org_settings.owner_names(db, org), current)


def _replacement_notice(db: Db, user: User) -> str | None:
    """Tell the user once that their last session was wiped after idling."""
    last = db.scalar(
        select(OffloadSession)
        .where(OffloadSession.user_id == user.id, OffloadSession.ended_at.is_not(None))
        .order_by(OffloadSession.ended_at.desc())
        .limit(1)
    )
    if last is None or last.end_reason != lifecycle.END_IDLE_EXPIRED or last.replacement_noticed:
        return None
    last.replacement_noticed = True
    return REPLACED_NOTICE.format(old=last.id)


def _create_tx(
    db: Db, auth: AuthUser, request: s.SessionCreate, now: datetime, settings: ServerSettings
) -> _Outcome:
    rules = Rules.from_settings(settings)
    # Lock the user row (PostgreSQL; SQLite's write transactions are serial already) so that
    # two concurrent starts cannot both create a session.
    user = db.scalars(select(User).where(User.id == auth.id).with_for_update()).one()
    org = accounts.resolve_org(db, user, request.org)
    live = live_session_of(db, user.id)
    if live is not None:
        lifecycle.advance(db, live, now, rules)  # its grace may have run out just now
        if S(live.state).live:
            return _join_live(db, live, request, now, rules)
    instance_type = s.InstanceType.GPU if request.gpu else s.InstanceType.STANDARD
    policy = org_settings.policy_of(db, org)
    idle_timeout = org_settings.idle_timeout_for(
        policy, org, user, request.idle_timeout_s, settings.default_idle_timeout_s
    )
    _check_limits(db, user, org, policy, instance_type.value, now, rules)
    if request.gpu:
        org_settings.check_gpu_allowed(db, policy, org)
    placed = placement.place(db, instance_type, now, settings.runner_timeout_s)
    runner = placed.runner
    row = OffloadSession(
        id=_unused_session_id(db),
        user=user,
        org=org,
        runner=runner,
        state=S.STARTING.value,
        instance_type=instance_type.value,
        gpu=request.gpu,
        gpu_uuid=placed.gpu.uuid if placed.gpu else None,
        gpu_model=placed.gpu.model if placed.gpu else None,
        idle_timeout_s=idle_timeout,
        client_name=request.client_name,
        client_public_key=request.client_public_key,
        created_at=now,
    )
    db.add(row)
    db.flush()
    if placed.gpu is not None:  # the primary key refuses a GPU another live session holds
        db.add(GpuClaim(runner_id=runner.id, gpu_uuid=placed.gpu.uuid, session_id=row.id))
        db.flush()
    notice = _replacement_notice(db, user)
    return _Outcome(session_info(db, row, now, rules, notice), runner.id, changed=True)


def _unused_session_id(db: Db) -> str:
    while True:  # 48 random bits: a clash is rare, but the id is a primary key
        session_id = new_session_id()
        if db.get(OffloadSession, session_id) is None:
            return session_id


def _get_tx(db: Db, auth: AuthUser, session_id: str, now: datetime, rules: Rules) -> s.SessionInfo:
    return session_info(db, owned_session(db, auth, session_id), now, rules)


def _current_tx(db: Db, auth: AuthUser, now: datetime, rules: Rules) -> s.SessionInfo:
    row = live_session_of(db, auth.id)
    if row is None:
        raise NotFound("You have no live session.", START_FIX)
    return session_info(db, row, now, rules)


def _renew_tx(
    db: Db, auth: AuthUser, session_id: str, public_key: str, now: datetime, rules: Rules
) -> tuple[_Outcome, asyncssh.SSHKey]:
    key = parse_public_key(public_key)  # a bad key is refused before the session is read
    row = owned_session(db, auth, session_id)
    if not S(row.state).live:
        raise Conflict(
            f"Session {session_id} has ended ({row.state}); its certificate cannot be renewed.",
            START_FIX,
        )
    if row.client_public_key.strip() != public_key.strip():
        # Only the key the session holds now may renew: after a takeover the old machine's
        # renewal must not hand the session back.
        raise Conflict(
            f"Session {session_id} is now used from {row.client_name or 'another machine'} "
            "with another key; this machine's certificate cannot be renewed.",
            "Run `docker offload start --takeover` to move the session back here.",
        )
    return _Outcome(session_info(db, row, now, rules), row.runner_id, changed=False), key


def _stop_tx(db: Db, auth: AuthUser, session_id: str, now: datetime, rules: Rules) -> _Outcome:
    row = owned_session(db, auth, session_id)
    if lifecycle.can_transition(S(row.state), S.TERMINATED):
        lifecycle.move(db, row, S.TERMINATED, now, STOPPED_BY_USER)
        return _Outcome(session_info(db, row, now, rules), row.runner_id, changed=True)
    # stopping twice is fine
    return _Outcome(session_info(db, row, now, rules), row.runner_id, changed=False)


def _activity_tx(
    db: Db, auth: AuthUser, session_id: str, report: s.ActivityReport, now: datetime, rules: Rules
) -> _Outcome:
    """The agent saw activity: stamped with the server's clock; an idle session resumes.

    An ended session is answered as it is (not an error): the agent learns it must start a new
    one on the next Docker command."""
    row = owned_session(db, auth, session_id)
    before = row.state
    cache = lifecycle.FactCache()
    if S(row.state).live:
        lifecycle.advance(db, row, now, rules, cache)
    if S(row.state).live and lifecycle.is_activity(report):
        lifecycle.note_activity(db, row, now)
    changed = row.state != before
    return _Outcome(session_info(db, row, now, rules, cache=cache), row.runner_id, changed=changed)


def _activity_stamp_tx(
    db: Db, auth: AuthUser, session_id: str, report: s.ActivityReport, now: datetime, rules: Rules
) -> _Outcome | None:
    """The common activity report, in a row-locked transaction: a session that is active (or
    starting) with nothing due only has its quiet clock restarted.  None: the report needs more
    (a resume, a due transition or prompt, a quiet prompt to clear) and `_activity_tx` does it
    under the write lock.

    The session's row lock orders this with every other write of the session: a writer that
    changes its state waits for this one, and one that committed first is seen here.  The
    facts read besides (the user's day, the organisation's allowance) may be a moment behind
    another session's writes; then what they make due happens on the clock's next tick."""
    row = owned_session(db, auth, session_id, lock=True)
    if S(row.state) not in (S.ACTIVE, S.STARTING) or row.prompt_reason == PromptReason.QUIET:
        return None
    cache = lifecycle.FactCache()
    if lifecycle.evaluate(lifecycle.facts_of(db, row, now, cache), now, rules):
        return None
    if lifecycle.is_activity(report):
        lifecycle.stamp_activity(db, [row], now)
    return _Outcome(session_info(db, row, now, rules, cache=cache), row.runner_id, changed=False)


def _live_owned(
    db: Db,
    auth: AuthUser,
    session_id: str,
    now: datetime,
    rules: Rules,
    cache: lifecycle.FactCache,
) -> OffloadSession:
    row = owned_session(db, auth, session_id)
    if S(row.state).live:
        lifecycle.advance(db, row, now, rules, cache)
    if not S(row.state).live:
        raise Conflict(
            f"Session {session_id} has ended ({row.end_reason or row.state}).", START_FIX
        )
    return row


def _answer_tx(
    db: Db, auth: AuthUser, session_id: str, answer: s.PromptAnswer, now: datetime, rules: Rules
) -> _Outcome:
    cache = lifecycle.FactCache()
    row = _live_owned(db, auth, session_id, now, rules, cache)
    before = row.state
    if answer.prompt_id is not None and row.prompt_id not in (None, answer.prompt_id):
        raise Conflict(
            f"Prompt {answer.prompt_id} is no longer open on session {session_id}.",
            "Answer the prompt that `offload status` shows now.",
        )
    if answer.answer is s.PromptAnswerChoice.IDLE:
        if S(row.state) is S.ACTIVE:
            lifecycle.move(db, row, S.IDLE, now, lifecycle.IDLE_BY_USER)
    elif S(row.state) is S.IDLE:
        lifecycle.note_activity(db, row, now)  # "keep" after it idled: the user is back
    else:
        lifecycle.keep(row, now)
    changed = row.state != before
    return _Outcome(session_info(db, row, now, rules, cache=cache), row.runner_id, changed=changed)


def _idle_tx(db: Db, auth: AuthUser, session_id: str, now: datetime, rules: Rules) -> _Outcome:
    cache = lifecycle.FactCache()
    row = _live_owned(db, auth, session_id, now, rules, cache)
    if S(row.state) is S.STARTING:
        raise Conflict(
            f"Session {session_id} is still starting; it can go idle once active.",
            "Try again in a moment, or end it with `docker offload stop`.",
        )
    changed = S(row.state) is S.ACTIVE
    if changed:
        lifecycle.move(db, row, S.IDLE, now, lifecycle.IDLE_BY_USER)
    return _Outcome(session_info(db, row, now, rules, cache=cache), row.runner_id, changed=changed)


# ---- the service --------------------------------------------------------------------------------


def _with_certificate(
    ctx: ServerContext, info: s.SessionInfo, public_key: asyncssh.SSHKey, now: datetime
) -> s.SessionInfo:
    certificate, valid_before = ctx.ca.sign_session_certificate(
        public_key, info.id, now, ctx.settings.cert_validity_s
    )
    return info.model_copy(
        update={"certificate": certificate, "certificate_valid_before": valid_before}
    )


def _rules(ctx: ServerContext) -> Rules:
    return Rules.from_settings(ctx.settings)


def _wake(ctx: ServerContext, outcome: _Outcome) -> s.SessionInfo:
    if outcome.changed and outcome.runner_id:
        ctx.signals.notify(outcome.runner_id)
    return outcome.info


async def create_session(
    ctx: ServerContext, auth: AuthUser, request: s.SessionCreate
) -> s.SessionInfo:
    """Place a new session on a live runner (or rejoin the user's live one) and certify the key."""
    key = parse_public_key(request.client_public_key)  # refuse a bad key before any write
    now = ctx.now()
    outcome = await ctx.db.run(_create_tx, auth, request, now, ctx.settings)
    return _with_certificate(ctx, _wake(ctx, outcome), key, now)


async def get_session(ctx: ServerContext, auth: AuthUser, session_id: str) -> s.SessionInfo:
    return await ctx.db.read(_get_tx, auth, session_id, ctx.now(), _rules(ctx))


async def current_session(ctx: ServerContext, auth: AuthUser) -> s.SessionInfo:
    return await ctx.db.read(_current_tx, auth, ctx.now(), _rules(ctx))


async def renew_certificate(
    ctx: ServerContext, auth: AuthUser, session_id: str, public_key: str
) -> s.SessionInfo:
    """A fresh certificate for the owner's live session (the agent calls it before expiry)."""
    now = ctx.now()
    # Read only: renewals are frequent and change no row (no wait for the write lock).
    outcome, key = await ctx.db.read(_renew_tx, auth, session_id, public_key, now, _rules(ctx))
    return _with_certificate(ctx, _wake(ctx, outcome), key, now)


async def stop_session(ctx: ServerContext, auth: AuthUser, session_id: str) -> s.SessionInfo:
    """End the session now; its runner learns it on its next (woken) heartbeat and wipes it."""
    outcome = await ctx.db.run(_stop_tx, auth, session_id, ctx.now(), _rules(ctx))
    return _wake(ctx, outcome)


async def report_activity(
    ctx: ServerContext, auth: AuthUser, session_id: str, report: s.ActivityReport
) -> s.SessionInfo:
    now, rules = ctx.now(), _rules(ctx)
    outcome = await ctx.db.run_row_locked(_activity_stamp_tx, auth, session_id, report, now, rules)
    if outcome is None:
        outcome = await ctx.db.run(_activity_tx, auth, session_id, report, now, rules)
    return _wake(ctx, outcome)


async def answer_prompt(
    ctx: ServerContext, auth: AuthUser, session_id: str, answer: s.PromptAnswer
) -> s.SessionInfo:
    outcome = await ctx.db.run(_answer_tx, auth, session_id, answer, ctx.now(), _rules(ctx))
    return _wake(ctx, outcome)


async def idle_now(ctx: ServerContext, auth: AuthUser, session_id: str) -> s.SessionInfo:
    outcome = await ctx.db.run(_idle_tx, auth, session_id, ctx.now(), _rules(ctx))
    return _wake(ctx, outcome)
