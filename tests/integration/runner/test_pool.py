"""EnvironmentPool over real dockerd environments: warm hand-out, idempotent binding, reconcile."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from offload.core.config import RunnerSettings
from offload.core.errors import NoCapacity
from offload.core.schemas import AssignedSession, InstanceType, SessionState
from offload.core.waiting import async_wait_until
from offload.runner.driver import EnvState
from offload.runner.environment import DockerdDriver
from offload.runner.pool import EnvironmentPool
from tests.integration.runner.conftest import SMALL, MakeSettings, docker, leftovers
from tests.integration.runner.standin_policy import PermissiveStandInPolicy

pytestmark = pytest.mark.asyncio(loop_scope="module")


def make_session(state: SessionState = SessionState.STARTING) -> AssignedSession:
    return AssignedSession(
        session_id=f"ses-{uuid.uuid4().hex[:8]}",
        state=state,
        user="dev",
        org="default",
        instance_type=InstanceType.STANDARD,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def driver(runner_settings: RunnerSettings) -> DockerdDriver:
    return DockerdDriver(runner_settings, policy_factory=PermissiveStandInPolicy)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool(driver: DockerdDriver) -> AsyncIterator[EnvironmentPool]:
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


async def test_reconcile_pauses_idle_sessions_and_resumes_active_ones(
    pool: EnvironmentPool,
) -> None:
    session = make_session(SessionState.IDLE)
    [env] = await pool.reconcile([session])
    assert env.state == EnvState.PAUSED

    session.state = SessionState.ACTIVE
    await pool.reconcile([session])
    assert env.state == EnvState.BOUND
    await pool.release(session.session_id)


async def test_capacity_bounds_what_the_runner_holds(make_settings: MakeSettings) -> None:
    settings = make_settings()
    small = EnvironmentPool(
        DockerdDriver(settings, policy_factory=PermissiveStandInPolicy),
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
