"""Shared real parts: one session environment (the runner's `RootlessDriver`), one SSH endpoint
and one connected agent for the whole area."""

from __future__ import annotations

from collections.abc import Iterator

import asyncssh
import pytest

from tests.support.images import build_test_image

from .support import (
    CertificateAuthority,
    Dockerd,
    Laptop,
    LoopThread,
    Runner,
    make_laptop,
    start_agent,
    start_environment,
    stop_agent,
    stop_environment,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def dockerd(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    """The session engine: a real environment, its policy plugin served on `loop_thread`."""
    d = start_environment(loop_thread, tmp_path_factory.mktemp("runner"))
    try:
        yield d
    finally:
        stop_environment(loop_thread, d)


@pytest.fixture(scope="session")
def test_image(dockerd: Dockerd) -> str:
    return build_test_image(dockerd.host)


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture(scope="session")
def runner(loop_thread: LoopThread, ca: CertificateAuthority) -> Iterator[Runner]:
    r = Runner(host_key=asyncssh.generate_private_key("ssh-ed25519"), ca=ca)
    loop_thread.run(r.start())
    yield r
    assert r.endpoint is not None
    loop_thread.run(r.endpoint.stop())


@pytest.fixture(scope="session")
def agent(
    loop_thread: LoopThread, runner: Runner, dockerd: Dockerd, test_image: str
) -> Iterator[Laptop]:
    """An agent connected to a session whose environment is the test environment."""
    laptop = make_laptop()
    session_id = runner.add_session(dockerd)
    try:
        start_agent(loop_thread, runner, laptop, session_id)
        yield laptop
    finally:
        stop_agent(loop_thread, laptop)
