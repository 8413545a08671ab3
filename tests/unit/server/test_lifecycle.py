"""Every lifecycle transition, driven by the FakeClock and `tick` (no real waiting).

Active → idle after the idle timeout, idle → active within grace (billed as continuous), idle →
terminated after 5 minutes, activity from the agent and from running containers, a late clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import asyncssh
import pytest
from sqlalchemy import select, text, update

from offload.core import schemas as s
from offload.core.waiting import async_wait_until
from offload.server.context import ServerContext
from offload.server.db.models import OffloadSession
from offload.server.services import ledger, lifecycle

from .support import BUSY, session_request

S = s.SessionState
BOUND_S = 20.0  # below the database's 30 s lock timeout: a wait that never ends fails first
ONE_WRITER = "SQLite has one writer: every write there waits its turn"


async def _state(user, session_id: str) -> S:
    return (await user.client.get_session(session_id)).state


async def test_an_active_session_goes_idle_after_its_timeout_and_billing_stops(
    start_active, clock, tick
):
    user, runner, info = await start_active(idle_timeout_s=60)
    t0 = clock()
    assert info.state is S.ACTIVE
    assert (info.last_activity_at, info.time_until_idle_s, info.billed_s) == (t0, 60, 0)
    assert (await runner.heartbeat()).sessions[0].paused is False

    clock.advance(59)
    await tick()
    assert await _state(user, info.id) is S.ACTIVE
    clock.advance(1)
    await tick()

    idle = await user.client.get_session(info.id)
    assert idle.state is S.IDLE
    assert idle.idle_since == t0 + timedelta(seconds=60)
    assert idle.grace_ends_at == t0 + timedelta(seconds=360)
    assert idle.time_until_idle_s is None
    assert idle.billed_s == 60
    clock.advance(100)
    assert (await user.client.get_session(info.id)).billed_s == 60  # billing stopped
    desired = await runner.heartbeat()
    assert [(x.session_id, x.paused) for x in desired.sessions] == [(info.id, True)]


async def test_activity_restarts_the_quiet_clock_and_empty_reports_do_not(
    start_active, clock, tick
):
    user, _, info = await start_active(idle_timeout_s=60)
    t0 = clock()
    clock.advance(50)
    after = await user.client.report_activity(info.id, s.ActivityReport(open_streams=1))
    assert (after.last_activity_at, after.time_until_idle_s) == (clock(), 60)
    clock.advance(5)
    empty = await user.client.report_activity(info.id, s.ActivityReport())
    assert empty.last_activity_at == t0 + timedelta(seconds=50)
    clock.advance(54)
    await tick()
    assert await _state(user, info.id) is S.ACTIVE
    clock.advance(1)
    await tick()
    assert (await user.client.get_session(info.id)).idle_since == t0 + timedelta(seconds=110)


async def test_activity_within_grace_resumes_and_the_gap_is_billed(
    start_active, clock, tick, ctx: ServerContext
):
    user, runner, info = await start_active(idle_timeout_s=60)
    t0 = clock()
    clock.advance(60)
    await tick()
    assert await _state(user, info.id) is S.IDLE

    clock.advance(299)  # one second before the grace ends
    resumed = await user.client.report_activity(info.id, s.ActivityReport(building=True))

    assert resumed.state is S.ACTIVE
    assert resumed.idle_since is None and resumed.grace_ends_at is None
    assert resumed.billed_s == 359  # continuous: the idle gap is billed
    assert (await runner.heartbeat()).sessions[0].paused is False
    clock.advance(41)
    stopped = await user.client.stop_session(info.id)
    assert stopped.billed_s == 400
    with ctx.db.transaction(read_only=True) as db:
        assert ledger.session_intervals(db, info.id) == [
            ledger.Interval(t0, t0 + timedelta(seconds=400))
        ]


async def test_after_five_idle_minutes_the_session_ends_and_the_next_start_is_clean(
    start_active, clock, tick, client_key
):
    user, runner, info = await start_active(idle_timeout_s=60)
    clock.advance(60)
    await tick()
    clock.advance(299)
    await tick()
    assert await _state(user, info.id) is S.IDLE
    clock.advance(1)
    await tick()

    ended = await user.client.get_session(info.id)
    assert ended.state is S.TERMINATED
    assert ended.end_reason == lifecycle.END_IDLE_EXPIRED
    assert ended.billed_s == 60  # closed at the idle moment
    assert await runner.session_ids() == []  # the runner wipes it
    late = await user.client.report_activity(info.id, BUSY)  # too late: no resurrection
    assert late.state is S.TERMINATED

    fresh = await user.client.create_session(session_request(client_key))
    assert fresh.id != info.id
    assert fresh.replaced_session_notice and info.id in fresh.replaced_session_notice
    await user.client.stop_session(fresh.id)
    again = await user.client.create_session(session_request(client_key))
    assert again.replaced_session_notice is None  # told once


@contextmanager
def _write_turn_held(ctx: ServerContext) -> Iterator[None]:
    """Another writer (an operator's command, another replica) holds the write turn."""
    with ctx.db.transaction() as writer:
        writer.execute(select(1))  # its transaction begins here, and with it the turn
        yield


async def _until_waiting_for_the_write_turn(ctx: ServerContext) -> None:
    waiting = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'"
    )

    async def someone_waits() -> bool:
        with ctx.db.transaction(read_only=True) as db:
            return bool(db.scalar(waiting))

    await async_wait_until(someone_waits, BOUND_S, "a writer waiting for the write turn", 0.01)


