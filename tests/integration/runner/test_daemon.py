"""The runner daemon against a real control plane (uvicorn + SQLite), real dockerd and real SSH.

Two scenarios, because the parts are expensive:

- the core path: the runner registers, a session placed on it becomes active through the
  heartbeat, its engine answers over the SSH endpoint, stopping the session wipes its
  environment, the runner outlives a control-plane restart, and stopping the runner wipes
  everything;
- the session lifecycle (issue 3): a running container is activity, an idle session's containers
  are paused and thawed when it resumes, a takeover closes the old key's connection and refuses
  that key, and a runner restart ends the session as failed.
"""

from __future__ import annotations

import asyncio
import json
import stat
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncssh
import pytest
import pytest_asyncio

from offload.core.api_client import UserClient
from offload.core.config import RunnerSettings, ServerSettings
from offload.core.errors import EnvironmentError_
from offload.core.schemas import (
    ENGINE_CHANNEL_PATH,
    ActivityReport,
    InstanceSpec,
    SessionCreate,
    SessionInfo,
    SessionState,
)
from offload.core.waiting import async_wait_until
from offload.runner import cgroups
from offload.runner.daemon import check_prerequisites, load_or_create_host_key, run_runner
from offload.runner.driver import Environment
from offload.runner.environment import EnvPaths
from tests.integration.runner.conftest import MakeSettings, docker, leftovers
from tests.support.engines import environment_id
from tests.support.images import TEST_IMAGE, build_test_image
from tests.support.net import free_port as _free_port

uvicorn = pytest.importorskip("uvicorn")
app_module = pytest.importorskip("offload.server.app")
bootstrap_module = pytest.importorskip("offload.server.bootstrap")

pytestmark = pytest.mark.asyncio(loop_scope="module")


class ControlPlane:
    """A real control plane served in the test's loop; can be restarted on the same port."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.port}"
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        app = await asyncio.to_thread(app_module.create_app, self.settings)
        # A runner's long poll stays parked on the server after the runner gives up on it: do
        # not let a stop wait it out.
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.settings.port,
            log_level="warning",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        await async_wait_until(self._started, 30, "the control plane to serve")

    async def _started(self) -> bool:
        assert self._server is not None and self._task is not None
        if self._task.done():
            self._task.result()  # raise why it could not serve
        return bool(self._server.started)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
            self._server = self._task = None


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def control_plane(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ControlPlane]:
    settings = ServerSettings(data_dir=tmp_path_factory.mktemp("server"), port=_free_port())
    plane = ControlPlane(settings)
    await plane.start()
    try:
        yield plane
    finally:
        await plane.stop()


async def start_session(
    client: UserClient, **changes: object
) -> tuple[SessionInfo, asyncssh.SSHKey]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    public = key.export_public_key().decode().strip()
    request = SessionCreate(client_public_key=public, **changes)  # type: ignore[arg-type]
    return await client.create_session(request), key


async def connect_ssh(session: SessionInfo, key: asyncssh.SSHKey) -> asyncssh.SSHClientConnection:
    """An SSH connection to the session's runner with its certificate (pinned host key)."""
    assert session.runner is not None and session.certificate is not None
    certificate = asyncssh.import_certificate(session.certificate)
    host_key = asyncssh.import_public_key(session.runner.host_key)
    return await asyncssh.connect(
        session.runner.ssh_host,
        session.runner.ssh_port,
        username=session.id,
        client_keys=[(key, certificate)],
        known_hosts=([host_key], [], []),
        agent_path=None,
        config=[],
    )


async def engine_info_over_ssh(session: SessionInfo, key: asyncssh.SSHKey) -> dict[str, object]:
    """GET /info on the session's engine through the runner's SSH endpoint."""
    async with await connect_ssh(session, key) as conn:
        return await engine_info(conn)


async def engine_info(conn: asyncssh.SSHClientConnection) -> dict[str, object]:
    reader, writer = await conn.open_unix_connection(ENGINE_CHANNEL_PATH)
    writer.write(b"GET /info HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    if b"chunked" in head.lower():
        body = _unchunk(body)
    return json.loads(body)


def _unchunk(body: bytes) -> bytes:
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2 :]
    return out


