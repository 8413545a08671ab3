"""Many runner hosts: placement by free capacity, draining, the operator's view, and runners
that die (their sessions fail billed to the last heartbeat, exactly once however many replicas
tick)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncssh
import pytest

from offload.core import schemas as s
from offload.core.config import ServerSettings
from offload.core.errors import NoCapacity
from offload.core.schemas import SessionState as S
from offload.server import bootstrap
from offload.server.context import ServerContext
from offload.server.services import background, ledger
from tests.support.ledger_checks import ledger_violations

from .support import FakeClock, session_request

LOST_AFTER_S = 120.0


@pytest.fixture
def settings(settings: ServerSettings) -> ServerSettings:
    """The default liveness rule (the shared settings put it a month away)."""
    return settings.model_copy(update={"runner_lost_after_s": LOST_AFTER_S})


def _billed(ctx: ServerContext, session_id: str) -> float:
    with ctx.db.transaction(read_only=True) as db:
        return ledger.session_seconds(db, session_id, ctx.now())


def _violations(ctx: ServerContext) -> list[str]:
    with ctx.db.transaction(read_only=True) as db:
        return ledger_violations(db)


async def test_a_lost_runners_sessions_fail_billed_exactly_to_its_last_heartbeat(
    ctx: ServerContext, clock: FakeClock, start_active, tick
) -> None:
    user, runner, session = await start_active()
    started = clock()
    clock.advance(40)
    await runner.heartbeat()  # the last sign of life: 40 s after the start
    lost_after = ctx.settings.runner_lost_after_s
    clock.advance(lost_after - 1)
    await tick()
    assert (await user.client.get_session(session.id)).state is S.ACTIVE
    clock.advance(1)
    await tick()

    ended = await user.client.get_session(session.id)
    assert ended.state is S.FAILED
    assert ended.end_reason == (
        f"runner {runner.name} lost: no heartbeat since "
        f"{(started + timedelta(seconds=40)).isoformat(timespec='seconds')}"
    )
    assert ended.ended_at == started + timedelta(seconds=40)
    assert _billed(ctx, session.id) == 40.0  # not a second more, not one less
    assert _violations(ctx) == []
    await tick()  # nothing more to do: it failed once
    assert (await user.client.get_session(session.id)).ended_at == ended.ended_at


async def test_a_runner_that_heartbeats_in_time_keeps_its_sessions(
    ctx: ServerContext, clock: FakeClock, start_active, tick
) -> None:
    user, runner, session = await start_active()
    for _ in range(5):
        clock.advance(ctx.settings.runner_lost_after_s - 1)
        await runner.heartbeat()
        await user.client.report_activity(session.id, s.ActivityReport(api_calls=1))
        await tick()
    kept = await user.client.get_session(session.id)
    assert kept.state is S.ACTIVE and kept.end_reason is None


async def test_replicas_ticking_together_fail_each_session_once(
    ctx: ServerContext, settings, app_for, clock: FakeClock, make_runner, make_user, tick
) -> None:
    """Three control planes on one database tick at the same moment (PostgreSQL: SKIP LOCKED
    claims; SQLite: serial writers); each session ends once, the ledger stays sound."""
    runner = await make_runner(capacity=20)
    users = [make_user() for _ in range(12)]
    ids = []
    for user in users:
        created = await user.client.create_session(
            session_request(asyncssh.generate_private_key("ssh-ed25519"))
        )
        await runner.client.session_ready(runner.id, created.id, f"env-{created.id}")
        ids.append(created.id)
    clock.advance(ctx.settings.runner_lost_after_s + 5)
    replicas = [ctx] + [app_for(settings).state.context for _ in range(2)]
    counts = await asyncio.gather(*(background.tick(replica) for replica in replicas))
    await tick()
    assert sum(counts) == len(ids)
    for user, session_id in zip(users, ids, strict=True):
        ended = await user.client.get_session(session_id)
        assert ended.state is S.FAILED and "lost" in (ended.end_reason or "")
    assert _violations(ctx) == []


async def test_placement_spreads_by_free_slots_and_skips_draining_runners(
    ctx: ServerContext, settings, clock: FakeClock, make_runner, make_user
) -> None:
    small = await make_runner(name="host-a", capacity=2)
    large = await make_runner(name="host-b", capacity=4)

    async def place() -> str:
        key = asyncssh.generate_private_key("ssh-ed25519")
        info = await make_user().client.create_session(session_request(key))
        assert info.runner is not None
        return info.runner.name

    # The most free slots first (b: 4, 3), a tie goes to the fewer live sessions (a: 2 free,
    # none live; b: 2 free, 2 live), then b (2 > 1 free) and a (1 = 1, fewer live).
    assert [await place() for _ in range(5)] == ["host-b", "host-b", "host-a", "host-b", "host-a"]
    fleet = bootstrap.drain_runner(settings, "host-b", True, clock)
    assert [v.draining for v in fleet.runners] == [False, True]
    with pytest.raises(NoCapacity) as full:
        await place()  # a is full, b is draining
    assert "full" in full.value.message
    bootstrap.drain_runner(settings, "host-b", False, clock)
    assert await place() == "host-b"
    bootstrap.drain_runner(settings, "host-a", True, clock)
    bootstrap.drain_runner(settings, "host-b", True, clock)
    with pytest.raises(NoCapacity) as drained:
        await place()
    assert "draining" in drained.value.message
    del small, large


async def test_drained_sessions_run_to_their_end(
    ctx: ServerContext, settings, clock: FakeClock, start_active
) -> None:
    user, runner, session = await start_active()
    bootstrap.drain_runner(settings, runner.name, True, clock)
    clock.advance(30)
    await user.client.report_activity(session.id, s.ActivityReport(api_calls=1))
    assert (await user.client.get_session(session.id)).state is S.ACTIVE
    assert (await user.client.stop_session(session.id)).state is S.TERMINATED


async def test_the_operator_view_lists_hosts_capacity_and_sessions(
    ctx: ServerContext, settings, clock: FakeClock, make_runner, start_active
) -> None:
    busy = await make_runner(name="fleet-1", capacity=5)  # the most free slots: placed here
    await make_runner(name="fleet-2", capacity=3)
    _, _, session = await start_active(runner=busy)
    silent = await make_runner(name="fleet-3", capacity=2)
    clock.advance(ctx.settings.runner_timeout_s + 1)
    await busy.heartbeat()
    fleet = bootstrap.runner_fleet(settings, clock)
    views = {view.name: view for view in fleet.runners}
    assert views["fleet-1"].sessions == [session.id]
    # Its heartbeat reported capacity 4 (what the runner has now, e.g. after a reconfiguration).
    assert (views["fleet-1"].capacity, views["fleet-1"].live_sessions) == (4, 1)
    assert views["fleet-1"].free == 3
    assert views["fleet-1"].online and not views["fleet-2"].online
    assert views[silent.name].free == 0  # offline: nothing can be placed there
    assert (fleet.online, fleet.live_sessions, fleet.free) == (1, 1, 3)
    with pytest.raises(Exception, match="No runner is named"):
        bootstrap.drain_runner(settings, "nope", True, clock)
