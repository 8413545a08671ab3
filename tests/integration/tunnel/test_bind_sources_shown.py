"""Bind sources through the real agent (`run_agent`), the real runner endpoint and a real session
environment: the engine holds runner paths in the session's mount area, yet the docker CLI and
docker-py see the laptop paths a local engine would show, also after the agent restarted."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import docker as docker_sdk
import pytest

from offload.agent.bind_sources import SOURCES_FILE
from offload.agent.daemon import run_agent
from offload.agent.keeper import AgentSettings
from offload.agent.state import AgentState, read_model
from offload.core.api_client import UserClient
from offload.core.client_paths import ClientPaths
from offload.core.waiting import wait_until

from .control_plane import LiveControlPlane as Deployment
from .control_plane import laptop_with_session, live_control_plane
from .support import Dockerd, Laptop, LoopThread, docker_env, docker_ok

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deployment(loop_thread: LoopThread, dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:  # fmt: skip
    with live_control_plane(
        loop_thread, dockerd, tmp_path_factory.mktemp("server"), "sources-test"
    ) as live:
        yield live


@dataclass
class Agent:
    """`run_agent` on a laptop's files; stopped and started again on the same files."""

    loop_thread: LoopThread
    laptop: Laptop
    paths: ClientPaths
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: Future[None] | None = None

    def start(self) -> None:
        self.stop = asyncio.Event()
        self.task = asyncio.run_coroutine_threadsafe(
            run_agent(
                self.paths,
                self.stop,
                tunnel_options={"backoff_initial_s": 0.05, "backoff_max_s": 0.3},
                settings=AgentSettings(unpause_wait_s=0),
            ),
            self.loop_thread.loop,
        )
        wait_until(
            lambda: (s := read_model(self.paths.agent_state_file, AgentState)) and s.connected,
            30, "the agent to connect",
        )  # fmt: skip

    def halt(self) -> None:
        if self.task is not None:
            self.loop_thread.loop.call_soon_threadsafe(self.stop.set)
            self.task.result(30)
            self.task = None


@pytest.fixture
def agent(loop_thread: LoopThread, deployment: Deployment) -> Iterator[Agent]:
    laptop, paths, session_file = laptop_with_session(loop_thread, deployment)
    agent = Agent(loop_thread, laptop, paths)
    try:
        agent.start()
        yield agent
    finally:
        agent.halt()

        async def end() -> None:
            async with UserClient(deployment.url, deployment.admin_token) as client:
                await client.stop_session(session_file.session.id)

        loop_thread.run(end())
        shutil.rmtree(laptop.home, ignore_errors=True)


def _engine_sources(dockerd: Dockerd, name: str) -> list[str]:
    """What the engine itself holds (asked directly, not through the agent)."""
    out = subprocess.run(
        ["docker", "-H", dockerd.host, "inspect", "-f", "{{json .Mounts}}", name],
        capture_output=True, check=True, env=docker_env(dockerd.cli_home),
    ).stdout  # fmt: skip
    return [m["Source"] for m in json.loads(out)]


def test_inspect_and_ps_show_the_laptop_paths(
    agent: Agent, deployment: Deployment, dockerd: Dockerd, test_image: str
) -> None:
    laptop = agent.laptop
    project = laptop.home / "project"
    project.mkdir()
    (project / "app.toml").write_text("x = 1\n")
    name = f"src-{uuid.uuid4().hex[:6]}"
    volume = f"cache-{uuid.uuid4().hex[:6]}"
    docker_ok(
        laptop, "run", "-d", "--name", name,
        "-v", f"{project}:/data",
        "-v", f"{volume}:/cache",
        "--mount", f"type=bind,source={project}/app.toml,target=/etc/app.toml,readonly",
        test_image, "sleep", "3600",
    )  # fmt: skip
    sdk = docker_sdk.DockerClient(base_url=laptop.docker_host, timeout=60)
    try:
        # The engine has the runner's paths...
        engine = _engine_sources(dockerd, name)
        assert sum(s.startswith(f"{deployment.mount_area}/") for s in engine) == 2, engine
        # ...the client sees the laptop's, as from a local engine.
        expected = {"/data": str(project), "/cache": None, "/etc/app.toml": f"{project}/app.toml"}
        mounts = json.loads(docker_ok(laptop, "inspect", "-f", "{{json .Mounts}}", name))
        by_target = {m["Destination"]: m for m in mounts}
        assert by_target["/data"]["Source"] == str(project)
        assert by_target["/etc/app.toml"]["Source"] == f"{project}/app.toml"
        assert by_target["/cache"]["Name"] == volume
        assert by_target["/cache"]["Source"] in engine  # a volume: the engine's own path
        host_config = json.loads(docker_ok(laptop, "inspect", "-f", "{{json .HostConfig}}", name))
        # In any order: the docker CLI sends `-v` binds in its map's order (a local engine shows
        # them so too: 4 of 30 `docker create`s reversed these two on the machine's own engine).
        assert sorted(host_config["Binds"]) == sorted([f"{project}:/data", f"{volume}:/cache"])
        assert host_config["Mounts"][0]["Source"] == f"{project}/app.toml"

        ps = docker_ok(laptop, "ps", "--no-trunc", "--filter", f"name={name}", "--format", "{{.Mounts}}")  # fmt: skip
        assert set(ps.strip().split(",")) == {str(project), volume, f"{project}/app.toml"}

        # docker-py, on its pooled keep-alive connection: inspect, list, inspect again.
        for _ in range(2):
            container = sdk.containers.get(name)
            sources = {m["Destination"]: m["Source"] for m in container.attrs["Mounts"]}
            assert {k: v for k, v in sources.items() if k != "/cache"} == {
                k: v for k, v in expected.items() if v is not None
            }
            assert f"{project}:/data" in container.attrs["HostConfig"]["Binds"]
            listed = sdk.api.containers(filters={"name": name})
            assert {m["Source"] for m in listed[0]["Mounts"]} >= {str(project)}
            assert [c.name for c in sdk.containers.list(filters={"name": name})] == [name]
        # A container that is not there: the engine's own 404.
        with pytest.raises(docker_sdk.errors.NotFound):
            sdk.containers.get(f"{name}-missing")
        assert sdk.containers.get(name).attrs["Mounts"]  # the connection still serves

        # A new agent (restarted) still knows what the last one rewrote.
        assert (agent.paths.agent_state_file.with_name(SOURCES_FILE)).is_file()
        agent.halt()
        agent.start()
        mounts = json.loads(docker_ok(laptop, "inspect", "-f", "{{json .Mounts}}", name))
        assert {m["Destination"]: m["Source"] for m in mounts}["/data"] == str(project)
    finally:
        sdk.close()
        docker_ok(laptop, "rm", "-f", name)
        docker_ok(laptop, "volume", "rm", volume)