async def state_of(client: UserClient, session_id: str) -> SessionState:
    return (await client.get_session(session_id)).state


async def test_runner_serves_sessions_and_survives_a_control_plane_restart(
    control_plane: ControlPlane, make_settings: MakeSettings
) -> None:
    tokens = await asyncio.to_thread(bootstrap_module.bootstrap, control_plane.settings)
    settings = make_settings(
        server_url=control_plane.url,
        token=tokens.runner_token,
        name=f"runner-{uuid.uuid4().hex[:6]}",
        ssh_port=_free_port(),
        pool_size=1,
        capacity=3,
        heartbeat_wait_s=5,
    )
    stop = asyncio.Event()
    runner = asyncio.create_task(run_runner(settings, stop))
    user = UserClient(control_plane.url, tokens.admin_token)
    try:
        # A session placed on the runner becomes active through the heartbeat.
        session, key = await async_wait_until(
            lambda: _try_start_session(user, runner), 60, "the runner to take sessions"
        )
        await async_wait_until(
            lambda: _is(state_of(user, session.id), SessionState.ACTIVE), 60, "active session"
        )
        info = await engine_info_over_ssh(session, key)
        env_id = environment_id(info["Labels"])  # type: ignore[arg-type]
        assert env_id.startswith("env-")

        # Stopping the session wipes its environment.
        await user.stop_session(session.id)
        await async_wait_until(
            lambda: _is_empty(leftovers(settings, env_id)), 60, "the session's environment wiped"
        )

        # The runner outlives a control-plane restart and keeps serving.
        await control_plane.stop()
        await control_plane.start()
        second, second_key = await start_session(user)
        await async_wait_until(
            lambda: _is(state_of(user, second.id), SessionState.ACTIVE), 60, "second session"
        )
        assert (await engine_info_over_ssh(second, second_key))["DockerRootDir"]
    finally:
        stop.set()
        await asyncio.wait_for(runner, 120)
        await user.aclose()
    # Stopping the runner wipes every environment.
    envs = settings.data_dir / "envs"
    assert not envs.exists() or not any(envs.iterdir())
    assert not [h for h in cgroups.mounted_hierarchies() if (h / settings.cgroup_parent).exists()]


async def _try_start_session(
    user: UserClient, runner: asyncio.Task[None], **changes: object
) -> tuple[SessionInfo, asyncssh.SSHKey] | None:
    from offload.core.errors import NoCapacity

    if runner.done():
        runner.result()  # the runner died: raise why
    try:
        return await start_session(user, **changes)
    except NoCapacity:
        return None  # not registered yet


async def _is(state: object, expected: SessionState) -> bool:
    return await state == expected  # type: ignore[misc]


async def _is_empty(found: list[str]) -> bool:
    return not found


async def test_prerequisites_name_the_fix(make_settings: MakeSettings) -> None:
    settings = make_settings(token="off_r_x", dockerd="/nonexistent/dockerd")
    with pytest.raises(EnvironmentError_) as caught:
        check_prerequisites(settings)
    assert "/nonexistent/dockerd" in caught.value.message
    assert "apt-get install docker.io rootlesskit slirp4netns uidmap" in caught.value.fix


async def test_host_key_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "ssh_host_ed25519_key"
    created = load_or_create_host_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_host_key(path)
    assert again.export_public_key() == created.export_public_key()


# ---- the session lifecycle --------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def lone_control_plane(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[ControlPlane]:
    """A control plane of its own: no runner of another test can be chosen for its sessions."""
    settings = ServerSettings(data_dir=tmp_path_factory.mktemp("server"), port=_free_port())
    plane = ControlPlane(settings)
    await plane.start()
    try:
        yield plane
    finally:
        await plane.stop()


