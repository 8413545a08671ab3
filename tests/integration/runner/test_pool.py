"""EnvironmentPool over real dockerd environments: warm hand-out, idempotent binding, reconcile."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator

import asyncssh
import pytest
import pytest_asyncio

from offload.core.api_client import RunnerClient
from offload.core.config import RunnerSettings
from offload.core.errors import NoCapacity
from offload.core.schemas import (
    AssignedSession,
    EnvironmentReport,
    InstanceType,
    RunnerHeartbeat,
    SessionState,
)
from offload.core.waiting import async_wait_until
from offload.runner.daemon import ACTIVE_WAIT_S, Runner
from offload.runner.driver import Environment, EnvState
from offload.runner.environment import EnvPaths, RootlessDriver, engine_pid
from offload.runner.pool import EnvironmentPool
from tests.integration.runner.conftest import SMALL, MakeSettings, docker, leftovers
from tests.support.images import TEST_IMAGE, build_test_image

pytestmark = pytest.mark.asyncio(loop_scope="module")


def make_session(
    state: SessionState = SessionState.STARTING, paused: bool = False
) -> AssignedSession:
    return AssignedSession(
        session_id=f"ses-{uuid.uuid4().hex[:8]}",
        state=state,
        user="dev",
        org="default",
        instance_type=InstanceType.STANDARD,
        paused=paused,
    )


async def is_paused(env: Environment, container: str) -> str:
    return (await docker(env, "inspect", "-f", "{{.State.Paused}}", container)).out


async def run_sleeper(env: Environment, name: str) -> None:
    await docker(env, "run", "-d", "--name", name, TEST_IMAGE, "sleep", "300")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def driver(runner_settings: RunnerSettings) -> RootlessDriver:
    return RootlessDriver(runner_settings)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool(driver: RootlessDriver) -> AsyncIterator[EnvironmentPool]:
    pool = EnvironmentPool(driver, size=1, capacity=3, spec_for=lambda _: SMALL)
    await pool.start()
    yield pool
    await pool.close()


async def warm_ids(pool: EnvironmentPool) -> list[str]:
    return [e.env_id for e in pool.report().environments if e.session_id is None]


async def test_a_warm_environment_is_handed_out_once_to_concurrent_binds(
    pool: EnvironmentPool,
) -> None:
    [warm] = await async_wait_until(lambda: warm_ids(pool), 30, "a warm environment")
    session = make_session()

    envs = await asyncio.gather(*(pool.bind(session) for _ in range(3)))

    assert {e.id for e in envs} == {warm}
    assert envs[0] is envs[1] is envs[2] is pool.get(session.session_id)
    assert envs[0].state == EnvState.BOUND and envs[0].session_id == session.session_id
    assert (await docker(envs[0], "info", "--format", "{{.ID}}")).out
    # The pool refills behind the hand-out.
    refilled = await async_wait_until(lambda: warm_ids(pool), 30, "the pool to refill")
    assert refilled != [warm]
    await pool.release(session.session_id)


async def test_reconcile_binds_listed_sessions_and_destroys_the_rest(
    runner_settings: RunnerSettings, pool: EnvironmentPool
) -> None:
    gone, ended, kept = make_session(), make_session(), make_session(SessionState.ACTIVE)
    gone_env = await pool.bind(gone)
    ended_env = await pool.bind(ended)
    ended.state = SessionState.TERMINATED

    newly = await pool.reconcile([ended, kept])

    assert [e.session_id for e in newly] == [kept.session_id]
    assert pool.get(gone.session_id) is None and pool.get(ended.session_id) is None
    assert leftovers(runner_settings, gone_env.id) == []
    assert leftovers(runner_settings, ended_env.id) == []
    assert await pool.reconcile([kept]) == []  # nothing new the second time
    report = pool.report()
    assert [e.session_id for e in report.environments if e.session_id] == [kept.session_id]
    await pool.reconcile([])
    assert pool.get(kept.session_id) is None


async def test_the_paused_flag_pauses_and_resumes_containers(
    runner_settings: RunnerSettings, pool: EnvironmentPool
) -> None:
    heartbeat = Runner(
        runner_settings,
        RunnerClient("http://127.0.0.1:9", "off_r_unused"),
        pool,
        asyncssh.generate_private_key("ssh-ed25519"),
    )
    session = make_session(SessionState.ACTIVE)
    [env] = await pool.reconcile([session])
    await asyncio.to_thread(build_test_image, f"unix://{env.engine_socket}")
    await run_sleeper(env, "worker")

    # An active session's containers may start any moment: the heartbeat polls briefly.
    assert heartbeat.poll_wait() == min(ACTIVE_WAIT_S, runner_settings.heartbeat_wait_s) < 10
    idle = session.model_copy(update={"state": SessionState.IDLE, "paused": True})
    await pool.reconcile([idle])
    assert env.state == EnvState.PAUSED
    assert await is_paused(env, "worker") == "true"
    assert heartbeat.poll_wait() == runner_settings.heartbeat_wait_s  # nothing is activity
    # Idempotent: the same list again changes nothing; a container that runs anyway (started
    # while paused) is frozen on the next reconcile once a survey has seen it.
    await pool.reconcile([idle])
    await run_sleeper(env, "late")
    await pool.survey()
    await pool.reconcile([idle])
    assert await is_paused(env, "late") == "true"
    assert _report_of(await pool.survey(), session.session_id).running_containers == 0

    await pool.reconcile([session])  # paused turns false: the session is active again
    assert env.state == EnvState.BOUND
    assert await is_paused(env, "worker") == "false"
    assert await is_paused(env, "late") == "false"
    await pool.release(session.session_id)
    await heartbeat.client.aclose()


async def test_survey_reports_what_each_engine_holds_and_outlasts_a_stuck_one(
    runner_settings: RunnerSettings, pool: EnvironmentPool
) -> None:
    session = make_session(SessionState.ACTIVE)
    [env] = await pool.reconcile([session])
    await asyncio.to_thread(build_test_image, f"unix://{env.engine_socket}")
    await run_sleeper(env, "running")
    await run_sleeper(env, "frozen-by-user")
    await docker(env, "pause", "frozen-by-user")

    report = _report_of(await pool.survey(), session.session_id)
    assert (report.running_containers, report.containers_total) == (1, 2)
    assert report.images == [TEST_IMAGE]

    # A stuck engine (its dockerd stopped): the heartbeat does not wait on it, and reports what
    # it saw last rather than "nothing runs".
    pid = engine_pid(EnvPaths.of(runner_settings, env.id))
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        stuck = _report_of(await pool.survey(timeout_s=0.5), session.session_id)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert (stuck.running_containers, stuck.images) == (1, [TEST_IMAGE])
    await pool.release(session.session_id)
    assert [e for e in pool.report().environments if e.session_id] == []


def _report_of(heartbeat: RunnerHeartbeat, session_id: str) -> EnvironmentReport:
    [report] = [e for e in heartbeat.environments if e.session_id == session_id]
    return report


async def test_capacity_bounds_what_the_runner_holds(make_settings: MakeSettings) -> None:
    settings = make_settings()
    small = EnvironmentPool(
        RootlessDriver(settings),
        size=0,
        capacity=1,
        spec_for=lambda _: SMALL,
    )
    first, second = make_session(), make_session()
    try:
        env = await small.bind(first)
        with pytest.raises(NoCapacity):
            await small.bind(second)
        await small.release(first.session_id)
        assert (await small.bind(second)).id != env.id
    finally:
        await small.close()
    assert small.report().environments == []
