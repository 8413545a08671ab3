"""One session environment for the whole area (the runner's `RootlessDriver`: a sandboxed rootless
dockerd in a network namespace of its own), plus the images the tests run."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from offload.agent.ports import PortForwarder
from offload.core.waiting import async_wait_until
from offload.runner.port_gate import PortGate
from tests.integration.tunnel.support import (
    Dockerd,
    LoopThread,
    start_environment,
    stop_environment,
)
from tests.support.images import build_test_image

from .support import FakeClock, SSHPair, build_udp_echo_image, docker, ssh_pair

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def ports_loop() -> Iterator[LoopThread]:
    """The loop that serves the environment's policy plugin for the whole area (the tests' own
    loops come and go with each test)."""
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def ports_dockerd(
    ports_loop: LoopThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Dockerd]:
    d = start_environment(ports_loop, tmp_path_factory.mktemp("runner"))
    try:
        yield d
    finally:
        stop_environment(ports_loop, d)


@pytest.fixture(scope="session")
def images(ports_dockerd: Dockerd) -> dict[str, str]:
    return {
        "busybox": build_test_image(ports_dockerd.host),
        "udp_echo": build_udp_echo_image(ports_dockerd.host),
    }


class Containers:
    """Runs containers on the test engine under unique names; removes them all at the end."""

    def __init__(self, dockerd: Dockerd) -> None:
        self.dockerd = dockerd
        self.names: list[str] = []

    async def run(self, name: str, *args: str) -> str:
        unique = f"{name}-{uuid.uuid4().hex[:6]}"
        self.names.append(unique)
        await docker(self.dockerd.host, "run", "-d", "--name", unique, *args)
        return unique

    async def do(self, *args: str) -> str:
        return (await docker(self.dockerd.host, *args)).out

    async def remove_all(self) -> None:
        if self.names:
            await docker(self.dockerd.host, "rm", "-f", *self.names, check=False)


@pytest.fixture
async def containers(ports_dockerd: Dockerd) -> AsyncIterator[Containers]:
    made = Containers(ports_dockerd)
    try:
        yield made
    finally:
        await made.remove_all()


@pytest.fixture
async def ssh(ports_dockerd: Dockerd) -> AsyncIterator[SSHPair]:
    """The runner's real SSH endpoint serving the test environment, and a client signed in to
    it with the session's certificate: the forwarder's transports, as the agent's tunnel."""
    pair = await ssh_pair(ports_dockerd, PortGate())
    try:
        yield pair
    finally:
        await pair.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def forwarder(ssh: SSHPair, clock: FakeClock) -> AsyncIterator[PortForwarder]:
    """A forwarder over the real SSH endpoint, following the engine (fast retries; fake clock
    for activity and UDP idleness)."""
    f = PortForwarder(
        ssh.open_tcp,
        ssh.open_udp,
        ssh.open_engine,
        clock=clock,
        retry_initial_s=0.05,
        retry_max_s=0.5,
        udp_idle_timeout_s=60.0,
    )
    await f.start()
    try:
        await async_wait_until(
            lambda: _following(f), 30, "the forwarder to follow the engine's events"
        )
        yield f
    finally:
        await f.close()


async def _following(f: PortForwarder) -> bool:
    return f.snapshot().following