@pytest.mark.databases("postgresql", reason=ONE_WRITER)
async def test_an_active_sessions_activity_does_not_wait_for_other_writers(
    start_active, clock, ctx: ServerContext
):
    """The hot path: 1,000 agents report every 5 s; only their own session row is locked."""
    user, _, info = await start_active(idle_timeout_s=60)
    clock.advance(30)
    with _write_turn_held(ctx):
        report = user.client.report_activity(info.id, s.ActivityReport(open_streams=1))
        answer = await asyncio.wait_for(report, BOUND_S)
    assert (answer.state, answer.last_activity_at, answer.time_until_idle_s) == (
        S.ACTIVE,
        clock(),
        60,
    )
    assert (await user.client.get_session(info.id)).last_activity_at == clock()


@pytest.mark.databases("postgresql", reason=ONE_WRITER)
async def test_activity_that_resumes_a_session_takes_its_turn(
    start_active, clock, tick, ctx: ServerContext
):
    """A resume writes the ledger: it waits for the writer before it, then resumes."""
    user, _, info = await start_active(idle_timeout_s=60)
    clock.advance(60)
    await tick()
    clock.advance(10)
    with _write_turn_held(ctx):
        report = asyncio.create_task(
            user.client.report_activity(info.id, s.ActivityReport(building=True))
        )
        await _until_waiting_for_the_write_turn(ctx)
        assert not report.done()
    resumed = await asyncio.wait_for(report, BOUND_S)
    assert (resumed.state, resumed.billed_s) == (S.ACTIVE, 70)


async def test_a_stamp_never_moves_the_databases_clock_back(start_active, clock, ctx):
    """A heartbeat that loaded the row before an activity report committed a later stamp
    must not write its earlier time over it."""
    _, _, info = await start_active(idle_timeout_s=60)
    t0 = clock()
    later = t0 + timedelta(seconds=20)
    with ctx.db.transaction() as db:
        row = db.get(OffloadSession, info.id)
        assert row is not None and row.last_activity_at == t0
        moved = update(OffloadSession).where(OffloadSession.id == info.id)
        moved = moved.values(last_activity_at=later).execution_options(synchronize_session=False)
        db.execute(moved)  # as another writer would have: the loaded row still shows t0
        assert row.last_activity_at == t0
        lifecycle.stamp_activity(db, [row], t0 + timedelta(seconds=10))
    with ctx.db.transaction(read_only=True) as db:
        stamp = db.scalar(select(OffloadSession.last_activity_at).filter_by(id=info.id))
    assert stamp == later


