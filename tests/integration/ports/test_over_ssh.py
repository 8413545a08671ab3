"""The same forwards through a real SSH connection, with the runner-side wiring the endpoint gets
(`PortsServer` in support.py calls `port_gate.tcp_forward` / `udp_forward`, as
`runner/ssh_endpoint._Server` will): engine, TCP and UDP all cross one asyncssh connection."""

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
    environment_of,
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
    pair = await ssh_pair(environment_of(ports_dockerd), PortGate())
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


async def test_half_close_and_bulk_data_cross_both_splices(
    ssh: SSHPair, images: dict[str, str], containers: Containers
) -> None:
    """An echo server (`nc -e cat`) answers only after the client's EOF: the laptop's half-close
    must reach the container through the agent, the channel and the runner, and the echo come
    back whole before the far side closes."""
    (port,) = free_ports(1)
    await containers.run(
        "cat", "-p", f"{port}:7000", images["busybox"], "nc", "-ll", "-p", "7000", "-e", "cat"
    )
    forwarder = PortForwarder(ssh.open_tcp, ssh.open_udp, ssh.open_engine, retry_initial_s=0.05)
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
        await async_wait_until(echoes, 30, "the echo through the forward")
        await async_wait_until(lambda: _no_connections(forwarder), 10, "the connection to end")
    finally:
        await forwarder.close()


async def _no_connections(forwarder: PortForwarder) -> bool:
    return forwarder.open_connections == 0
