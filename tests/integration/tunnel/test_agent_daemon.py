"""`run_agent` end to end: a real control plane (uvicorn), its CA, a runner endpoint that asks
it about sessions, and the docker CLI through the agent socket."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from offload.agent.daemon import SESSION_ENDED, certificate_validity, run_agent
from offload.agent.state import AgentState, ClientConfig, SessionFile, read_model, write_model
from offload.core.api_client import RunnerClient, UserClient
from offload.core.config import ClientPaths, ServerSettings
from offload.core.schemas import InstanceSpec, RunnerRegister, SessionCreate
from offload.core.waiting import wait_until
from offload.runner.driver import Environment, EnvState
from offload.runner.ssh_endpoint import SSHEndpoint
from tests.support.net import free_port as _free_port

from .support import Dockerd, Laptop, LoopThread, docker, docker_ok, make_laptop

pytestmark = pytest.mark.slow

try:
    import uvicorn

    from offload.server.app import create_app
    from offload.server.bootstrap import bootstrap
except ImportError as exc:  # the control plane is another part of the project
    pytest.skip(f"control plane not available: {exc}", allow_module_level=True)


@dataclass
class ControlPlane:
    url: str
    admin_token: str
    runner_id: str
    runner: RunnerClient
    endpoint: SSHEndpoint


@pytest.fixture(scope="module")
def control_plane(loop_thread: LoopThread, dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:  # fmt: skip
    settings = ServerSettings(data_dir=tmp_path_factory.mktemp("server"), port=_free_port())
    tokens = bootstrap(settings)
    url = f"http://127.0.0.1:{settings.port}"
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.port, log_level="warning")
    )  # fmt: skip
    serving = asyncio.run_coroutine_threadsafe(server.serve(), loop_thread.loop)
    wait_until(lambda: server.started, 30, "the control plane to serve")
    runner_client = RunnerClient(url, tokens.runner_token)
    ca_key: list[str] = []
    ids: list[str] = []

    async def resolve(session_id: str) -> Environment:
        # What the runner daemon does: ask the control plane, then bind an environment.
        assigned = await runner_client.assigned_session(ids[0], session_id)
        env = Environment(
            id="env-daemon-test",
            engine_socket=dockerd.socket,
            mount_area=Path("/nonexistent"),
            netns=dockerd.netns,
            spec=InstanceSpec(),
            state=EnvState.BOUND,
            session_id=assigned.session_id,
        )
        await runner_client.session_ready(ids[0], session_id, env.id)
        return env

    host_key = asyncssh.generate_private_key("ssh-ed25519")
    endpoint = SSHEndpoint("127.0.0.1", 0, host_key, lambda: ca_key[0], resolve)

    async def start() -> None:
        await endpoint.start()
        registered = await runner_client.register(
            RunnerRegister(
                name="tunnel-test",
                ssh_host="127.0.0.1",
                ssh_port=endpoint.port,
                host_key=endpoint.host_public_key,
                capacity=8,
            )
        )
        ca_key.append(registered.ca_public_key)
        ids.append(registered.id)

    loop_thread.run(start())
    try:
        yield ControlPlane(url, tokens.admin_token, ids[0], runner_client, endpoint)
    finally:
        loop_thread.run(endpoint.stop())
        loop_thread.run(runner_client.aclose())
        server.should_exit = True
        serving.result(30)


def new_session(loop_thread: LoopThread, cp: ControlPlane) -> tuple[Laptop, ClientPaths, str]:
    """What `docker offload start` leaves for the agent: config, key and session files."""
    laptop = make_laptop()
    paths = ClientPaths(laptop.home)
    assert paths.agent_socket == laptop.socket
    public_key = laptop.key.export_public_key().decode().strip()

    async def create() -> SessionFile:
        async with UserClient(cp.url, cp.admin_token) as client:
            info = await client.create_session(SessionCreate(client_public_key=public_key))
        return SessionFile(session=info, private_key_path=str(laptop.key_path))

    write_model(paths.config_file, ClientConfig(server_url=cp.url, token=cp.admin_token))
    session_file = loop_thread.run(create())
    write_model(paths.session_file, session_file)
    return laptop, paths, session_file.session.id


def agent_state(paths: ClientPaths) -> AgentState | None:
    return read_model(paths.agent_state_file, AgentState)


def test_run_agent_serves_renews_and_learns_the_session_ended(
    loop_thread: LoopThread, control_plane: ControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="offload.agent")
    laptop, paths, session_id = new_session(loop_thread, control_plane)
    session = read_model(paths.session_file, SessionFile)
    assert session is not None and session.session.certificate is not None
    valid_after, valid_before = certificate_validity(session.session.certificate)
    # A clock already in the certificate's last third: the agent renews before connecting.
    offset = [valid_before - (valid_before - valid_after) / 4 - time.time()]
    stop = asyncio.Event()
    task = asyncio.run_coroutine_threadsafe(
        run_agent(
            paths,
            stop,
            wall_clock=lambda: time.time() + offset[0],
            tunnel_options={"backoff_initial_s": 0.05, "backoff_max_s": 0.3},
        ),
        loop_thread.loop,
    )
    try:
        wait_until(lambda: (s := agent_state(paths)) and s.connected, 30, "the agent to connect")
        offset[0] = 0.0
        assert "session certificate renewed" in caplog.text
        docker_ok(laptop, "ps")

        # The session ends: the runner drops its connection, the agent asks the control plane.
        async def end() -> None:
            async with UserClient(control_plane.url, control_plane.admin_token) as client:
                await client.stop_session(session_id)
            await control_plane.endpoint.disconnect(session_id)

        loop_thread.run(end())
        wait_until(lambda: (s := agent_state(paths)) and s.last_error == SESSION_ENDED, 30,
                   "the agent to learn that the session ended")  # fmt: skip
        result = docker(laptop, "ps")
        assert result.returncode != 0
        assert f"Error response from daemon: {SESSION_ENDED}" in result.stderr.decode()
    finally:
        loop_thread.loop.call_soon_threadsafe(stop.set)
        task.result(30)
    state = agent_state(paths)
    shutil.rmtree(laptop.home, ignore_errors=True)
    assert state is not None and not state.connected and state.pid == os.getpid()
    assert not paths.agent_socket.exists()
    for secret in (control_plane.admin_token, session.session.certificate.split()[1][:40]):
        assert secret not in caplog.text
