"""Control-plane tests: a real app on a real SQLite file, reached in-process over ASGI.

Factories (`make_org`, `make_user`, `make_runner`, `start_active`) give every test its own
organisation, users, runners and sessions; `clock` drives time (certificate validity, runner
liveness, the lifecycle) and `tick` runs the lifecycle clock once at the clock's time.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import httpx
import pytest
from fastapi import FastAPI

from offload.core import schemas as s
from offload.core.api_client import RunnerClient, UserClient
from offload.core.config import ServerSettings
from offload.server.app import create_app
from offload.server.context import ServerContext
from offload.server.services import accounts, lifecycle, tokens

from .support import (
    PASSWORD,
    FakeClock,
    RunnerHandle,
    UserHandle,
    new_host_key_line,
    session_request,
)

BASE_URL = "http://offload.test"

C = TypeVar("C", UserClient, RunnerClient)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings(tmp_path: Path) -> ServerSettings:
    return ServerSettings(
        data_dir=tmp_path / "server",
        cert_validity_s=600,
        runner_timeout_s=30,
        heartbeat_interval_s=5,
        default_idle_timeout_s=300,
    )


@pytest.fixture
def app(settings: ServerSettings, clock: FakeClock) -> Iterator[FastAPI]:
    application = create_app(settings, clock)
    yield application
    application.state.context.db.dispose()


@pytest.fixture
def ctx(app: FastAPI) -> ServerContext:
    context: ServerContext = app.state.context
    return context


def _transport(app: FastAPI) -> httpx.ASGITransport:
    return httpx.ASGITransport(app=app)


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A raw HTTP client, for status codes and bodies as they are on the wire."""
    async with httpx.AsyncClient(transport=_transport(app), base_url=BASE_URL) as client:
        yield client


def _attach(client: C, app: FastAPI) -> C:
    # The project's clients open their own httpx client to a URL; point it at the app instead.
    original = client._client
    client._client = httpx.AsyncClient(
        transport=_transport(app),
        base_url=original.base_url,
        headers=original.headers,
        timeout=original.timeout,
    )
    return client


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[..., UserClient | RunnerClient]]:
    """`client_for(app, token, RunnerClient)`: one of the project's clients, talking to `app`."""
    made: list[UserClient | RunnerClient] = []

    def _make(app: FastAPI, token: str | None, kind: type[Any] = UserClient) -> Any:
        client = _attach(kind(BASE_URL, token), app)
        made.append(client)
        return client

    yield _make
    for client in made:
        await client.aclose()


@pytest.fixture
def api_client(app: FastAPI, client_for: Callable[..., UserClient]) -> Callable[..., UserClient]:
    """`api_client(token)`: the project's UserClient, talking to this test's app."""
    return lambda token: client_for(app, token)


@pytest.fixture
def app_for(clock: FakeClock) -> Iterator[Callable[[ServerSettings], FastAPI]]:
    """`app_for(settings)`: another app (e.g. on a database made by bootstrap)."""
    made: list[FastAPI] = []

    def _make(other_settings: ServerSettings) -> FastAPI:
        made.append(create_app(other_settings, clock))
        return made[-1]

    yield _make
    for application in made:
        application.state.context.db.dispose()


_names = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


@pytest.fixture
def make_org(ctx: ServerContext) -> Callable[[str | None], str]:
    def _make(name: str | None = None) -> str:
        org_name = name or unique("org")
        ctx.db.call(accounts.get_or_create_org, org_name, ctx.now())
        return org_name

    return _make


@pytest.fixture
def make_user(
    ctx: ServerContext,
    make_org: Callable[[str | None], str],
    api_client: Callable[[str | None], UserClient],
) -> Callable[..., UserHandle]:
    """`make_user(username=None, org=None, role=member, password=PASSWORD)`; a new org if none."""

    def _make(
        username: str | None = None,
        org: str | None = None,
        role: s.Role = s.Role.MEMBER,
        password: str = PASSWORD,
    ) -> UserHandle:
        name = username or unique("user")
        org_name = make_org(org)
        with ctx.db.transaction() as db:
            user = accounts.create_user(db, name, password, ctx.now())
            organisation = accounts.find_org(db, org_name)
            assert organisation is not None
            accounts.add_member(db, user, organisation, role, ctx.now())
            token = tokens.issue_api_token(db, user.id, "test", ctx.now())
            user_id = user.id
        return UserHandle(user_id, name, password, org_name, token, api_client(token))

    return _make


@pytest.fixture
def make_runner(
    ctx: ServerContext, app: FastAPI, client_for: Callable[..., RunnerClient]
) -> Callable[..., Awaitable[RunnerHandle]]:
    """`await make_runner(name=None, capacity=4, gpus=0)`: a runner token, registered."""

    async def _make(
        name: str | None = None,
        capacity: int = 4,
        gpus: int = 0,
        instance_types: list[s.InstanceType] | None = None,
        token: str | None = None,
    ) -> RunnerHandle:
        runner_name = name or unique("runner")
        runner_token = token or ctx.db.call(tokens.issue_runner_token, runner_name, ctx.now())
        client = client_for(app, runner_token, RunnerClient)
        registered = await client.register(
            s.RunnerRegister(
                name=runner_name,
                ssh_host="127.0.0.1",
                ssh_port=8422,
                host_key=new_host_key_line(),
                capacity=capacity,
                gpus=gpus,
                instance_types=instance_types or [s.InstanceType.STANDARD],
            )
        )
        return RunnerHandle(registered.id, runner_name, runner_token, client, registered)

    return _make


@pytest.fixture
def client_key() -> asyncssh.SSHKey:
    """The agent's session key (kept on the laptop; only its public half is sent)."""
    return asyncssh.generate_private_key("ssh-ed25519")


@pytest.fixture
def tick(ctx: ServerContext) -> Callable[[], Awaitable[int]]:
    """`await tick()`: one run of the lifecycle clock at the FakeClock's time."""
    return lambda: lifecycle.tick(ctx)


@pytest.fixture
def start_active(
    make_user: Callable[..., UserHandle],
    make_runner: Callable[..., Awaitable[RunnerHandle]],
) -> Callable[..., Awaitable[tuple[UserHandle, RunnerHandle, s.SessionInfo]]]:
    """`await start_active(user=None, runner=None, **SessionCreate fields)`: an active session
    (created, then made ready by its runner at the clock's time)."""

    async def _start(
        user: UserHandle | None = None, runner: RunnerHandle | None = None, **changes: Any
    ) -> tuple[UserHandle, RunnerHandle, s.SessionInfo]:
        runner = runner or await make_runner()
        user = user or make_user()
        key = asyncssh.generate_private_key("ssh-ed25519")
        created = await user.client.create_session(session_request(key, **changes))
        await runner.client.session_ready(runner.id, created.id, f"env-{created.id}")
        return user, runner, await user.client.get_session(created.id)

    return _start
