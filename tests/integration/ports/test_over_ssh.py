"""The same forwards through a real SSH connection to the runner's real endpoint (`SSHEndpoint`,
signed in with a session certificate), whose session is bound to the test environment: engine,
TCP and UDP all cross one asyncssh connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncssh
import pytest

from offload.agent.ports import PortForwarder
from offload.core.waiting import async_wait_until
from offload.runner.port_gate import PortGate
from tests.integration.tunnel.support import Dockerd

from .conftest import Containers
from .support import (
    SSHPair,
    free_ports,
    serves,
    ssh_pair,
    udp_client,
    udp_echo_command,
    udp_echoes,
)
from .test_netns_and_gate import PAGE, httpd_args

pytestmark = pytest.mark.slow


@pytest.fixture
async def ssh(ports_dockerd: Dockerd) -> AsyncIterator[SSHPair]:
    pair = await ssh_pair(ports_dockerd, PortGate())
    try:
        yield pair
    finally:
        await pair.close()


async def test_tcp_and_udp_forwards_cross_one_ssh_connection(
    ssh: SSHPair, images: dict[str, str], containers: Containers
) -> None:
    web_port, udp_port = free_ports(2)
    await containers.run("web", "-p", f"{web_port}:80", *httpd_args(images["busybox"], 80))
    await containers.run(
        "echo", "-p", f"{udp_port}:9000/udp", images["udp_echo"], *udp_echo_command(9000)
    )
    forwarder = PortForwarder(
        ssh.open_tcp, ssh.open_udp, ssh.open_engine, retry_initial_s=0.05, retry_max_s=0.5
    )
    await forwarder.start()
    try:
        await async_wait_until(
            lambda: serves("127.0.0.1", web_port, PAGE.encode()), 30, "the page through SSH"
        )
        client = await udp_client("127.0.0.1", udp_port)
        try:
            await async_wait_until(lambda: udp_echoes(client, b"ping"), 30, "a UDP echo")
        finally:
            assert client.transport is not None
            client.transport.close()
    finally:
        await forwarder.close()


async def test_the_runner_refuses_what_the_session_does_not_publish(
    ssh: SSHPair, images: dict[str, str], containers: Containers
) -> None:
    published, unpublished = free_ports(2)
    await containers.run("web", "-p", f"{published}:80", *httpd_args(images["busybox"], 80))

    with pytest.raises(asyncssh.ChannelOpenError, match="not published"):
        await ssh.open_tcp_streams(unpublished)
    with pytest.raises(asyncssh.ChannelOpenError, match="not published"):
        await ssh.open_udp(published)  # published for TCP only
    with pytest.raises(asyncssh.ChannelOpenError, match="127.0.0.1 only"):
        await ssh.client.open_connection("172.17.0.1", published)
    with pytest.raises(asyncssh.ChannelOpenError):
        await ssh.client.open_unix_connection("/udp/not-a-port")

    async def page() -> bool:  # while the published one goes through
        reader, writer = await ssh.open_tcp_streams(published)
        writer.write(b"GET /index.html HTTP/1.0\r\n\r\n")
        answer = await reader.read()
        writer.close()
        return answer.endswith(PAGE.encode())

    await async_wait_until(page, 30, "the published port through SSH")


def forwarder_over(ssh: SSHPair, path: str) -> PortForwarder:
    """The agent's forwarder on one of its two TCP paths: a `direct-tcpip` channel opened per
    connection, or a standby channel opened ahead (with the first as fallback)."""
    return PortForwarder(
        ssh.open_tcp,
        ssh.open_udp,
        ssh.open_engine,
        retry_initial_s=0.05,
        take_tcp=ssh.take_tcp if path == "standby" else None,
    )


TCP_PATHS = pytest.mark.parametrize("path", ["direct-tcpip", "standby"])


@TCP_PATHS
async def test_half_close_and_bulk_data_cross_both_splices(
    ssh: SSHPair, images: dict[str, str], containers: Containers, path: str
) -> None:
    """An echo server (`nc -e cat`) answers only after the client's EOF: the laptop's half-close
    must reach the container through the agent, the channel and the runner, and the echo come
    back whole before the far side closes."""
    (port,) = free_ports(1)
    await containers.run(
        "cat", "-p", f"{port}:7000", images["busybox"], "nc", "-ll", "-p", "7000", "-e", "cat"
    )
    forwarder = forwarder_over(ssh, path)
    await forwarder.start()
    payload = bytes(range(256)) * 8192  # 2 MiB, more than one channel packet and socket buffer

    async def echoes() -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        try:
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            return await asyncio.wait_for(reader.read(), 30) == payload
        except OSError:
            return False
        finally:
            writer.close()

    try:
        for _ in range(3):  # the first may go the long way while standby channels open
            await async_wait_until(echoes, 30, "the echo through the forward")
        await async_wait_until(lambda: _no_connections(forwarder), 10, "the connection to end")
    finally:
        await forwarder.close()
    if path == "standby":
        assert ssh.standby is not None and ssh.standby.taken > 0


@TCP_PATHS
async def test_a_server_that_speaks_first_is_heard(
    ssh: SSHPair, images: dict[str, str], containers: Containers, path: str
) -> None:
    """SSH, SMTP or a database greet before the client says anything: the greeting must not be
    lost while the runner links the channel to the socket."""
    (port,) = free_ports(1)
    greeter = ["nc", "-ll", "-p", "7000", "-e", "echo", "HELLO"]
    await containers.run("greeter", "-p", f"{port}:7000", images["busybox"], *greeter)
    forwarder = forwarder_over(ssh, path)
    await forwarder.start()

    async def greeted() -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        try:
            return await asyncio.wait_for(reader.read(), 10) == b"HELLO\n"
        finally:
            writer.close()

    try:
        await async_wait_until(greeted, 30, "the container's greeting through the forward")
        for _ in range(20):  # each connection a new race, on a channel opened ahead or not
            assert await greeted()
    finally:
        await forwarder.close()


class _Recorder:
    """An asyncssh session that keeps what it receives and notices the channel closing."""

    def __init__(self) -> None:
        self.data = b""
        self.eof = asyncio.Event()
        self.closed = asyncio.Event()

    def connection_made(self, chan: object) -> None:
        pass

    def session_started(self) -> None:
        pass

    def data_received(self, data: bytes, datatype: object) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof.set()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()


async def test_a_standby_channel_reaches_only_what_the_session_publishes(
    ssh: SSHPair, images: dict[str, str], containers: Containers
) -> None:
    published, unpublished = free_ports(2)
    await containers.run("web", "-p", f"{published}:80", *httpd_args(images["busybox"], 80))
    assert ssh.take_tcp(published, _Recorder) is None  # none opened yet: this opens them
    standby = ssh.standby
    assert standby is not None

    async def two_ready() -> bool:
        return standby.ready == 2

    await async_wait_until(two_ready, 10, "two standby channels")

    refused = _Recorder()
    chan = ssh.take_tcp(unpublished, lambda: refused)
    assert chan is not None
    chan.write(b"GET /index.html HTTP/1.0\r\n\r\n")
    await asyncio.wait_for(refused.closed.wait(), 10)
    assert refused.data == b""

    served = _Recorder()
    chan = ssh.take_tcp(published, lambda: served)
    assert chan is not None
    chan.write(b"GET /index.html HTTP/1.0\r\n\r\n")
    await asyncio.wait_for(served.eof.wait(), 10)  # the answer is complete
    chan.close()
    assert served.data.startswith(b"HTTP/1.") and served.data.endswith(PAGE.encode())


async def _no_connections(forwarder: PortForwarder) -> bool:
    return forwarder.open_connections == 0
