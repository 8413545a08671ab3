"""A runner that registers again after a restart has lost its engines: its sessions end, honestly.

`offload runner` wipes every environment on its host before registering, so a session that had an
engine on it (active or idle) ends `failed` with a reason the agent can show, billed only up to the
runner's last heartbeat; a session still starting (no engine yet) is bound afresh as usual.
"""

from __future__ import annotations

import asyncssh

from offload.core.schemas import SessionState as S
from offload.server.services.runners import END_RUNNER_RESTARTED

from .support import session_request


async def test_a_restarted_runner_fails_the_sessions_whose_engine_it_lost(
    start_active, make_runner, clock
):
    user, runner, session = await start_active()
    clock.advance(20)
    await runner.heartbeat()
    last_beat = clock.current
    clock.advance(100)  # the runner is down for a while, then comes back under its name

    restarted = await make_runner(name=runner.name)

    assert restarted.id == runner.id
    ended = await user.client.get_session(session.id)
    assert ended.state is S.FAILED
    assert ended.end_reason == END_RUNNER_RESTARTED
    assert ended.ended_at == last_beat
    assert ended.billed_s == 20  # nothing after the last heartbeat is billed
    assert await restarted.session_ids() == []  # the runner is told to hold nothing for it


async def test_an_idle_session_on_a_restarted_runner_fails_too(start_active, make_runner, clock):
    user, runner, session = await start_active()
    clock.advance(10)
    await user.client.idle_session(session.id)
    assert (await user.client.get_session(session.id)).state is S.IDLE
    clock.advance(30)

    await make_runner(name=runner.name)

    ended = await user.client.get_session(session.id)
    assert (ended.state, ended.end_reason) == (S.FAILED, END_RUNNER_RESTARTED)
    assert ended.billed_s == 10  # billing had stopped when it went idle


async def test_a_starting_session_is_bound_afresh_after_a_restart(make_runner, make_user):
    runner = await make_runner()
    user = make_user()
    key = asyncssh.generate_private_key("ssh-ed25519")
    session = await user.client.create_session(session_request(key))

    restarted = await make_runner(name=runner.name)

    assert await restarted.session_ids() == [session.id]
    assigned = await restarted.client.session_ready(restarted.id, session.id, "env-new")
    assert assigned.state is S.ACTIVE


async def test_the_users_next_start_gets_a_new_session(start_active, make_runner):
    user, runner, session = await start_active()
    await make_runner(name=runner.name)

    key = asyncssh.generate_private_key("ssh-ed25519")
    fresh = await user.client.create_session(session_request(key))

    assert fresh.id != session.id
    assert fresh.state is S.STARTING


async def test_other_runners_sessions_are_untouched(start_active, make_runner):
    user, runner, session = await start_active()
    other = await make_runner()
    await make_runner(name=other.name)  # another runner restarts

    kept = await user.client.get_session(session.id)
    assert kept.state is S.ACTIVE
    assert [a.session_id for a in (await runner.heartbeat()).sessions] == [session.id]
