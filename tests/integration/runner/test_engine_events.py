"""Containers created and images used, from each bound engine's event stream: `docker run --rm`
containers live less than one survey, yet the heartbeat counts them and names their image."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from offload.core.config import RunnerSettings
from offload.core.schemas import EnvironmentReport, RunnerHeartbeat, SessionState
from offload.core.waiting import async_wait_until
from offload.runner import netns
from offload.runner.driver import Environment
from offload.runner.engine_events import EngineEvents
from offload.runner.environment import RootlessDriver
from offload.runner.pool import EnvironmentPool
from tests.integration.runner.conftest import SMALL, docker
from tests.integration.runner.test_pool import make_session
from tests.support.images import TEST_IMAGE, build_test_image

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool(runner_settings: RunnerSettings) -> AsyncIterator[EnvironmentPool]:
    driver = RootlessDriver(runner_settings)
    pool = EnvironmentPool(driver, size=0, capacity=2, spec_for=lambda _: SMALL)
    await pool.start()
    yield pool
    await pool.close()


async def survey(
    pool: EnvironmentPool, session_id: str
) -> tuple[RunnerHeartbeat, EnvironmentReport]:
    heartbeat = await pool.survey()
    [report] = [e for e in heartbeat.environments if e.session_id == session_id]
    return heartbeat, report


async def created_at_least(
    pool: EnvironmentPool, session_id: str, count: int
) -> tuple[RunnerHeartbeat, EnvironmentReport] | None:
    heartbeat, report = await survey(pool, session_id)
    return (heartbeat, report) if report.containers_created >= count else None


async def wait_created(
    pool: EnvironmentPool, session_id: str, count: int
) -> tuple[RunnerHeartbeat, EnvironmentReport]:
    return await async_wait_until(
        lambda: created_at_least(pool, session_id, count), 30, f"{count} containers created"
    )


def streams() -> set[str]:
    return {t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("engine-events")}


async def test_rm_containers_between_two_heartbeats_are_counted_with_their_image(
    pool: EnvironmentPool,
) -> None:
    session = make_session(SessionState.ACTIVE)
    env = await pool.bind(session)
    sid = session.session_id
    await asyncio.to_thread(build_test_image, f"unix://{env.engine_socket}")
    # Events arrive in order: once this run is seen, the build before it has been seen too.
    await docker(env, "run", "--rm", TEST_IMAGE, "true")
    heartbeat, first = await wait_created(pool, sid, 1)
    assert first.containers_created == 1  # the legacy builder's step containers do not count
    assert first.images == [TEST_IMAGE]
    pool.acknowledge(heartbeat)  # the control plane answered that heartbeat
    assert (await survey(pool, sid))[1].images == []  # nothing held, nothing waiting

    for _ in range(3):
        await docker(env, "run", "--rm", TEST_IMAGE, "true")
    _, second = await wait_created(pool, sid, 4)

    assert second.containers_created - first.containers_created == 3
    assert second.images == [TEST_IMAGE]
    assert (second.containers_total, second.running_containers) == (0, 0)  # all gone already
    await pool.release(sid)
    assert f"engine-events-{env.id}" not in streams()  # the stream ends with the environment


async def test_the_stream_reconnects_after_the_engine_restarts(pool: EnvironmentPool) -> None:
    session = make_session(SessionState.ACTIVE)
    env = await pool.bind(session)
    sid = session.session_id
    await asyncio.to_thread(build_test_image, f"unix://{env.engine_socket}")
    await docker(env, "run", "--rm", TEST_IMAGE, "true")
    await wait_created(pool, sid, 1)

    assert isinstance(pool.driver, RootlessDriver)
    await restart_engine(pool.driver, env)
    await docker(env, "run", "--rm", "--name", "after-restart", TEST_IMAGE, "true")

    _, report = await wait_created(pool, sid, 2)
    assert report.containers_created == 2  # the replay on reconnect counted nothing twice
    await pool.release(sid)


async def restart_engine(driver: RootlessDriver, env: Environment) -> None:
    """Kill the environment's sandbox and start it again as the driver does (same data-root,
    same paths): its engine's event stream breaks and comes back."""
    runtime = driver._runtimes[env.id]  # noqa: SLF001 - no production caller restarts an engine
    assert runtime.process is not None
    await asyncio.to_thread(runtime.cgroups.kill)
    await runtime.process.wait()
    await netns.delete(env.netns)
    await driver._launch(runtime, SMALL)  # noqa: SLF001


# ---- what one event changes (no engine needed) -------------------------------------------------


def create(image: str, stamp: int) -> dict[str, Any]:
    return {
        "Type": "container",
        "Action": "create",
        "Actor": {"ID": f"c{stamp}", "Attributes": {"image": image, "name": f"n{stamp}"}},
        "timeNano": stamp,
    }


async def test_events_are_counted_once_and_images_named_as_the_insights_show_them() -> None:
    events = EngineEvents("env-x", Path("/nonexistent.sock"), max_images=3)
    for stamp, image in enumerate(
        ["hello", "reg.local:5000/app", "web:1", "app@sha256:" + "a" * 64, "3f2a9c1b7e0d"], 1
    ):
        events.take(create(image, stamp))
    events.take(create("hello", 2))  # a reconnect's replay of an event seen already
    events.take({**create("hello", 6), "Action": "start"})
    events.take(create("sha256:" + "b" * 64, 7))  # a legacy builder step
    events.take(create("", 8))  # a builder step FROM scratch

    tally = events.tally()
    assert tally.created == 5  # a run by id counts, without a name
    assert tally.images == {"hello:latest", "reg.local:5000/app:latest", "web:1"}  # capped at 3
    events.acknowledge(["hello:latest", "web:1"])
    assert events.tally().images == {"reg.local:5000/app:latest"}
    assert events.tally().created == 5  # a running total: acknowledging never lowers it
