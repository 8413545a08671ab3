"""Runners as the control plane sees them: register, heartbeat (long poll), assigned sessions.

A runner token acts only for the runners it registered; a runner sees only the sessions placed
on it.  Anything else is reported as missing (404), so a runner learns nothing about others.

A registration is a runner (re)starting: `offload runner` wipes every environment left on its
host before it registers, so the engines of the sessions it served are gone.  Those sessions end
`failed` ("runner restarted: …") at registration, billed up to the runner's last heartbeat (the
last moment it was known to hold them), and their agents tell users to start again.  Quietly
binding a fresh, empty engine to a session that had containers would lose work without a word.
Sessions still `starting` (no engine bound yet) stay: the runner binds them as usual.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session as Db
from sqlalchemy.orm import object_session

from offload.core import schemas as s
from offload.core.errors import Conflict, InvalidInput, NotFound
from offload.core.schemas import SessionState as S
from offload.server.context import ServerContext
from offload.server.db.engine import execute_columns
from offload.server.db.models import (
    Membership,
    OffloadSession,
    Organization,
    OrgSettingsRow,
    Runner,
    User,
)
from offload.server.services import audit, ledger, lifecycle, runner_liveness
from offload.server.services.ca import key_fingerprint, parse_public_key
from offload.server.services.tokens import AuthRunner

log = logging.getLogger(__name__)

# Upper bound of a long poll: proxies and load balancers tend to cut idle requests at ~60 s.
MAX_WAIT_S = 60.0
# Images remembered per session for the usage insights (the top 10 are shown).
MAX_IMAGES_PER_SESSION = 100
END_RUNNER_RESTARTED = runner_liveness.END_RUNNER_RESTARTED


def effective_wait(requested_s: float, runner_timeout_s: float) -> float:
    """Clamp a heartbeat's wait to 0..60 s, and below half the runner timeout.

    The heartbeat is recorded when the poll arrives; a poll longer than the timeout would make a
    perfectly healthy runner look gone while it waits.
    """
    return max(0.0, min(requested_s, MAX_WAIT_S, runner_timeout_s / 2))


# ---- views --------------------------------------------------------------------------------------


def assigned_session_view(row: OffloadSession) -> s.AssignedSession:
    """What the runner needs of a session (`_desired_tx` reads the same as columns)."""
    return _assigned(
        row.id,
        row.state,
        row.user.username,
        row.org.name,
        row.instance_type,
        row.client_public_key,
        next((m.role for m in row.user.memberships if m.org_id == row.org_id), None),
        _cache_limit(row),
        row.gpu_uuid,
    )


def _assigned(
    session_id: str,
    state: str,
    user: str,
    org: str,
    instance_type: str,
    client_public_key: str,
    role: str | None,  # the user's in the session's organisation; None: not a member (now)
    cache_limit: int | None,
    gpu_uuid: str | None,
) -> s.AssignedSession:
    return s.AssignedSession(
        session_id=session_id,
        state=S(state),
        user=user,
        org=org,
        instance_type=s.InstanceType(instance_type),
        paused=S(state) is S.IDLE,
        client_key_fingerprint=key_fingerprint(client_public_key),
        org_role=s.Role(role) if role is not None else s.Role.MEMBER,
        builder_keep_storage_bytes=cache_limit,
        gpu_uuids=[gpu_uuid] if gpu_uuid else [],
    )


def _cache_limit(row: OffloadSession) -> int | None:
    db = object_session(row)
    found = db.get(OrgSettingsRow, row.org_id) if db is not None else None
    return found.builder_cache_limit_bytes if found is not None else None


# ---- transactions -------------------------------------------------------------------------------


_RUNNER = select(Runner).where(Runner.id == bindparam("runner_id"))  # every heartbeat's first


def own_runner(db: Db, auth: AuthRunner, runner_id: str) -> Runner:
    runner = db.scalars(_RUNNER, {"runner_id": runner_id}).one_or_none()
    if runner is None or runner.token_id != auth.token_id:
        raise NotFound(
            f"No runner {runner_id} is registered with this runner token.",
            "Register again (`offload runner` does it at start) and use the id it returns.",
        )
    return runner


def assigned_live_session(db: Db, runner: Runner, session_id: str) -> OffloadSession:
    row = db.get(OffloadSession, session_id)
    if row is None or row.runner_id != runner.id or not S(row.state).live:
        raise NotFound(
            f"Session {session_id} is not live on runner {runner.name}.",
            "Wipe any environment bound to it; the heartbeat lists the sessions to keep.",
        )
    return row


def _register_tx(db: Db, auth: AuthRunner, request: s.RunnerRegister, now: datetime) -> str:
    # Upsert by name: a restarted runner keeps its id (and its sessions) under a new token.
    runner = db.scalar(select(Runner).where(Runner.name == request.name))
    audit.record(
        db,
        now,
        s.AuditAction.RUNNER_REGISTERED,
        f"runner token {auth.name}",
        target=request.name,
        details={"address": f"{request.ssh_host}:{request.ssh_port}", "new": runner is None},
    )
    if runner is None:
        runner = Runner(name=request.name, registered_at=now)
        db.add(runner)
    else:
        runner_liveness.fail_engines_of(db, runner, now)
    runner.ssh_host = request.ssh_host
    runner.ssh_port = request.ssh_port
    runner.host_key = request.host_key.strip()
    runner.capacity = request.capacity
    runner.instance_types = [t.value for t in request.instance_types]
    runner.gpu_devices = _gpu_devices(request.gpu_devices)
    runner.gpus = len(request.gpu_devices) or request.gpus
    runner.warm = 0
    runner.token_id = auth.token_id
    runner.last_heartbeat_at = now
    db.flush()
    return runner.id


def _record_heartbeat_tx(
    db: Db, auth: AuthRunner, runner_id: str, report: s.RunnerHeartbeat, now: datetime
) -> None:
    runner = own_runner(db, auth, runner_id)
    runner.last_heartbeat_at = now
    _set_changed(runner, warm=report.warm, capacity=report.capacity)
    if report.gpu_devices is not None:
        devices = _gpu_devices(report.gpu_devices)
        _set_changed(runner, gpu_devices=devices, gpus=len(devices))
    rows = _reported_sessions(db, report)
    busy = []
    for env in report.environments:
        row = rows.get(env.session_id) if env.session_id is not None else None
        if row is not None and _record_environment(db, runner, env, row, now):
            busy.append(row)
    lifecycle.stamp_activity(db, busy, now)  # one statement for the runner's busy sessions


_SESSIONS_BY_ID = select(OffloadSession).where(
    OffloadSession.id.in_(bindparam("ids", expanding=True))
)


def _reported_sessions(db: Db, report: s.RunnerHeartbeat) -> dict[str, OffloadSession]:
    """The sessions of the reported environments, in one query. Returned, not only loaded: the
    identity map keeps a row only while something refers to it, so rows loaded and dropped
    came back one `db.get` per environment."""
    ids = [env.session_id for env in report.environments if env.session_id is not None]
    if not ids:
        return {}
    return {row.id: row for row in db.scalars(_SESSIONS_BY_ID, {"ids": ids})}


def _set_changed(row: object, **values: object) -> None:
    """Assign only the values that differ: assigning an equal one still marks the row dirty, and
    every heartbeat then flushed all of its sessions' rows to find nothing to write (a fifth of
    a heartbeat's CPU with 20 environments, bench/load_costs.py)."""
    for name, value in values.items():
        if getattr(row, name) != value:
            setattr(row, name, value)


