"""Containers and images in the usage insights come from the runner's running totals: a session
that only ran `docker run --rm` containers shows them, and a retried, repeated or late heartbeat
(or a restarted control plane) never counts a container twice."""

from __future__ import annotations

from offload.core import schemas as s
from offload.core.config import ServerSettings

from .support import BUSY


def _beat(session_id: str, created: int, images: list[str], running: int = 0) -> s.RunnerHeartbeat:
    """What the runner sends after --rm containers came and went: nothing held, `created` seen."""
    return s.RunnerHeartbeat(
        capacity=4,
        warm=0,
        environments=[
            s.EnvironmentReport(
                env_id=f"env-{session_id}",
                session_id=session_id,
                state="bound",
                running_containers=running,
                containers_total=running,
                images=images,
                containers_created=created,
            )
        ],
    )


async def _containers(user, session_id: str) -> tuple[int, int, list[str]]:
    usage = await user.client.usage()
    [summary] = [x for x in usage.recent_sessions if x.id == session_id]
    [activity] = [x for x in usage.recent_activity if x.session_id == session_id]
    return summary.containers, activity.containers, [i.image for i in usage.top_images]


async def test_a_session_with_only_rm_containers_shows_them_and_their_image(start_active, clock):
    user, runner, info = await start_active()
    clock.advance(5)
    await runner.client.heartbeat(runner.id, _beat(info.id, 3, ["hello:latest"]))

    assert await _containers(user, info.id) == (3, 3, ["hello:latest"])
    [active] = (await user.client.usage()).active_sessions
    assert (active.id, active.containers) == (info.id, 3)


async def test_retried_repeated_and_late_reports_do_not_double_count(start_active, clock):
    user, runner, info = await start_active()
    first = _beat(info.id, 3, ["hello:latest"])
    await runner.client.heartbeat(runner.id, first)
    await runner.client.heartbeat(runner.id, first)  # a retry of the same report
    await runner.client.heartbeat(runner.id, _beat(info.id, 3, []))  # images acknowledged
    assert await _containers(user, info.id) == (3, 3, ["hello:latest"])

    await runner.client.heartbeat(runner.id, _beat(info.id, 5, ["web:1"]))
    await runner.client.heartbeat(runner.id, first)  # an older report arriving late
    assert await _containers(user, info.id) == (5, 5, ["hello:latest", "web:1"])


async def test_a_runner_that_does_not_count_creates_still_shows_what_it_holds(start_active, clock):
    user, runner, info = await start_active()
    await runner.client.heartbeat(runner.id, _beat(info.id, 0, ["app:dev"], running=2))
    assert await _containers(user, info.id) == (2, 2, ["app:dev"])


async def test_a_restarted_control_plane_counts_nothing_twice(
    start_active, settings: ServerSettings, app_for, client_for, clock
):
    user, runner, info = await start_active(idle_timeout_s=600)
    await runner.client.heartbeat(runner.id, _beat(info.id, 4, ["hello:latest"]))
    await user.client.report_activity(info.id, BUSY)

    second = app_for(settings)
    runner2 = client_for(second, runner.token, type(runner.client))
    await runner2.heartbeat(runner.id, _beat(info.id, 4, ["hello:latest"]))  # sent again
    usage = await client_for(second, user.token).usage()
    [summary] = usage.recent_sessions
    assert (summary.containers, [i.image for i in usage.top_images]) == (4, ["hello:latest"])
