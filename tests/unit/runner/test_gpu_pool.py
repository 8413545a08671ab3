"""The pool's GPU rules with an in-memory driver: warm GPU environments each hold one GPU, a GPU
session takes the one holding its GPU, and no GPU is ever in two environments (the fake driver
asserts that at every create)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from offload.core.errors import Conflict, EnvironmentError_
from offload.core.schemas import AssignedSession, InstanceSpec, InstanceType, SessionState
from offload.core.waiting import async_wait_until
from offload.runner.pool import EnvironmentPool
from tests.support.drivers import FakeDriver, quiet_events

GPUS = ["GPU-aaaa", "GPU-bbbb"]
SMALL = InstanceSpec(cpus=1.0, memory_bytes=1024**3)


def gpu_session(*gpus: str, state: SessionState = SessionState.STARTING) -> AssignedSession:
    return AssignedSession(
        session_id=f"ses-{uuid.uuid4().hex[:8]}",
        state=state,
        user="dev",
        org="default",
        instance_type=InstanceType.GPU,
        gpu_uuids=list(gpus),
    )


def standard_session() -> AssignedSession:
    return AssignedSession(
        session_id=f"ses-{uuid.uuid4().hex[:8]}",
        state=SessionState.STARTING,
        user="dev",
        org="default",
        instance_type=InstanceType.STANDARD,
    )


def make_pool(
    driver: FakeDriver, size: int = 0, capacity: int = 4, warm_gpu: int = 1
) -> EnvironmentPool:
    return EnvironmentPool(
        driver,
        size=size,
        capacity=capacity,
        spec_for=lambda _: SMALL,
        events_for=quiet_events,
        gpus=GPUS,
        warm_gpu=warm_gpu,
    )


def pool_warm_gpus(
    pool: EnvironmentPool, count: int = 1
) -> Callable[[], Coroutine[Any, Any, bool]]:
    async def warm() -> bool:
        return len(pool.warm_gpus()) >= count

    return warm


async def settled(pool: EnvironmentPool) -> None:
    """The background fill has finished what it can do now."""
    task = pool._fill_task
    if task is not None:
        await asyncio.gather(task, return_exceptions=True)


async def test_a_gpu_session_takes_the_warm_environment_holding_its_gpu() -> None:
    driver = FakeDriver()
    pool = make_pool(driver)
    await pool.start()
    try:
        await async_wait_until(pool_warm_gpus(pool), 10, "a warm GPU environment")
        [warm] = driver.created
        assert warm.gpu_uuids == (GPUS[0],) and pool.warm_gpus() == {GPUS[0]}

        env = await pool.bind(gpu_session(GPUS[0]))

        assert env is warm
        await settled(pool)
        # The fill warms the GPU still free, in an environment of its own.
        assert pool.warm_gpus() == {GPUS[1]}
        assert [e.gpu_uuids for e in driver.created] == [(GPUS[0],), (GPUS[1],)]
        assert pool.report().warm == 1
    finally:
        await pool.close()
    assert driver.live == {}


async def test_a_gpu_without_a_warm_environment_gets_a_new_one_and_warm_ones_stay() -> None:
    driver = FakeDriver()
    pool = make_pool(driver)
    await pool.start()
    try:
        await async_wait_until(pool_warm_gpus(pool), 10, "a warm GPU environment")
        env = await pool.bind(gpu_session(GPUS[1]))
        assert env.gpu_uuids == (GPUS[1],)
        assert env not in [e for e in driver.created if e.gpu_uuids == (GPUS[0],)]
        assert pool.warm_gpus() == {GPUS[0]}
    finally:
        await pool.close()


async def test_a_gpu_bound_to_a_session_is_refused_to_another_until_released() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, warm_gpu=0)
    first, second = gpu_session(GPUS[0]), gpu_session(GPUS[0])
    try:
        await pool.bind(first)
        with pytest.raises(Conflict, match=f"GPU {GPUS[0]} is still held") as caught:
            await pool.bind(second)
        assert first.session_id in caught.value.message
        await pool.release(first.session_id)
        env = await pool.bind(second)
        assert env.gpu_uuids == (GPUS[0],)
    finally:
        await pool.close()


async def test_the_next_session_on_a_gpu_waits_for_the_last_ones_wipe() -> None:
    """The wipe kills what still runs on the GPU: a new session's environment on that GPU must
    not exist before it ends (the fake driver asserts no GPU is in two live environments)."""
    driver = FakeDriver()
    pool = make_pool(driver, warm_gpu=0)
    old, new = gpu_session(GPUS[0]), gpu_session(GPUS[0])
    try:
        await pool.bind(old)
        driver.destroy_go.clear()
        release = asyncio.create_task(pool.release(old.session_id))
        await driver.destroying.wait()  # the old environment's wipe has begun and is held
        created = len(driver.created)
        bind = asyncio.create_task(pool.bind(new))
        for _ in range(20):  # every step the bind can take without the wipe ending
            await asyncio.sleep(0)
        assert not bind.done() and len(driver.created) == created
        driver.destroy_go.set()
        await release
        env = await bind
        assert env.gpu_uuids == (GPUS[0],) and env.session_id == new.session_id
    finally:
        driver.destroy_go.set()
        await pool.close()


async def test_a_reassigned_gpu_moves_when_the_old_session_leaves_the_list() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, warm_gpu=0)
    old, new = gpu_session(GPUS[0]), gpu_session(GPUS[0])
    try:
        await pool.reconcile([old])
        [env] = await pool.reconcile([new])  # the old one is wiped first, then the new bound
        assert env.session_id == new.session_id and env.gpu_uuids == (GPUS[0],)
        assert pool.get(old.session_id) is None
    finally:
        await pool.close()


async def test_a_bind_waits_for_the_warm_environment_being_made_for_its_gpu() -> None:
    driver = FakeDriver()
    pool = make_pool(driver)
    driver.go.clear()  # the fill's create of GPU 0's warm environment is held half-way
    await pool.start()
    session = gpu_session(GPUS[0])
    bind = asyncio.create_task(pool.bind(session))
    await asyncio.sleep(0)
    assert not bind.done()
    driver.go.set()
    try:
        env = await bind
        # One environment for GPU 0: the warm one, handed to the session.
        assert [e.gpu_uuids for e in driver.created].count((GPUS[0],)) == 1
        assert env.gpu_uuids == (GPUS[0],) and env.session_id == session.session_id
    finally:
        await pool.close()


async def test_warm_gpu_environments_are_bounded_by_the_free_gpus() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, warm_gpu=5)
    await pool.start()
    try:
        await async_wait_until(pool_warm_gpus(pool, 2), 10, "both GPUs warm")
        await settled(pool)
        assert len(driver.live) == 2
        a, b = gpu_session(GPUS[0]), gpu_session(GPUS[1])
        await pool.bind(a)
        await pool.bind(b)
        await settled(pool)
        assert pool.warm_gpus() == set() and len(driver.live) == 2
        await pool.release(a.session_id)
        await async_wait_until(pool_warm_gpus(pool), 10, "the freed GPU warm again")
        assert pool.warm_gpus() == {GPUS[0]}
    finally:
        await pool.close()


async def test_at_capacity_a_warm_gpu_environment_gives_way() -> None:
    driver = FakeDriver()
    pool = make_pool(driver, capacity=2, warm_gpu=2)
    await pool.start()
    try:
        await async_wait_until(pool_warm_gpus(pool, 2), 10, "both GPUs warm")
        env = await pool.bind(standard_session())
        assert env.gpu_uuids == ()
        assert len(driver.live) == 2 and len(pool.warm_gpus()) == 1
    finally:
        await pool.close()


async def test_gpu_sessions_without_or_with_foreign_gpus_are_refused() -> None:
    pool = make_pool(FakeDriver(), warm_gpu=0)
    try:
        with pytest.raises(EnvironmentError_, match="has no GPU assigned"):
            await pool.bind(gpu_session())
        with pytest.raises(EnvironmentError_, match="GPU-zzzz, which this runner does not offer"):
            await pool.bind(gpu_session("GPU-zzzz"))
    finally:
        await pool.close()


async def test_a_two_gpu_session_gets_both_and_the_warm_one_gives_way() -> None:
    driver = FakeDriver()
    pool = make_pool(driver)
    await pool.start()
    try:
        await async_wait_until(pool_warm_gpus(pool), 10, "a warm GPU environment")
        [warm] = driver.created
        env = await pool.bind(gpu_session(*GPUS))
        assert set(env.gpu_uuids) == set(GPUS)
        assert warm.id in driver.destroyed
    finally:
        await pool.close()
