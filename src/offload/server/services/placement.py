"""The scheduler: which live runner gets a new session.

A runner is live when its last heartbeat is within `runner_timeout_s`; a draining one
(`offload runner drain`) takes no new session.  Among live runners that offer the instance type
and have room, the one with the most free slots wins, so sessions spread across hosts (ties: the
fewest live sessions, then the name, so placement is predictable).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Integer, case, func, select
from sqlalchemy.orm import Session as Db

from offload.core.errors import NoCapacity
from offload.core.schemas import InstanceType
from offload.server.db.models import OffloadSession, Runner
from offload.server.services.lifecycle import LIVE_STATES

RUNNER_FIX = (
    "Start a runner with `offload runner` (or `offload up` on one machine), or try again "
    "when a session ends."
)


@dataclass(frozen=True)
class Load:
    runner: Runner
    live: int
    live_gpu: int

    @property
    def free(self) -> int:
        return max(0, self.runner.capacity - self.live)

    def has_room(self, instance_type: InstanceType) -> bool:
        if self.runner.draining or self.live >= self.runner.capacity:
            return False
        if instance_type.value not in self.runner.instance_types:
            return False
        return instance_type is not InstanceType.GPU or self.live_gpu < self.runner.gpus


def online_since(now: datetime, runner_timeout_s: float) -> datetime:
    """Runners whose last heartbeat is at or after this instant count as online."""
    return now - timedelta(seconds=runner_timeout_s)


def online_runner_loads(db: Db, now: datetime, runner_timeout_s: float) -> list[Load]:
    live = (
        select(
            OffloadSession.runner_id.label("runner_id"),
            func.count().label("live"),
            func.sum(case((OffloadSession.gpu, 1), else_=0)).label("live_gpu"),
        )
        .where(OffloadSession.state.in_(LIVE_STATES), OffloadSession.runner_id.is_not(None))
        .group_by(OffloadSession.runner_id)
        .subquery()
    )
    rows = db.execute(
        select(
            Runner,
            func.coalesce(live.c.live, 0),
            func.coalesce(live.c.live_gpu, 0).cast(Integer),
        )
        .outerjoin(live, live.c.runner_id == Runner.id)
        .where(Runner.last_heartbeat_at >= online_since(now, runner_timeout_s))
        .order_by(Runner.name)
    ).all()
    return [Load(runner, int(n), int(n_gpu)) for runner, n, n_gpu in rows]


def choose_runner(
    db: Db, instance_type: InstanceType, now: datetime, runner_timeout_s: float
) -> Runner:
    """The live runner with room and the fewest live sessions; NoCapacity says why none."""
    loads = online_runner_loads(db, now, runner_timeout_s)
    fitting = [load for load in loads if load.has_room(instance_type)]
    if fitting:
        return min(fitting, key=lambda load: (-load.free, load.live, load.runner.name)).runner
    raise NoCapacity(_why_none(loads, instance_type), RUNNER_FIX)


def _why_none(loads: list[Load], instance_type: InstanceType) -> str:
    if not loads:
        return "No runner is online to host your session."
    offering = [load for load in loads if instance_type.value in load.runner.instance_types]
    if instance_type is InstanceType.GPU:
        offering = [load for load in offering if load.runner.gpus > 0]
    if not offering:
        return f"No online runner offers the {instance_type.value} instance type."
    if all(load.runner.draining for load in offering):
        return f"Every online runner offering {instance_type.value} is draining for maintenance."
    return (
        f"Every online runner offering {instance_type.value} is full "
        f"({len(offering)} runner(s) at capacity)."
    )
