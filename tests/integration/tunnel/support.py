"""Real parts for the tunnel tests: a session environment of the runner's own driver, an SSH
CA, an asyncio loop thread.

The endpoint, the agent and the environment's policy plugin run on a loop in a background
thread, so that tests can drive them with blocking clients (the docker CLI, docker-py) exactly
as a user would.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import asyncssh

from offload.agent.proxy import AgentProxy
from offload.agent.tunnel import Tunnel, TunnelTarget
from offload.core.config import RunnerSettings
from offload.core.errors import NotFound
from offload.core.waiting import wait_until
from offload.runner.driver import Environment, EnvState
from offload.runner.environment import RootlessDriver
from offload.runner.ssh_endpoint import SSHEndpoint
from tests.support.sandboxes import SESSION_SPEC, sandbox_settings, wipe

T = TypeVar("T")
# Creating or destroying an environment (an identity the first time, the sandbox, dockerd).
CREATE_TIMEOUT_S = 120.0


class LoopThread:
    """An event loop running in a daemon thread; `run()` waits for a coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def _cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(_cancel_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


# ---- the session's engine: a real environment -------------------------------------------------


@dataclass
class Dockerd:
    """The session engine of these tests: an environment of the runner's own `RootlessDriver`
    (a rootless dockerd sandboxed under an identity of its own, on a private root, with its
    network namespace, mount area and authorization plugin), created on a `LoopThread` whose
    loop serves the plugin while blocking clients run in the test's thread.

    Every session of a test maps to this one environment: `session()` gives the record the
    runner binds to a session (its own id: the endpoint keeps per-environment state by id)."""

    env: Environment
    driver: RootlessDriver
    settings: RunnerSettings
    cli_home: Path  # the docker CLI's config when a test talks to the engine directly

    @property
    def socket(self) -> Path:
        return self.env.engine_socket

    @property
    def netns(self) -> str:
        return self.env.netns

    @property
    def mount_area(self) -> Path:
        return self.env.mount_area

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def session(self, session_id: str, env_id: str | None = None) -> Environment:
        return replace(
            self.env,
            id=env_id or f"env-{secrets.token_hex(4)}",
            state=EnvState.BOUND,
            session_id=session_id,
        )


def start_environment(loop_thread: LoopThread, data_dir: Path) -> Dockerd:
    """A fresh environment of a runner of its own (`tests.support.sandboxes`)."""
    settings = sandbox_settings(data_dir)
    driver = RootlessDriver(settings)
    try:
        env = loop_thread.run(driver.create(SESSION_SPEC), CREATE_TIMEOUT_S)
    except BaseException:
        loop_thread.run(wipe(settings), CREATE_TIMEOUT_S)
        raise
    cli_home = Path(tempfile.mkdtemp(prefix="ot-cli-", dir="/tmp"))
    return Dockerd(env=env, driver=driver, settings=settings, cli_home=cli_home)


def stop_environment(loop_thread: LoopThread, d: Dockerd) -> None:
    """Destroy the environment, then sweep its runner's leftovers; fail if there were any."""
    try:
        loop_thread.run(d.driver.destroy(d.env), CREATE_TIMEOUT_S)
    finally:
        leftover = loop_thread.run(wipe(d.settings), CREATE_TIMEOUT_S)
        shutil.rmtree(d.cli_home, ignore_errors=True)
    assert not leftover, f"environments left after destroy (now wiped): {leftover}"


def docker_env(config_dir: Path) -> dict[str, str]:
    """Environment for the docker CLI: no user config, contexts or DOCKER_HOST leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    docker_config = config_dir / "docker-config"
    docker_config.mkdir(exist_ok=True)
    (docker_config / "config.json").write_text(json.dumps({}))
    env["DOCKER_CONFIG"] = str(docker_config)
    return env


# ---- certificates ---------------------------------------------------------------------------


class CertificateAuthority:
    def __init__(self) -> None:
        self.key = asyncssh.generate_private_key("ssh-ed25519")

    @property
    def public_key(self) -> str:
        return self.key.export_public_key().decode().strip()

    def sign(
        self,
        user_key: asyncssh.SSHKey,
        principals: list[str],
        valid_after: float | None = None,
        valid_before: float | None = None,
    ) -> str:
        now = time.time()
        cert = self.key.generate_user_certificate(
            user_key,
            key_id="test",
            principals=principals,
            valid_after=int(now - 60 if valid_after is None else valid_after),
            valid_before=int(now + 3600 if valid_before is None else valid_before),
        )
        return cert.export_certificate().decode()


# ---- the runner side: an endpoint with sessions -----------------------------------------------


@dataclass
class Runner:
    """The real SSH endpoint, whose sessions map to the test environment."""

    host_key: asyncssh.SSHKey
    ca: CertificateAuthority
    sessions: dict[str, Environment] = field(default_factory=dict)
    endpoint: SSHEndpoint | None = None
    resolved: list[str] = field(default_factory=list)

    def add_session(self, dockerd: Dockerd, session_id: str | None = None) -> str:
        """A session whose environment is `dockerd`'s (as the runner would bind it)."""
        session_id = session_id or f"ses-{secrets.token_hex(6)}"
        self.sessions[session_id] = dockerd.session(session_id)
        return session_id

    async def resolve(self, session_id: str) -> Environment:
        self.resolved.append(session_id)
        try:
            return self.sessions[session_id]
        except KeyError:
            raise NotFound(f"Session {session_id} is not assigned to this runner.") from None

    async def start(self, port: int = 0, **options: Any) -> SSHEndpoint:
        self.endpoint = SSHEndpoint(
            "127.0.0.1", port, self.host_key, lambda: self.ca.public_key, self.resolve, **options
        )
        await self.endpoint.start()
        return self.endpoint

    @property
    def host_public_key(self) -> str:
        return self.host_key.export_public_key().decode().strip()


# ---- the laptop side -----------------------------------------------------------------------


@dataclass
class Laptop:
    """A session key on disk plus the agent's tunnel and proxy."""

    home: Path
    key: asyncssh.SSHKey
    tunnel: Tunnel | None = None
    proxy: AgentProxy | None = None

    @property
    def key_path(self) -> Path:
        return self.home / "key"

    @property
    def socket(self) -> Path:
        return self.home / "run" / "docker.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"


def make_laptop() -> Laptop:
    home = Path(tempfile.mkdtemp(prefix="ot-", dir="/tmp"))
    key = asyncssh.generate_private_key("ssh-ed25519")
    laptop = Laptop(home=home, key=key)
    key.write_private_key(laptop.key_path)
    os.chmod(laptop.key_path, 0o600)
    return laptop


def target_for(runner: Runner, laptop: Laptop, session_id: str, certificate: str) -> TunnelTarget:
    assert runner.endpoint is not None
    return TunnelTarget(
        host="127.0.0.1",
        port=runner.endpoint.port,
        host_key=runner.host_public_key,
        username=session_id,
        private_key_path=laptop.key_path,
        certificate=certificate,
    )


def start_agent(loop_thread: LoopThread, runner: Runner, laptop: Laptop, session_id: str) -> None:
    """A tunnel and a proxy for `session_id`, connected (fast backoff: tests wait on it)."""
    cert = runner.ca.sign(laptop.key, [session_id])
    target = target_for(runner, laptop, session_id, cert)

    async def start() -> None:
        laptop.tunnel = Tunnel(target, backoff_initial_s=0.05, backoff_max_s=0.3)
        laptop.proxy = AgentProxy(laptop.socket, laptop.tunnel)
        await laptop.proxy.start()
        await laptop.tunnel.start()

    loop_thread.run(start())
    wait_until(lambda: laptop.tunnel and laptop.tunnel.connected, 20, "the tunnel to connect")


def stop_agent(loop_thread: LoopThread, laptop: Laptop) -> None:
    async def stop() -> None:
        if laptop.proxy is not None:
            await laptop.proxy.stop()
        if laptop.tunnel is not None:
            await laptop.tunnel.close()

    loop_thread.run(stop())
    shutil.rmtree(laptop.home, ignore_errors=True)


def docker(
    laptop: Laptop, *args: str, input: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """The real docker CLI, pointed at the agent's socket."""
    return subprocess.run(
        ["docker", "-H", laptop.docker_host, *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        env=docker_env(laptop.home),
    )


def docker_ok(laptop: Laptop, *args: str, input: bytes | None = None) -> str:
    result = docker(laptop, *args, input=input)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def ssh_connect(
    runner: Runner,
    username: str,
    key: asyncssh.SSHKey,
    certificate: str | None = None,
    **options: Any,
) -> asyncssh.SSHClientConnection:
    """A bare asyncssh client to the runner's endpoint, trusting its real host key."""
    assert runner.endpoint is not None
    client_key: Any = (key, asyncssh.import_certificate(certificate)) if certificate else key
    return await asyncssh.connect(
        "127.0.0.1",
        runner.endpoint.port,
        username=username,
        known_hosts=([asyncssh.import_public_key(runner.host_public_key)], [], []),
        client_keys=[client_key],
        agent_path=None,
        config=[],
        **options,
    )


class Relay:
    """A TCP relay that can go silent without closing anything: a dead network path."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.frozen:  # the path is dead: new connections go nowhere either
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if not self.frozen:  # frozen: swallow everything, close nothing
                writer.write(data)
                await writer.drain()

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
