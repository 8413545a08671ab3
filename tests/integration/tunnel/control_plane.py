"""A real control plane (uvicorn on the test loop thread) with a registered runner endpoint whose
sessions all get the test environment (its engine, network namespace, mount area and owner): what
`offload server` + `offload runner` do, minus the pool."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import uvicorn

from offload.agent.state import ClientConfig, SessionFile, write_model
from offload.core.api_client import RunnerClient, UserClient
from offload.core.client_paths import ClientPaths
from offload.core.config import ServerSettings
from offload.core.schemas import RunnerRegister, SessionCreate
from offload.core.waiting import wait_until
from offload.runner.driver import Environment
from offload.runner.ssh_endpoint import SSHEndpoint
from offload.server.app import create_app
from offload.server.bootstrap import bootstrap
from tests.support.net import free_port

from .support import Dockerd, Laptop, LoopThread, make_laptop


@dataclass
class LiveControlPlane:
    url: str
    admin_token: str
    runner_id: str
    runner: RunnerClient
    endpoint: SSHEndpoint
    mount_area: Path


@contextmanager
def live_control_plane(
    loop_thread: LoopThread, dockerd: Dockerd, data_dir: Path, runner_name: str
) -> Iterator[LiveControlPlane]:
    settings = ServerSettings(data_dir=data_dir, port=free_port())
    tokens = bootstrap(settings)
    url = f"http://127.0.0.1:{settings.port}"
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=settings.port, log_level="warning"
    )
    server = uvicorn.Server(config)
    serving = asyncio.run_coroutine_threadsafe(server.serve(), loop_thread.loop)
    wait_until(lambda: server.started, 30, "the control plane to serve")
    runner_client = RunnerClient(url, tokens.runner_token)
    ca_key: list[str] = []
    ids: list[str] = []
    env_ids: dict[str, str] = {}

    async def resolve(session_id: str) -> Environment:
        # What the runner daemon does: ask the control plane, bind (once per session), report.
        assigned = await runner_client.assigned_session(ids[0], session_id)
        env = dockerd.session(
            assigned.session_id, env_ids.setdefault(session_id, f"env-{secrets.token_hex(4)}")
        )
        await runner_client.session_ready(ids[0], session_id, env.id)
        return env

    host_key = asyncssh.generate_private_key("ssh-ed25519")
    endpoint = SSHEndpoint("127.0.0.1", 0, host_key, lambda: ca_key[0], resolve)

    async def start() -> None:
        await endpoint.start()
        registered = await runner_client.register(
            RunnerRegister(
                name=runner_name,
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
        yield LiveControlPlane(
            url, tokens.admin_token, ids[0], runner_client, endpoint, dockerd.mount_area
        )
    finally:
        loop_thread.run(endpoint.stop())
        loop_thread.run(runner_client.aclose())
        server.should_exit = True
        serving.result(30)


def laptop_with_session(
    loop_thread: LoopThread, deployment: LiveControlPlane
) -> tuple[Laptop, ClientPaths, SessionFile]:
    """What `docker offload start` leaves on a laptop before the agent runs: the client
    configuration and a fresh session (created with the laptop's own key)."""
    laptop = make_laptop()
    paths = ClientPaths(laptop.home)
    public_key = laptop.key.export_public_key().decode().strip()

    async def create() -> SessionFile:
        async with UserClient(deployment.url, deployment.admin_token) as client:
            info = await client.create_session(SessionCreate(client_public_key=public_key))
        return SessionFile(session=info, private_key_path=str(laptop.key_path))

    config = ClientConfig(server_url=deployment.url, token=deployment.admin_token)
    write_model(paths.config_file, config)
    session_file = loop_thread.run(create())
    write_model(paths.session_file, session_file)
    return laptop, paths, session_file
