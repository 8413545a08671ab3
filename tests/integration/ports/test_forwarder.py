"""The agent's port forwarder against a real engine, through the runner's real SSH endpoint
signed in with a session certificate (`conftest.ssh`). The "laptop" is this host's own
namespace; the engine lives in another one, so a port answers here only if the forwarder listens
and forwards it."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from offload.agent.ports import PortForwarder
from offload.core.waiting import async_wait_until

from .conftest import Containers
from .support import (
    FakeClock,
    SSHPair,
    free_ports,
    refused,
    serves,
    udp_client,
    udp_echo_command,
    udp_echoes,
)
from .test_netns_and_gate import PAGE, httpd_args

pytestmark = pytest.mark.slow
BODY = PAGE.encode()


def forwarded(f: PortForwarder, port: int, proto: str = "tcp") -> list[tuple[str, str]]:
    """(host ip, container name) of each laptop listener for port/proto."""
    return [
        (fw.host_ip, fw.container_name)
        for fw in f.snapshot().forwards
        if fw.port == port and fw.proto == proto
    ]


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


async def test_a_published_port_is_served_on_the_laptop_and_follows_its_container(
    forwarder: PortForwarder, images: dict[str, str], containers: Containers
) -> None:
    (port,) = free_ports(1)
    web = await containers.run("web", "-p", f"{port}:80", *httpd_args(images["busybox"], 80))

    await async_wait_until(lambda: serves("127.0.0.1", port, BODY), 30, "the page on the laptop")
    # Docker publishes -p on 0.0.0.0 and ::; so does the forwarder.
    assert ("0.0.0.0", web) in forwarded(forwarder, port)
    if ipv6_loopback():
        assert ("::", web) in forwarded(forwarder, port)
        assert await serves("::1", port, BODY)
    info = next(fw for fw in forwarder.snapshot().forwards if fw.port == port)
    assert info.private_port == 80
    assert forwarder.last_activity is not None

    # Paused (as an idle session's containers are): the listener stays.
    await containers.do("pause", web)
    await forwarder.sync()
    assert forwarded(forwarder, port)
    await containers.do("unpause", web)

    await containers.do("stop", "-t", "1", web)
    await async_wait_until(lambda: refused("127.0.0.1", port), 30, "the forward to go away")
    assert not forwarded(forwarder, port)

    await containers.do("start", web)
    await async_wait_until(lambda: serves("127.0.0.1", port, BODY), 30, "the forward to return")

    await containers.do("rm", "-f", web)
    await async_wait_until(lambda: refused("127.0.0.1", port), 30, "the forward to go away")


async def test_random_ports_ranges_and_several_ports(
    forwarder: PortForwarder, images: dict[str, str], containers: Containers
) -> None:
    low, mid, high, loopback_only = free_ports(4)
    name = await containers.run(
        "multi",
        "-P",
        "--expose", "7001",
        "-p", f"{low}-{high}:8000-8002",
        "-p", f"127.0.0.1:{loopback_only}:8000",
        *httpd_args(images["busybox"], 8000, 8001, 7001),
    )  # fmt: skip
    random_port = int(
        (await containers.do("port", name, "7001/tcp")).splitlines()[0].rsplit(":", 1)[1]
    )

    for port in (low, mid, random_port, loopback_only):
        await async_wait_until(lambda p=port: serves("127.0.0.1", p, BODY), 30, f"port {port}")
    assert forwarded(forwarder, high)  # listening, though nothing serves 8002 in the container
    assert forwarded(forwarder, loopback_only) == [("127.0.0.1", name)]


async def test_a_taken_laptop_port_is_reported_and_nothing_else_breaks(
    forwarder: PortForwarder, images: dict[str, str], containers: Containers
) -> None:
    taken, free = free_ports(2)
    holder = socket.socket()
    holder.bind(("0.0.0.0", taken))
    holder.listen()
    try:
        name = await containers.run(
            "taken", "-p", f"{taken}:80", "-p", f"{free}:80", *httpd_args(images["busybox"], 80)
        )

        async def conflict_reported() -> bool:
            return any(
                c.port == taken and c.host_ip == "0.0.0.0" and c.container_name == name
                for c in forwarder.snapshot().conflicts
            )

        await async_wait_until(conflict_reported, 30, "the conflict to be reported")
        conflict = next(c for c in forwarder.snapshot().conflicts if c.port == taken)
        assert conflict.proto == "tcp" and "already in use" in conflict.reason
        await async_wait_until(lambda: serves("127.0.0.1", free, BODY), 30, "the other port")
    finally:
        holder.close()

    # Freed: the next re-list (an event, a reconnect or the periodic resync) takes it over.
    forwarder.kick()
    await async_wait_until(lambda: serves("127.0.0.1", taken, BODY), 30, "the freed port")
    assert not forwarder.snapshot().conflicts


async def test_udp_ports_relay_datagrams_per_client(
    forwarder: PortForwarder, images: dict[str, str], containers: Containers, clock: FakeClock
) -> None:
    (port,) = free_ports(1)
    await containers.run(
        "echo", "-p", f"{port}:9000/udp", images["udp_echo"], *udp_echo_command(9000)
    )
    await async_wait_until(lambda: _has(forwarder, port, "udp"), 30, "the UDP forward")

    first, second = await udp_client("127.0.0.1", port), await udp_client("127.0.0.1", port)
    try:
        await async_wait_until(lambda: udp_echoes(first, b"one"), 30, "the first client's echo")
        await async_wait_until(lambda: udp_echoes(second, b"two"), 30, "the second client's echo")
        assert forwarder.open_connections == 2  # one relay per laptop client address

        clock.advance(forwarder.udp_idle_timeout_s + 1)
        await forwarder.sync()  # sweeps idle relays
        assert forwarder.open_connections == 0
        await async_wait_until(lambda: udp_echoes(first, b"again"), 30, "an echo after idling")
    finally:
        for client in (first, second):
            assert client.transport is not None
            client.transport.close()


async def test_forwards_survive_an_unreachable_engine_and_resync(
    ssh: SSHPair, images: dict[str, str], containers: Containers
) -> None:
    """The engine channel failing (tunnel down) keeps listeners; the engine is re-read after."""
    (port,) = free_ports(1)
    await containers.run("web", "-p", f"{port}:80", *httpd_args(images["busybox"], 80))
    tunnel_up = True
    engine_channels: list[Any] = []

    async def open_engine() -> tuple[object, object]:
        if not tunnel_up:
            raise ConnectionError("the tunnel to the runner is down")
        reader, writer = await ssh.open_engine()
        engine_channels.append(writer)
        return reader, writer

    f = PortForwarder(
        ssh.open_tcp, ssh.open_udp, open_engine, retry_initial_s=0.05, retry_max_s=0.2
    )
    await f.start()
    try:
        await async_wait_until(lambda: serves("127.0.0.1", port, BODY), 30, "the page")
        tunnel_up = False
        for writer in engine_channels:  # the channel drops under the event stream
            writer.channel.abort()

        async def down() -> bool:
            snapshot = f.snapshot()
            return (
                not snapshot.following and snapshot.last_error == "the tunnel to the runner is down"
            )

        await async_wait_until(down, 30, "the follower to notice")
        assert forwarded(f, port)  # the listeners stay
        tunnel_up = True
        f.kick()
        await async_wait_until(lambda: _following(f), 30, "following again")
        assert f.snapshot().last_error is None
        assert await serves("127.0.0.1", port, BODY)
    finally:
        await f.close()


async def _following(f: PortForwarder) -> bool:
    return f.snapshot().following


async def _has(f: PortForwarder, port: int, proto: str) -> bool:
    return bool(forwarded(f, port, proto))