class RunningRunner:
    """`run_runner` in a task that a test can stop and start again (a runner restart)."""

    def __init__(self, settings: RunnerSettings) -> None:
        self.settings = settings
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(run_runner(self.settings, self._stop))
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._stop.set()
            await asyncio.wait_for(self._task, 120)
            self._task = None


async def test_runner_follows_activity_idle_takeover_and_its_own_restart(
    lone_control_plane: ControlPlane, make_settings: MakeSettings
) -> None:
    plane = lone_control_plane
    tokens = await asyncio.to_thread(bootstrap_module.bootstrap, plane.settings)
    settings = make_settings(
        server_url=plane.url,
        token=tokens.runner_token,
        name=f"runner-{uuid.uuid4().hex[:6]}",
        ssh_port=_free_port(),
        pool_size=1,
        capacity=2,
    )
    runner = RunningRunner(settings)
    task = runner.start()
    user = UserClient(plane.url, tokens.admin_token)
    try:
        session, key_a = await async_wait_until(
            lambda: _try_start_session(user, task, client_name="laptop-a"),
            60,
            "the runner to take sessions",
        )
        await async_wait_until(
            lambda: _is(state_of(user, session.id), SessionState.ACTIVE), 60, "active session"
        )
        conn_a = await connect_ssh(session, key_a)
        env = _env_of(settings, await engine_info(conn_a))

        # A running container is activity: the runner's heartbeats alone move the session's
        # last activity (no agent reports anything here).
        await asyncio.to_thread(build_test_image, f"unix://{env.engine_socket}")
        await docker(env, "run", "-d", "--name", "worker", TEST_IMAGE, "sleep", "300")
        mark = datetime.now(UTC)
        await async_wait_until(
            lambda: _activity_after(user, session.id, mark), 30, "running container reported"
        )
        usage = await user.usage()
        assert TEST_IMAGE in [i.image for i in usage.top_images]

        # Idle: the runner pauses the session's containers; activity within grace thaws them.
        await user.idle_session(session.id)
        await async_wait_until(lambda: _paused_is(env, "true"), 30, "containers paused")
        await user.report_activity(session.id, ActivityReport(api_calls=1))
        await async_wait_until(lambda: _paused_is(env, "false"), 30, "containers thawed")

        # Takeover from another machine: the old key's connection is closed, the old key is
        # refused though its certificate is still valid, and the new key is served.
        taken, key_b = await start_session(user, client_name="laptop-b", takeover=True)
        assert taken.id == session.id
        await asyncio.wait_for(conn_a.wait_closed(), 30)
        with pytest.raises((asyncssh.Error, OSError)):
            await engine_info_over_ssh(session, key_a)
        assert _env_of(settings, await engine_info_over_ssh(taken, key_b)).id == env.id

        # A runner restart wipes its engines: the session ends failed, saying why.
        await runner.stop()
        task = runner.start()
        ended = await async_wait_until(
            lambda: _ended(user, session.id), 60, "the session to end after the restart"
        )
        assert ended.state is SessionState.FAILED
        assert ended.end_reason is not None and "runner restarted" in ended.end_reason
    finally:
        await runner.stop()
        await user.aclose()
    assert leftovers(settings, env.id) == []


def _env_of(settings: RunnerSettings, info: dict[str, object]) -> Environment:
    """The environment behind an engine's /info (its data-root names it), for the docker CLI."""
    env_id = environment_id(info["Labels"])  # type: ignore[arg-type]
    paths = EnvPaths.of(settings, env_id)
    return Environment(env_id, paths.socket, paths.mount_area, paths.netns, InstanceSpec())


async def _activity_after(user: UserClient, session_id: str, mark: datetime) -> bool:
    last = (await user.get_session(session_id)).last_activity_at
    return last is not None and last > mark


async def _paused_is(env: Environment, expected: str) -> bool:
    return (await docker(env, "inspect", "-f", "{{.State.Paused}}", "worker")).out == expected


async def _ended(user: UserClient, session_id: str) -> SessionInfo | None:
    info = await user.get_session(session_id)
    return None if info.state.live else info
