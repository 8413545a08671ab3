"""`run_agent` end to end: a real control plane (uvicorn), its CA, a runner endpoint that asks
it about sessions, and the docker CLI through the agent socket."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Iterator

import pytest

from offload.agent.daemon import SESSION_ENDED, certificate_validity, run_agent
from offload.agent.state import AgentState, ClientConfig, SessionFile, read_model, write_model
from offload.core.api_client import UserClient
from offload.core.client_paths import ClientPaths
from offload.core.schemas import SessionCreate
from offload.core.waiting import wait_until

from .control_plane import LiveControlPlane as ControlPlane
from .control_plane import live_control_plane
from .support import Dockerd, Laptop, LoopThread, docker, docker_ok, make_laptop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def control_plane(loop_thread: LoopThread, dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:  # fmt: skip
    with live_control_plane(
        loop_thread, dockerd, tmp_path_factory.mktemp("server"), "tunnel-test"
    ) as live:
        yield live


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
