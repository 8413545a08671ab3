"""What the runner's SSH endpoint refuses, and the agent's refusal of an unpinned host key."""

from __future__ import annotations

import time
from collections.abc import Iterator

import asyncssh
import pytest

from offload.agent.proxy import AgentProxy
from offload.agent.tunnel import HostKeyMismatch, Tunnel
from offload.core.schemas import ENGINE_CHANNEL_PATH
from offload.core.waiting import wait_until

from .support import (
    CertificateAuthority,
    Dockerd,
    Laptop,
    LoopThread,
    Runner,
    docker,
    make_laptop,
    ssh_connect,
    stop_agent,
    target_for,
)

pytestmark = pytest.mark.slow

PING = b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"


@pytest.fixture
def laptop(loop_thread: LoopThread) -> Iterator[Laptop]:
    lt = make_laptop()
    yield lt
    stop_agent(loop_thread, lt)


@pytest.fixture
def session(runner: Runner, dockerd: Dockerd) -> str:
    return runner.add_session(dockerd)


async def ping_engine(conn: asyncssh.SSHClientConnection, path: str = ENGINE_CHANNEL_PATH) -> bytes:
    reader, writer = await conn.open_unix_connection(path, encoding=None)
    writer.write(PING)
    data = await reader.read()
    writer.close()
    return data


def refused(loop_thread: LoopThread, runner: Runner, *args: object, **kwargs: object) -> None:
    async def attempt() -> None:
        with pytest.raises(asyncssh.PermissionDenied):
            conn = await ssh_connect(runner, *args, **kwargs)  # type: ignore[arg-type]
            conn.close()

    loop_thread.run(attempt())


def test_valid_certificate_reaches_the_engine(
    loop_thread: LoopThread, runner: Runner, laptop: Laptop, session: str
) -> None:
    cert = runner.ca.sign(laptop.key, [session])

    async def check() -> bytes:
        async with await ssh_connect(runner, session, laptop.key, cert) as conn:
            return await ping_engine(conn)

    assert loop_thread.run(check()).endswith(b"\r\n\r\nOK")


def test_certificate_for_another_session_refused(
    loop_thread: LoopThread, runner: Runner, laptop: Laptop, session: str, dockerd: Dockerd
) -> None:
    other = runner.add_session(dockerd)
    cert = runner.ca.sign(laptop.key, [session])
    refused(loop_thread, runner, other, laptop.key, cert)
    assert other not in runner.resolved


def test_certificate_without_principals_refused(
    loop_thread: LoopThread, runner: Runner, laptop: Laptop, session: str
) -> None:
    # OpenSSH refuses these; asyncssh alone would accept them for any username.
    refused(loop_thread, runner, session, laptop.key, runner.ca.sign(laptop.key, []))


def test_plain_key_refused(
    loop_thread: LoopThread, runner: Runner, laptop: Laptop, session: str
) -> None:
    refused(loop_thread, runner, session, laptop.key)


def test_expired_and_not_yet_valid_certificates_refused(
    loop_thread: LoopThread, runner: Runner, laptop: Laptop, session: str
) -> None:
    now = time.time()
    expired = runner.ca.sign(laptop.key, [session], valid_after=now - 7200, valid_before=now - 60)
    future = runner.ca.sign(laptop.key, [session], valid_after=now + 600, valid_before=now + 7200)
    refused(loop_thread, runner, session, laptop.key, expired)
    refused(loop_thread, runner, session, laptop.key, future)


def test_certificate_from_another_ca_refused(
    loop_thread: LoopThread, runner: Runner, laptop: Laptop, session: str
) -> None:
    rogue = CertificateAuthority().sign(laptop.key, [session])
    refused(loop_thread, runner, session, laptop.key, rogue)


def test_password_and_keyboard_interactive_refused(
    loop_thread: LoopThread, runner: Runner, session: str
) -> None:
    async def attempt() -> None:
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect(
                "127.0.0.1",
                runner.endpoint.port,  # type: ignore[union-attr]
                username=session,
                password="guess",
                known_hosts=None,
                client_keys=[],
                agent_path=None,
                config=[],
                preferred_auth="password,keyboard-interactive",
            )

    loop_thread.run(attempt())


def test_only_the_engine_path_and_nothing_else(
    loop_thread: LoopThread, runner: Runner, laptop: Laptop, session: str, dockerd: Dockerd
) -> None:
    cert = runner.ca.sign(laptop.key, [session])

    async def check() -> None:
        async with await ssh_connect(runner, session, laptop.key, cert) as conn:
            # Another environment's real engine socket, asked for by its path.
            with pytest.raises(asyncssh.ChannelOpenError):
                await ping_engine(conn, str(dockerd.socket))
            with pytest.raises(asyncssh.ChannelOpenError):
                await ping_engine(conn, "/var/run/docker.sock")
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run("id")
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("127.0.0.1", 22)
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 22)
            # The connection is still good for what it is for.
            assert (await ping_engine(conn)).endswith(b"OK")

    loop_thread.run(check())


def test_session_unknown_to_the_runner_refused(
    loop_thread: LoopThread, runner: Runner, laptop: Laptop
) -> None:
    unknown = "ses-not-assigned-here"
    cert = runner.ca.sign(laptop.key, [unknown])

    async def check() -> None:
        conn = await ssh_connect(runner, unknown, laptop.key, cert)
        try:
            with pytest.raises((asyncssh.ChannelOpenError, asyncssh.ConnectionLost)):
                await ping_engine(conn)
            await conn.wait_closed()  # the endpoint drops it
        finally:
            conn.close()

    loop_thread.run(check())
    assert unknown in runner.resolved


def test_agent_refuses_a_host_key_other_than_the_pinned_one(
    loop_thread: LoopThread, runner: Runner, laptop: Laptop, session: str
) -> None:
    cert = runner.ca.sign(laptop.key, [session])
    impostor = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    target = target_for(runner, laptop, session, cert)
    target = type(target)(**{**target.__dict__, "host_key": impostor})
    resolved_before = len(runner.resolved)

    async def start() -> None:
        laptop.tunnel = Tunnel(target, backoff_initial_s=0.05, backoff_max_s=0.1)
        laptop.proxy = AgentProxy(laptop.socket, laptop.tunnel)
        await laptop.proxy.start()
        await laptop.tunnel.start()

    loop_thread.run(start())
    wait_until(lambda: laptop.tunnel.failed, 20, "the tunnel to give up")  # type: ignore[union-attr]
    assert isinstance(laptop.tunnel.failed, HostKeyMismatch)  # type: ignore[union-attr]
    assert not laptop.tunnel.connected  # type: ignore[union-attr]
    assert len(runner.resolved) == resolved_before  # never got as far as signing in

    result = docker(laptop, "ps")
    assert result.returncode != 0
    stderr = result.stderr.decode()
    assert "Error response from daemon: Offload: The runner host key does not match" in stderr