def _gpu_devices(devices: list[s.GpuDevice]) -> list[dict[str, object]]:
    uuids = [device.uuid for device in devices]
    if len(set(uuids)) != len(uuids):
        raise InvalidInput(
            "The runner reported the same GPU UUID twice.",
            "Report each GPU once, as NVML lists it (`offload runner gpus`).",
        )
    return [device.model_dump() for device in devices]


def _record_environment(
    db: Db, runner: Runner, env: s.EnvironmentReport, row: OffloadSession, now: datetime
) -> bool:
    """What a bound environment holds: images and containers for the insights; True when a
    container runs, which is activity (stamped only while active or starting: an idle session's
    containers are paused, and a report racing the pause must not wake it).

    `containers_max` is the number of containers created in the session: the runner's running
    total since bind (`containers_created`, which counts `docker run --rm` ones too) is kept at
    its highest, so a retried heartbeat or a restarted control plane counts nothing twice.  The
    containers the engine holds are a floor (a runner that does not count creates, or events it
    missed while its stream was down)."""
    if row.runner_id != runner.id or not S(row.state).live:
        return False
    new_images = set(env.images) - set(row.images)
    if new_images:  # bounded: a runaway build loop must not grow the row forever
        room = max(0, MAX_IMAGES_PER_SESSION - len(row.images))
        _set_changed(row, images=sorted(set(row.images) | set(sorted(new_images)[:room])))
    _set_changed(
        row,
        containers_max=max(
            row.containers_max, env.containers_created, env.containers_total, env.running_containers
        ),
    )
    ledger.bill_builder_time(db, row, env.build_seconds, now)
    return env.running_containers > 0