async def test_one_stamp_for_many_sessions_moves_each_forward_and_none_back(
    start_active, clock, ctx
):
    """A heartbeat stamps all its busy sessions in one statement: each moves to `now`, except
    one another writer already stamped later, which keeps its own time."""
    _, runner, first = await start_active(idle_timeout_s=60)
    _, _, second = await start_active(runner=runner, idle_timeout_s=60)
    t0 = clock()
    later = t0 + timedelta(seconds=20)
    with ctx.db.transaction() as db:
        rows = [db.get(OffloadSession, sid) for sid in (first.id, second.id)]
        moved = update(OffloadSession).where(OffloadSession.id == second.id)
        db.execute(
            moved.values(last_activity_at=later).execution_options(synchronize_session=False)
        )
        lifecycle.stamp_activity(db, rows, t0 + timedelta(seconds=10))
    with ctx.db.transaction(read_only=True) as db:
        stamps = dict(db.execute(select(OffloadSession.id, OffloadSession.last_activity_at)).all())
    assert stamps == {first.id: t0 + timedelta(seconds=10), second.id: later}


async def test_a_late_clock_stamps_each_step_when_it_was_due(start_active, clock, tick):
    user, _, info = await start_active(idle_timeout_s=60)
    t0 = clock()
    clock.advance(3600)  # the control plane was down
    await tick()
    ended = await user.client.get_session(info.id)
    assert ended.state is S.TERMINATED
    assert ended.ended_at == t0 + timedelta(seconds=360)
    assert ended.billed_s == 60


async def test_a_start_on_an_idle_session_resumes_it(start_active, clock, tick):
    user, _, info = await start_active(idle_timeout_s=60)
    clock.advance(100)
    await tick()
    key = asyncssh.generate_private_key("ssh-ed25519")
    again = await user.client.create_session(session_request(key))
    assert (again.id, again.state, again.billed_s) == (info.id, S.ACTIVE, 100)


async def test_running_containers_count_as_activity_and_feed_insights(start_active, clock, tick):
    user, runner, info = await start_active(idle_timeout_s=60)
    clock.advance(50)
    report = s.RunnerHeartbeat(
        capacity=4,
        warm=0,
        environments=[
            s.EnvironmentReport(
                env_id="env-1",
                session_id=info.id,
                state="bound",
                running_containers=1,
                containers_total=3,
                images=["busybox:latest", "app:dev"],
            )
        ],
    )
    await runner.client.heartbeat(runner.id, report)
    assert (await user.client.get_session(info.id)).last_activity_at == clock()
    clock.advance(60)
    await tick()
    assert await _state(user, info.id) is S.IDLE
    await runner.client.heartbeat(runner.id, report)  # racing the pause: must not wake it
    assert await _state(user, info.id) is S.IDLE
    usage = await user.client.usage()
    assert [i.image for i in usage.top_images] == ["app:dev", "busybox:latest"]
    assert usage.recent_sessions[0].containers == 3


async def test_idle_now(start_active, clock, tick):
    user, runner, info = await start_active()
    clock.advance(30)
    idle = await user.client.idle_session(info.id)
    assert (idle.state, idle.billed_s) == (S.IDLE, 30)
    assert (await runner.heartbeat()).sessions[0].paused is True
    again = await user.client.idle_session(info.id)  # idempotent
    assert again.idle_since == idle.idle_since


async def test_a_double_tick_changes_nothing_more(start_active, clock, tick, ctx: ServerContext):
    user, _, info = await start_active(idle_timeout_s=60)
    clock.advance(60)
    assert await tick() == 1
    assert await tick() == 0
    assert (await user.client.get_session(info.id)).billed_s == 60
