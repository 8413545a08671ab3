"""Runners: register, heartbeat (long poll), their sessions and only theirs."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from offload.core import schemas as s
from offload.core.errors import Conflict, InvalidInput, NotAuthenticated, NotFound
from offload.core.waiting import async_wait_until
from offload.server.context import ServerContext
from offload.server.db.models import Runner, RunnerToken
from offload.server.services.runners import MAX_WAIT_S, effective_wait
from offload.server.services.tokens import hash_token

from .support import new_host_key_line, session_request

# A long-poll wait that would fail a test by its length if the wake-up were missing.
LONG_WAIT_S = 14.0
BOUND_S = 10.0


async def test_register_and_heartbeat(make_runner, ctx: ServerContext, clock):
    runner = await make_runner(name="host-1")
    assert runner.registered.ca_public_key == ctx.ca.public_key_line()
    assert runner.registered.heartbeat_interval_s == ctx.settings.heartbeat_interval_s

    beat_time = clock.advance(3)
    desired = await runner.heartbeat(warm=2)

    assert desired.sessions == []
    assert desired.ca_public_key == ctx.ca.public_key_line()
    with ctx.db.transaction(read_only=True) as db:
        row = db.get_one(Runner, runner.id)
        assert (row.last_heartbeat_at, row.warm) == (beat_time, 2)


async def test_register_again_keeps_the_runner_id(make_runner):
    first = await make_runner(name="host-1")
    again = await make_runner(name="host-1")  # a restart with a new token
    assert again.id == first.id
    with pytest.raises(NotFound):  # the old token no longer acts for it
        await first.heartbeat()
    await again.heartbeat()


async def test_register_rejects_a_bad_host_key(make_runner):
    runner = await make_runner()
    request = s.RunnerRegister(
        name="bad", ssh_host="h", ssh_port=22, host_key="not a key", capacity=1
    )
    with pytest.raises(InvalidInput, match="host key"):
        await runner.client.register(request)


async def test_over_long_runner_fields_are_refused_not_truncated(
    make_runner, make_user, client_key, http: httpx.AsyncClient
):
    """SQLite would keep them whole, PostgreSQL would fail the request: both refuse them."""
    runner = await make_runner()
    as_runner = {"Authorization": f"Bearer {runner.token}"}
    body = s.RunnerRegister(
        name=runner.name, ssh_host="h", ssh_port=22, host_key=new_host_key_line(), capacity=1
    ).model_dump(mode="json")
    answer = await http.post(
        "/api/v1/runners/register", json={**body, "ssh_host": "h" * 256}, headers=as_runner
    )
    assert (answer.status_code, answer.json()["code"]) == (422, "invalid_input")
    assert "ssh_host" in answer.json()["message"]

    session = await make_user().client.create_session(session_request(client_key))
    answer = await http.post(
        f"/api/v1/runners/{runner.id}/sessions/{session.id}/ready",
        json={"env_id": "e" * 65},
        headers=as_runner,
    )
    assert (answer.status_code, answer.json()["code"]) == (422, "invalid_input")
    assert "env_id" in answer.json()["message"]
    ready = await runner.client.session_ready(runner.id, session.id, "env-1")
    assert ready.state is s.SessionState.ACTIVE


async def test_runner_routes_need_a_runner_token(make_user, http: httpx.AsyncClient):
    user = make_user()
    body = s.RunnerHeartbeat(capacity=1, warm=0).model_dump()
    for headers in ({}, {"Authorization": f"Bearer {user.token}"}):
        response = await http.post("/api/v1/runners/x/heartbeat", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["fix"]


async def test_long_poll_returns_when_a_session_is_placed_on_the_runner(
    make_runner, make_user, client_key, ctx: ServerContext
):
    runner = await make_runner()
    await runner.heartbeat()  # seen everything so far: the next poll parks
    poll = asyncio.create_task(runner.heartbeat(wait_s=LONG_WAIT_S))
    await async_wait_until(
        _async(lambda: ctx.signals.is_waiting(runner.id)), BOUND_S, "the heartbeat to park"
    )

    session = await make_user().client.create_session(session_request(client_key))

    desired = await asyncio.wait_for(poll, BOUND_S)
    assert [item.session_id for item in desired.sessions] == [session.id]
    assert desired.sessions[0].state is s.SessionState.STARTING


async def test_a_stopping_server_answers_parked_polls_and_parks_no_more(
    make_runner, ctx: ServerContext, http: httpx.AsyncClient
):
    runners = [await make_runner() for _ in range(2)]
    for runner in runners:
        await runner.heartbeat()  # seen everything so far: the next poll parks
    polls = [asyncio.create_task(runner.heartbeat(wait_s=LONG_WAIT_S)) for runner in runners]
    await async_wait_until(_async(lambda: ctx.signals.parked == 2), BOUND_S, "both to park")
    assert "offload_runner_polls_parked 2.0" in (await http.get("/metrics")).text

    ctx.signals.release_all()  # what `offload server` does on SIGTERM (main._Server)
    for poll in polls:
        assert (await asyncio.wait_for(poll, BOUND_S)).sessions == []
    assert ctx.signals.parked == 0
    # A poll that comes in while the server stops answers at once: it never parks.
    later = asyncio.create_task(runners[0].heartbeat(wait_s=LONG_WAIT_S))
    assert (await asyncio.wait_for(later, BOUND_S)).sessions == []
    assert ctx.signals.parked == 0


async def test_first_heartbeat_after_register_answers_at_once(make_runner, make_user, client_key):
    runner = await make_runner()
    session = await make_user().client.create_session(session_request(client_key))
    # The runner never heard of the session: a long poll must not make it wait.
    desired = await asyncio.wait_for(runner.heartbeat(wait_s=LONG_WAIT_S), BOUND_S)
    assert [item.session_id for item in desired.sessions] == [session.id]


async def test_a_quiet_long_poll_ends_after_its_wait(make_runner):
    runner = await make_runner()
    await runner.heartbeat()
    desired = await asyncio.wait_for(runner.heartbeat(wait_s=0.2), BOUND_S)
    assert desired.sessions == []


def test_wait_is_clamped():
    assert effective_wait(-5, runner_timeout_s=300) == 0
    assert effective_wait(1000, runner_timeout_s=300) == MAX_WAIT_S
    assert effective_wait(20, runner_timeout_s=30) == 15


async def test_a_runner_sees_only_its_own_sessions(make_runner, make_user, client_key):
    mine = await make_runner(name="a-mine", capacity=1)
    other = await make_runner(name="b-other", capacity=1)
    first = await make_user().client.create_session(session_request(client_key))
    second = await make_user().client.create_session(session_request(client_key))
    assert first.runner and second.runner
    on_mine, on_other = (first, second) if first.runner.id == mine.id else (second, first)

    assigned = await mine.client.assigned_session(mine.id, on_mine.id)
    assert (assigned.session_id, assigned.user) == (on_mine.id, on_mine.user)
    with pytest.raises(NotFound):
        await mine.client.assigned_session(mine.id, on_other.id)
    with pytest.raises(NotFound):  # nor through the other runner's id
        await mine.client.assigned_session(other.id, on_other.id)
    with pytest.raises(NotFound):
        await mine.client.session_ready(mine.id, on_other.id, "env-x")
    assert await mine.session_ids() == [on_mine.id]


async def test_ready_makes_the_session_active(make_runner, make_user, client_key, clock):
    runner = await make_runner()
    user = make_user()
    session = await user.client.create_session(session_request(client_key))
    ready_time = clock.advance(1)

    assigned = await runner.client.session_ready(runner.id, session.id, "env-1")

    assert assigned.state is s.SessionState.ACTIVE
    info = await user.client.get_session(session.id)
    assert (info.state, info.started_at) == (s.SessionState.ACTIVE, ready_time)
    clock.advance(1)
    again = await runner.client.session_ready(runner.id, session.id, "env-1")  # idempotent
    assert again.state is s.SessionState.ACTIVE
    assert (await user.client.get_session(session.id)).started_at == ready_time
    with pytest.raises(Conflict):
        await runner.client.session_ready(runner.id, session.id, "env-2")


async def test_stop_removes_the_session_from_the_runner_and_wakes_it(
    make_runner, make_user, client_key, ctx: ServerContext
):
    runner = await make_runner()
    user = make_user()
    session = await user.client.create_session(session_request(client_key))
    await runner.client.session_ready(runner.id, session.id, "env-1")
    assert await runner.session_ids() == [session.id]
    poll = asyncio.create_task(runner.heartbeat(wait_s=LONG_WAIT_S))
    await async_wait_until(
        _async(lambda: ctx.signals.is_waiting(runner.id)), BOUND_S, "the heartbeat to park"
    )

    await user.client.stop_session(session.id)

    desired = await asyncio.wait_for(poll, BOUND_S)
    assert desired.sessions == []
    with pytest.raises(NotFound):
        await runner.client.assigned_session(runner.id, session.id)


async def test_a_revoked_runner_token_is_refused(make_runner, ctx: ServerContext, clock):
    runner = await make_runner()
    with ctx.db.transaction() as db:
        db.query(RunnerToken).filter_by(
            token_hash=hash_token(runner.token)
        ).one().revoked_at = clock()
    with pytest.raises(NotAuthenticated, match="revoked"):
        await runner.heartbeat()


async def test_metrics_count_sessions_and_online_runners(
    make_runner, make_user, client_key, http: httpx.AsyncClient, clock, settings
):
    await make_runner()
    await make_user().client.create_session(session_request(client_key))
    text = (await http.get("/metrics")).text
    assert 'offload_sessions{state="starting"} 1.0' in text
    assert "offload_runners_online 1.0" in text
    clock.advance(settings.runner_timeout_s + 1)
    assert "offload_runners_online 0.0" in (await http.get("/metrics")).text


def _async(condition):
    async def _check():
        return condition()

    return _check
