"""The operator's view of the runner fleet (`offload admin runners`) and draining.

Operators run these on the control plane's host against its database (the server's own
settings), like the other operator commands of `bootstrap.py`: no API token can reach them.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session as Db

from offload.core import schemas as s
from offload.core.errors import NotFound
from offload.server.db.models import OffloadSession, Runner
from offload.server.services import audit, placement
from offload.server.services.lifecycle import LIVE_STATES


def _sessions_by_runner(db: Db) -> dict[str, list[str]]:
    rows = db.execute(
        select(OffloadSession.runner_id, OffloadSession.id)
        .where(OffloadSession.state.in_(LIVE_STATES), OffloadSession.runner_id.is_not(None))
        .order_by(OffloadSession.created_at)
    ).all()
    found: dict[str, list[str]] = {}
    for runner_id, session_id in rows:
        if runner_id is not None:
            found.setdefault(runner_id, []).append(session_id)
    return found


def runners_view(db: Db, now: datetime, runner_timeout_s: float) -> s.RunnerFleet:
    since = placement.online_since(now, runner_timeout_s)
    sessions = _sessions_by_runner(db)
    runners = db.scalars(select(Runner).order_by(Runner.name)).all()
    claimed = placement.claimed_gpus(db, [runner.id for runner in runners if runner.gpu_devices])
    views = []
    for runner in runners:
        held = sessions.get(runner.id, [])
        online = runner.last_heartbeat_at is not None and runner.last_heartbeat_at >= since
        views.append(
            s.RunnerAdminView(
                name=runner.name,
                id=runner.id,
                ssh=f"{runner.ssh_host}:{runner.ssh_port}",
                online=online,
                draining=runner.draining,
                last_heartbeat_at=runner.last_heartbeat_at,
                capacity=runner.capacity,
                live_sessions=len(held),
                free=max(0, runner.capacity - len(held)) if online and not runner.draining else 0,
                warm=runner.warm,
                instance_types=[s.InstanceType(t) for t in runner.instance_types],
                gpus=runner.gpus,
                gpu_devices=placement.runner_gpus(runner),
                gpus_busy=len(claimed[runner.id]),
                sessions=held,
            )
        )
    return s.RunnerFleet(
        runners=views,
        online=sum(view.online for view in views),
        live_sessions=sum(view.live_sessions for view in views),
        free=sum(view.free for view in views),
    )


def set_draining(db: Db, name: str, draining: bool, now: datetime) -> bool:
    """Drain (no new placements; live sessions run to their end) or undrain a runner; returns
    whether it was draining before."""
    runner = db.scalar(select(Runner).where(Runner.name == name))
    if runner is None:
        names = ", ".join(db.scalars(select(Runner.name).order_by(Runner.name))) or "none"
        raise NotFound(f"No runner is named {name!r}.", f"Registered runners: {names}.")
    before = runner.draining
    runner.draining = draining
    action = "drained" if draining else "undrained"
    audit.record(
        db,
        now,
        s.AuditAction.RUNNER_DRAINED,
        audit.OPERATOR,
        target=name,
        details={"state": action},
    )
    return before
