"""Runner side: sockets made inside the session's namespace, and the gate on published ports."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from offload.core.errors import NotFound, Unreachable
from offload.core.waiting import async_wait_until
from offload.runner.netns_connect import connect_in_netns, open_connection_in_netns
from offload.runner.port_gate import PortGate, allowed_ports
from tests.integration.tunnel.support import Dockerd

from .conftest import Containers
from .support import FakeClock, free_ports, udp_echo_command

PAGE = "hello from the namespace"
pytestmark = pytest.mark.slow


def httpd_args(image: str, *ports: int) -> list[str]:
    """A busybox httpd serving PAGE on each container port given."""
    serve = " && ".join(f"httpd -p {p} -h /www" for p in ports)
    return [
        image,
        "sh",
        "-c",
        f"mkdir -p /www && echo -n '{PAGE}' > /www/index.html && {serve} && exec sleep 3600",
    ]


async def test_open_connection_in_netns_reaches_a_published_port(
    ports_dockerd: Dockerd, images: dict[str, str], containers: Containers
) -> None:
    (port,) = free_ports(1)
    await containers.run("web", "-p", f"{port}:80", *httpd_args(images["busybox"], 80))

    async def answers() -> bytes | None:
        try:
            reader, writer = await open_connection_in_netns(ports_dockerd.netns, "127.0.0.1", port)
        except Unreachable:
            return None
        writer.write(b"GET /index.html HTTP/1.0\r\n\r\n")
        answer = await reader.read()
        writer.close()
        return answer or None

    answer = await async_wait_until(answers, 30, "the published port to answer in the netns")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(PAGE.encode())
    # The same port is not reachable from the runner's own namespace: the socket really was
    # made in the session's.
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_the_event_loop_thread_returns_to_its_namespace(ports_dockerd: Dockerd) -> None:
    before = os.stat("/proc/thread-self/ns/net").st_ino
    sock = await connect_in_netns(ports_dockerd.netns, "127.0.0.1", 9, socket.SOCK_DGRAM)
    sock.close()
    assert os.stat("/proc/thread-self/ns/net").st_ino == before


async def test_missing_namespace_and_closed_port_are_clear_errors(ports_dockerd: Dockerd) -> None:
    with pytest.raises(NotFound):
        await connect_in_netns("ot-no-such-netns", "127.0.0.1", 80)
    (port,) = free_ports(1)
    with pytest.raises(Unreachable) as caught:
        await open_connection_in_netns(ports_dockerd.netns, "127.0.0.1", port)
    assert str(port) in caught.value.message


async def test_gate_lets_through_only_ports_that_engine_publishes(
    ports_dockerd: Dockerd, images: dict[str, str], containers: Containers, clock: FakeClock
) -> None:
    tcp_port, udp_port, unpublished = free_ports(3)
    web = await containers.run("web", "-p", f"{tcp_port}:80", *httpd_args(images["busybox"], 80))
    await containers.run(
        "echo", "-p", f"{udp_port}:9000/udp", images["udp_echo"], *udp_echo_command(9000)
    )
    assert {("tcp", tcp_port), ("udp", udp_port)} <= await allowed_ports(ports_dockerd.socket)

    gate = PortGate(ttl_s=2.0, stale_s=10.0, clock=clock)
    engine = ports_dockerd.socket
    assert await gate.allows(engine, "tcp", tcp_port)
    assert await gate.allows(engine, "udp", udp_port)
    assert not await gate.allows(engine, "udp", tcp_port)  # published, but not for UDP
    assert not await gate.allows(engine, "tcp", unpublished)

    # A paused container keeps its ports (a connection is what wakes an idle session up).
    await containers.do("pause", web)
    clock.advance(20)
    assert await gate.allows(engine, "tcp", tcp_port)
    await containers.do("unpause", web)

    # Stopped: a recently listed port is let through while the gate re-lists in the background
    # (no forward waits on the engine), then refused.
    await containers.do("stop", "-t", "1", web)
    clock.advance(3)
    assert await gate.allows(engine, "tcp", tcp_port)

    async def refused_now() -> bool:
        return not await gate.allows(engine, "tcp", tcp_port)

    await async_wait_until(refused_now, 10, "the gate to see the container stopped")
    clock.advance(20)
    assert not await gate.allows(engine, "tcp", tcp_port)


async def test_gate_says_when_the_engine_does_not_answer(tmp_path: Path) -> None:
    with pytest.raises(Unreachable):
        await PortGate().allows(tmp_path / "missing.sock", "tcp", 80)
