"""Control-plane tests: a real app on a real database, reached in-process over ASGI.

Every test that uses the app (or `settings`, `database_url`) runs twice, on SQLite and on
PostgreSQL: `test_x[sqlite]`, `test_x[postgresql]` (`-k sqlite` runs one side).  SQLite is a file
in the test's data_dir, as `offload up` has it.  PostgreSQL is one throw-away cluster for the
whole run (tests/support/postgres.py); each test gets its own database, cloned from a template
that was migrated once.  A test meant for one of them says which and why:
`@pytest.mark.databases("sqlite", reason=...)`.  Without PostgreSQL's binaries the postgresql
half is skipped, except under CI (CI=true), where it fails.

Factories (`make_org`, `make_user`, `make_runner`, `start_active`) give every test its own
organisation, users, runners and sessions; `clock` drives time (certificate validity, runner
liveness, the lifecycle) and `tick` runs the lifecycle clock once at the clock's time.
"""

from __future__ import annotations

import itertools
import os
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
from offload.server.db.engine import Database
from offload.server.db.migrate import upgrade_database
from offload.server.services import accounts, background, tokens
from tests.support.postgres import INSTALL_HINT, PostgresCluster, find_bin_dir

from .support import (
    PASSWORD,
    FakeClock,
    RunnerHandle,
    UserHandle,
    new_host_key_line,
    session_request,
    stand_in_gpu,
)

BASE_URL = "http://offload.test"

C = TypeVar("C", UserClient, RunnerClient)


DATABASES = ("sqlite", "postgresql")
TEMPLATE_DATABASE = "offload_template"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "databases(*kinds, reason): run this server test on these databases only, and say why",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "database" not in metafunc.fixturenames:
        return
    kinds = list(DATABASES)
    marker = metafunc.definition.get_closest_marker("databases")
    if marker is not None:
        kinds = list(marker.args)
        if not kinds or not set(kinds) <= set(DATABASES) or not marker.kwargs.get("reason"):
            raise pytest.UsageError(
                f"{metafunc.definition.nodeid}: use @pytest.mark.databases(KIND, ..., reason=...) "
                f"with kinds from {DATABASES}"
            )
    metafunc.parametrize("database", kinds)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """The run's PostgreSQL, with a template database at the newest schema."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    cluster = PostgresCluster(bin_dir)
    cluster.start()
    try:
        template = Database(cluster.create_database(TEMPLATE_DATABASE))
        try:
            upgrade_database(template)
        finally:
            template.dispose()
        yield cluster
    finally:
        cluster.stop()


_databases = itertools.count(1)


def _postgres_database(request: pytest.FixtureRequest, template: str | None) -> Iterator[str]:
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    name = f"test_{next(_databases)}"
    url = cluster.create_database(name, template=template)
    yield url
    cluster.drop_database(name)  # also ends connections a test left open


@pytest.fixture
def database_url(database: str, request: pytest.FixtureRequest) -> Iterator[str | None]:
    """This test's database, at the newest schema; None: the default SQLite file in data_dir."""
    if database == "sqlite":
        yield None
    else:
        yield from _postgres_database(request, TEMPLATE_DATABASE)


@pytest.fixture
def empty_database_url(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A database of this test's kind with no table at all (for the migrations)."""
    if database == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        yield from _postgres_database(request, None)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings(tmp_path: Path, database_url: str | None) -> ServerSettings:
    return ServerSettings(
        data_dir=tmp_path / "server",
        database_url=database_url,
        cert_validity_s=600,
        runner_timeout_s=30,
        # Lifecycle tests move the clock by hours without a heartbeat; the runner-liveness
        # tests (test_runner_fleet.py) set their own.
        runner_lost_after_s=30 * 24 * 3600,
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
        gpu_devices: list[s.GpuDevice] | None = None,
    ) -> RunnerHandle:
        runner_name = name or unique("runner")
        if gpu_devices is None:  # `gpus` stand-in GPUs, as a runner's NVML would list them
            gpu_devices = [stand_in_gpu(runner_name, index) for index in range(gpus)]
        runner_token = token or ctx.db.call(tokens.issue_runner_token, runner_name, ctx.now())
        client = client_for(app, runner_token, RunnerClient)
        registered = await client.register(
            s.RunnerRegister(
                name=runner_name,
                ssh_host="127.0.0.1",
                ssh_port=8422,
                host_key=new_host_key_line(),
                capacity=capacity,
                gpus=len(gpu_devices),
                gpu_devices=gpu_devices,
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
    """`await tick()`: one run of the background clock (lifecycle, lost runners) at the
    FakeClock's time."""
    return lambda: background.tick(ctx)


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