# One query of columns (the user, the role in the session's organisation, its cache limit
# joined in), not ORM rows and their relations, built once (services/ledger.py says why): every
# runner asks this on every heartbeat.
_DESIRED = (
    select(
        OffloadSession.id,
        OffloadSession.state,
        User.username,
        Organization.name,
        OffloadSession.instance_type,
        OffloadSession.client_public_key,
        Membership.role,
        OrgSettingsRow.builder_cache_limit_bytes,
        OffloadSession.gpu_uuid,
    )
    .join(User, User.id == OffloadSession.user_id)
    .join(Organization, Organization.id == OffloadSession.org_id)
    .outerjoin(
        Membership,
        (Membership.user_id == OffloadSession.user_id)
        & (Membership.org_id == OffloadSession.org_id),
    )
    .outerjoin(OrgSettingsRow, OrgSettingsRow.org_id == OffloadSession.org_id)
    .where(
        OffloadSession.runner_id == bindparam("runner_id"),
        OffloadSession.state.in_(lifecycle.LIVE_STATES),
    )
    .order_by(OffloadSession.created_at, OffloadSession.id)
)


def _desired_tx(db: Db, runner_id: str, ca_public_key: str) -> s.RunnerDesired:
    rows = execute_columns(db, _DESIRED, {"runner_id": runner_id}).all()
    return s.RunnerDesired(sessions=[_assigned(*row) for row in rows], ca_public_key=ca_public_key)


def _assigned_tx(db: Db, auth: AuthRunner, runner_id: str, session_id: str) -> s.AssignedSession:
    runner = own_runner(db, auth, runner_id)
    return assigned_session_view(assigned_live_session(db, runner, session_id))


def _ready_tx(
    db: Db, auth: AuthRunner, runner_id: str, session_id: str, env_id: str, now: datetime
) -> tuple[s.AssignedSession, bool]:
    runner = own_runner(db, auth, runner_id)
    row = assigned_live_session(db, runner, session_id)
    if row.env_id is not None and row.env_id != env_id:
        raise Conflict(
            f"Session {session_id} is already bound to environment {row.env_id}.",
            f"Wipe environment {env_id}; a session keeps the environment it was bound to first.",
        )
    changed = row.env_id is None or S(row.state) is S.STARTING
    row.env_id = env_id
    if S(row.state) is S.STARTING:
        lifecycle.move(db, row, S.ACTIVE, now, "environment ready")  # billing starts
    return assigned_session_view(row), changed


# ---- the service --------------------------------------------------------------------------------


async def register_runner(
    ctx: ServerContext, auth: AuthRunner, request: s.RunnerRegister
) -> s.RunnerRegistered:
    try:
        parse_public_key(request.host_key)
    except InvalidInput:
        raise InvalidInput(
            "The runner's host key is not an OpenSSH public key.",
            "Send the public half of the SSH endpoint's host key as one line "
            "(`ssh-ed25519 AAAA…`); `offload runner` does this for you.",
        ) from None
    runner_id = await ctx.db.run(_register_tx, auth, request, ctx.now())
    ctx.signals.forget_seen(runner_id)  # a (re)started runner gets its sessions at once
    return s.RunnerRegistered(
        id=runner_id,
        ca_public_key=ctx.ca.public_key_line(),
        heartbeat_interval_s=ctx.settings.heartbeat_interval_s,
    )


async def heartbeat(
    ctx: ServerContext,
    auth: AuthRunner,
    runner_id: str,
    report: s.RunnerHeartbeat,
    wait_s: float = 0.0,
) -> s.RunnerDesired:
    """Record the heartbeat; answer the runner's desired sessions at once if it has not seen the
    latest change, else when one comes or `wait_s` (clamped) passes."""
    await ctx.db.run(_record_heartbeat_tx, auth, runner_id, report, ctx.now())
    wait = effective_wait(wait_s, ctx.settings.runner_timeout_s)
    if wait > 0:
        await ctx.signals.wait_for_change(runner_id, wait)  # no transaction is open here
    # Read the generation before the sessions: a change after this point wakes the next poll.
    generation = ctx.signals.generation(runner_id)
    desired = await ctx.db.read(_desired_tx, runner_id, ctx.ca.public_key_line())
    ctx.signals.mark_seen(runner_id, generation)
    return desired


async def assigned_session(
    ctx: ServerContext, auth: AuthRunner, runner_id: str, session_id: str
) -> s.AssignedSession:
    return await ctx.db.read(_assigned_tx, auth, runner_id, session_id)


async def session_ready(
    ctx: ServerContext, auth: AuthRunner, runner_id: str, session_id: str, env_id: str
) -> s.AssignedSession:
    """The runner bound an environment to the session: starting → active (idempotent)."""
    view, changed = await ctx.db.run(_ready_tx, auth, runner_id, session_id, env_id, ctx.now())
    if changed:
        ctx.signals.notify(runner_id)
    return view
