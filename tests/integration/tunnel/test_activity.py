"""Activity as the agent's proxy sees it from real clients: the docker CLI (ping then call on one
connection, streams, builds) and docker-py (a keep-alive pool that must not look like a stream)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import docker as docker_py
import httpx
import pytest

from offload.agent.activity import ActivityTracker
from offload.core.schemas import ActivityReport
from offload.core.waiting import wait_until

from .support import Laptop, LoopThread, docker_env, docker_ok

pytestmark = pytest.mark.slow


def _tracker(agent: Laptop) -> ActivityTracker:
    assert agent.proxy is not None
    return agent.proxy.tracker


def _take(loop_thread: LoopThread, agent: Laptop) -> ActivityReport | None:
    """The tracker lives on the agent's loop: read it there."""

    async def take() -> ActivityReport | None:
        return _tracker(agent).take()

    return loop_thread.run(take())


def _on_loop(loop_thread: LoopThread, check):  # type: ignore[no-untyped-def]
    async def run():  # type: ignore[no-untyped-def]
        return check()

    return lambda: loop_thread.run(run())


def test_docker_commands_are_calls_and_pings_are_not(
    agent: Laptop, loop_thread: LoopThread
) -> None:
    _take(loop_thread, agent)
    transport = httpx.HTTPTransport(uds=str(agent.socket))
    with httpx.Client(transport=transport, base_url="http://docker") as client:
        assert client.get("/_ping").text == "OK"
        assert client.head("/_ping").status_code == 200
    assert _take(loop_thread, agent) is None  # readiness checks are not activity

    docker_ok(agent, "ps")
    report = _take(loop_thread, agent)
    assert report is not None and report.api_calls >= 1 and not report.building


def test_follow_is_an_open_stream_until_it_ends(
    agent: Laptop, loop_thread: LoopThread, test_image: str
) -> None:
    tracker = _tracker(agent)
    name = docker_ok(agent, "run", "-d", test_image, "sh", "-c", "while true; do sleep 1; done")
    follower = subprocess.Popen(
        ["docker", "-H", agent.docker_host, "logs", "-f", name.strip()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=docker_env(agent.home),
    )
    try:
        # Quiet container, no bytes flowing: still a stream once open for 2 s.
        wait_until(_on_loop(loop_thread, tracker.open_streams), 30, "logs -f to count as a stream")
    finally:
        follower.terminate()
        follower.wait(10)
        docker_ok(agent, "rm", "-f", name.strip())
    wait_until(_on_loop(loop_thread, lambda: tracker.open_streams() == 0), 30, "the stream to end")


def test_keep_alive_pool_is_not_a_stream(
    agent: Laptop, loop_thread: LoopThread, test_image: str
) -> None:
    tracker = _tracker(agent)
    client = docker_py.DockerClient(base_url=agent.docker_host)
    try:
        client.containers.list(all=True)
        client.images.list()
        assert agent.proxy is not None
        assert agent.proxy.activity_snapshot().open_connections >= 1  # pooled, still open
        wait_until(_on_loop(loop_thread, lambda: not tracker.busy()), 30, "answers to complete")
        report = _take(loop_thread, agent)
        assert report is not None and report.api_calls >= 2 and report.open_streams == 0
    finally:
        client.close()


def test_a_build_is_reported_while_it_runs(
    agent: Laptop, loop_thread: LoopThread, test_image: str, tmp_path: Path
) -> None:
    tracker = _tracker(agent)
    (tmp_path / "Dockerfile").write_text(f"FROM {test_image}\nRUN sleep 3\n")
    env = {**docker_env(agent.home), "DOCKER_BUILDKIT": "0"}
    build = subprocess.Popen(
        ["docker", "-H", agent.docker_host, "build", "-q", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_until(_on_loop(loop_thread, tracker.building), 30, "the build to be seen")
    finally:
        assert build.wait(60) == 0
    wait_until(_on_loop(loop_thread, lambda: not tracker.building()), 30, "the build to end")
