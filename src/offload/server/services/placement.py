"""The scheduler: which live runner gets a new session, and which of its GPUs a GPU session gets.

A runner is live when its last heartbeat is within `runner_timeout_s`; a draining one
(`offload runner drain`) takes no new session.  Among live runners that offer the instance type
and have room, the one with the most free slots wins, so sessions spread across hosts (ties: the
fewest live sessions, then the name, so placement is predictable).

A GPU session also needs a free GPU: one the runner reports (`Runner.gpu_devices`) that no live
session holds (`GpuClaim`, whose primary key makes a GPU one session's at a time).  Runners with
a warm environment already holding a free GPU come first, then those with the most free GPUs;
on the runner, a warm GPU wins, then the lowest index.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session as Db

from offload.core.errors import NoCapacity
from offload.core.schemas import GpuDevice, InstanceType, SessionState
from offload.server.db.models import GpuClaim, OffloadSession, Runner
from offload.server.services.lifecycle import LIVE_STATES

RUNNER_FIX = (
    "Start a runner with `offload runner` (or `offload up` on one machine), or try again "
    "when a session ends."
)
GPU_BUSY_FIX = (
    "Try again when a GPU session ends (GPU sessions of your organisation: `offload org "
    "sessions`), or run `docker offload start` without --gpu for a CPU session now."
)


def runner_gpus(runner: Runner) -> list[GpuDevice]:
    return [GpuDevice.model_validate(device) for device in runner.gpu_devices or []]


def session_gpus(row: OffloadSession) -> list[GpuDevice]:
    """A live session's GPU as its runner last reported it (utilisation included)."""
    if row.gpu_uuid is None or row.runner is None or not SessionState(row.state).live:
        return []
    return [gpu for gpu in runner_gpus(row.runner) if gpu.uuid == row.gpu_uuid]


@dataclass(frozen=True)
class Load:
    runner: Runner
    live: int
    claimed: frozenset[str]  # UUIDs of this runner's GPUs held by live sessions

    @property
    def free(self) -> int:
        return max(0, self.runner.capacity - self.live)

    def free_gpus(self) -> list[GpuDevice]:
        """Unclaimed GPUs, the one to give first first: warm, then lowest index."""
        free = [gpu for gpu in runner_gpus(self.runner) if gpu.uuid not in self.claimed]
        return sorted(free, key=lambda gpu: (not gpu.warm, gpu.index))

    def has_room(self, instance_type: InstanceType) -> bool:
        if self.runner.draining or self.live >= self.runner.capacity:
            return False
        if instance_type.value not in self.runner.instance_types:
            return False
        return instance_type is not InstanceType.GPU or bool(self.free_gpus())


@dataclass(frozen=True)
class Placement:
    runner: Runner
    gpu: GpuDevice | None = None  # GPU sessions: the GPU to claim


def online_since(now: datetime, runner_timeout_s: float) -> datetime:
    """Runners whose last heartbeat is at or after this instant count as online."""
    return now - timedelta(seconds=runner_timeout_s)


def online_runner_loads(db: Db, now: datetime, runner_timeout_s: float) -> list[Load]:
    live = (
        select(OffloadSession.runner_id.label("runner_id"), func.count().label("live"))
        .where(OffloadSession.state.in_(LIVE_STATES), OffloadSession.runner_id.is_not(None))
        .group_by(OffloadSession.runner_id)
        .subquery()
    )
    rows = db.execute(
        select(Runner, func.coalesce(live.c.live, 0))
        .outerjoin(live, live.c.runner_id == Runner.id)
        .where(Runner.last_heartbeat_at >= online_since(now, runner_timeout_s))
        .order_by(Runner.name)
    ).all()
    claimed = claimed_gpus(db, [runner.id for runner, _ in rows if runner.gpu_devices])
    return [Load(runner, int(n), frozenset(claimed[runner.id])) for runner, n in rows]


def claimed_gpus(db: Db, runner_ids: list[str]) -> dict[str, set[str]]:
    claimed: dict[str, set[str]] = defaultdict(set)
    if runner_ids:
        for runner_id, uuid in db.execute(
            select(GpuClaim.runner_id, GpuClaim.gpu_uuid).where(GpuClaim.runner_id.in_(runner_ids))
        ):
            claimed[runner_id].add(uuid)
    return claimed


def place(db: Db, instance_type: InstanceType, now: datetime, runner_timeout_s: float) -> Placement:
    """The live runner with room (and, for a GPU session, its GPU); NoCapacity says why none."""
    loads = online_runner_loads(db, now, runner_timeout_s)
    fitting = [load for load in loads if load.has_room(instance_type)]
    if not fitting:
        fix = GPU_BUSY_FIX if _gpus_all_busy(loads, instance_type) else RUNNER_FIX
        raise NoCapacity(_why_none(loads, instance_type), fix)
    if instance_type is not InstanceType.GPU:
        best = min(fitting, key=lambda load: (-load.free, load.live, load.runner.name))
        return Placement(best.runner)
    best = min(
        fitting,
        key=lambda load: (
            not load.free_gpus()[0].warm,
            -len(load.free_gpus()),
            -load.free,
            load.runner.name,
        ),
    )
    return Placement(best.runner, best.free_gpus()[0])


def _gpu_offering(loads: list[Load]) -> list[Load]:
    return [
        load
        for load in loads
        if InstanceType.GPU.value in load.runner.instance_types and load.runner.gpu_devices
    ]


def _gpus_all_busy(loads: list[Load], instance_type: InstanceType) -> bool:
    offering = [load for load in _gpu_offering(loads) if not load.runner.draining]
    return instance_type is InstanceType.GPU and bool(offering)


def _why_none(loads: list[Load], instance_type: InstanceType) -> str:
    if not loads:
        return "No runner is online to host your session."
    offering = [load for load in loads if instance_type.value in load.runner.instance_types]
    if instance_type is InstanceType.GPU:
        offering = _gpu_offering(loads)
    if not offering:
        return f"No online runner offers the {instance_type.value} instance type."
    if all(load.runner.draining for load in offering):
        return f"Every online runner offering {instance_type.value} is draining for maintenance."
    if instance_type is InstanceType.GPU:
        return (
            "Every GPU is in use: "
            + "; ".join(_gpu_load_line(load) for load in offering if not load.runner.draining)
            + "."
        )
    return (
        f"Every online runner offering {instance_type.value} is full "
        f"({len(offering)} runner(s) at capacity)."
    )


def _gpu_load_line(load: Load) -> str:
    gpus = runner_gpus(load.runner)
    models = ", ".join(sorted({gpu.model for gpu in gpus}))
    line = f"runner {load.runner.name} has {len(load.claimed)} of {len(gpus)} {models} busy"
    if load.live >= load.runner.capacity:
        line += f" and all {load.runner.capacity} session slots taken"
    return line
