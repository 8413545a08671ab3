"""A dropped tunnel: docker commands get a clear 503, and the agent reconnects by itself."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import asyncssh
import pytest

from offload.agent.proxy import AgentProxy
from offload.agent.tunnel import Tunnel, TunnelTarget
from offload.core.errors import NotFound
from offload.core.waiting import wait_until

from .support import (
    CertificateAuthority,
    Dockerd,
    Laptop,
    LoopThread,
    Relay,
    Runner,
    docker,
    docker_ok,
    make_laptop,
    stop_agent,
    target_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def own_runner(loop_thread: LoopThread, ca: CertificateAuthority) -> Iterator[Runner]:
    """A runner of this test's own, so stopping it disturbs no other test."""
    r = Runner(host_key=asyncssh.generate_private_key("ssh-ed25519"), ca=ca)
    loop_thread.run(r.start())
    yield r
    loop_thread.run(r.endpoint.stop())  # type: ignore[union-attr]


@pytest.fixture
def laptop(loop_thread: LoopThread) -> Iterator[Laptop]:
    lt = make_laptop()
    yield lt
    stop_agent(loop_thread, lt)


def start(
    loop_thread: LoopThread,
    laptop: Laptop,
    target: TunnelTarget,
    credentials: object = None,
    clock: Callable[[], float] = time.monotonic,
    **tunnel_options: float,
) -> None:
    async def go() -> None:
        laptop.tunnel = Tunnel(
            target,
            credentials,  # type: ignore[arg-type]
            backoff_initial_s=0.05,
            backoff_max_s=0.3,
            **tunnel_options,  # type: ignore[arg-type]
        )
        laptop.proxy = AgentProxy(laptop.socket, laptop.tunnel, clock=clock)
        await laptop.proxy.start()
        await laptop.tunnel.start()

    loop_thread.run(go())


def connected(laptop: Laptop) -> bool:
    return laptop.tunnel is not None and laptop.tunnel.connected


def test_drop_gives_clear_error_then_reconnects(
    loop_thread: LoopThread, own_runner: Runner, laptop: Laptop, dockerd: Dockerd
) -> None:
    session = own_runner.add_session(dockerd)
    port = own_runner.endpoint.port  # type: ignore[union-attr]
    renewals: list[str] = []

    async def credentials() -> TunnelTarget:
        renewals.append(session)
        return target_for(own_runner, laptop, session, own_runner.ca.sign(laptop.key, [session]))

    cert = own_runner.ca.sign(laptop.key, [session])
    start(loop_thread, laptop, target_for(own_runner, laptop, session, cert), credentials)
    wait_until(lambda: connected(laptop), 20, "the tunnel to connect")
    docker_ok(laptop, "ps")

    loop_thread.run(own_runner.endpoint.stop())  # type: ignore[union-attr]
    wait_until(lambda: not connected(laptop), 20, "the agent to notice the drop")
    result = docker(laptop, "ps")
    assert result.returncode != 0
    stderr = result.stderr.decode()
    assert "Error response from daemon: Offload: the tunnel to the runner is down" in stderr
    assert "Run `docker offload start` to reconnect." in stderr

    loop_thread.run(own_runner.start(port))
    wait_until(lambda: connected(laptop), 20, "the agent to reconnect")
    assert renewals, "a reconnect asks for fresh credentials first"
    docker_ok(laptop, "ps")


def test_refused_certificate_is_renewed_through_credentials(
    loop_thread: LoopThread, own_runner: Runner, laptop: Laptop, dockerd: Dockerd
) -> None:
    session = own_runner.add_session(dockerd)
    now = time.time()
    expired = own_runner.ca.sign(
        laptop.key, [session], valid_after=now - 7200, valid_before=now - 1
    )

    async def credentials() -> TunnelTarget:
        return target_for(own_runner, laptop, session, own_runner.ca.sign(laptop.key, [session]))

    start(loop_thread, laptop, target_for(own_runner, laptop, session, expired), credentials)
    wait_until(lambda: connected(laptop), 20, "the tunnel to connect with a renewed certificate")
    docker_ok(laptop, "ps")


def test_session_gone_stops_retrying(
    loop_thread: LoopThread, own_runner: Runner, laptop: Laptop, dockerd: Dockerd
) -> None:
    session = own_runner.add_session(dockerd)
    now = time.time()
    expired = own_runner.ca.sign(
        laptop.key, [session], valid_after=now - 7200, valid_before=now - 1
    )

    async def credentials() -> TunnelTarget:
        raise NotFound(f"Session {session} has ended.")

    start(loop_thread, laptop, target_for(own_runner, laptop, session, expired), credentials)
    wait_until(lambda: laptop.tunnel.failed, 20, "the tunnel to give up")  # type: ignore[union-attr]
    assert isinstance(laptop.tunnel.failed, NotFound)  # type: ignore[union-attr]


def test_session_ended_message(
    loop_thread: LoopThread, own_runner: Runner, laptop: Laptop, dockerd: Dockerd
) -> None:
    session = own_runner.add_session(dockerd)
    cert = own_runner.ca.sign(laptop.key, [session])
    start(loop_thread, laptop, target_for(own_runner, laptop, session, cert))
    wait_until(lambda: connected(laptop), 20, "the tunnel to connect")

    message = "Offload: session ended. Run `docker offload start`."
    laptop.proxy.refuse_all(message)  # type: ignore[union-attr]
    result = docker(laptop, "ps")
    assert result.returncode != 0
    assert f"Error response from daemon: {message}" in result.stderr.decode()


def test_stale_socket_file_is_replaced(
    loop_thread: LoopThread, own_runner: Runner, laptop: Laptop, dockerd: Dockerd
) -> None:
    laptop.socket.parent.mkdir(parents=True)
    laptop.socket.write_text("left by an agent that died")
    session = own_runner.add_session(dockerd)
    cert = own_runner.ca.sign(laptop.key, [session])
    start(loop_thread, laptop, target_for(own_runner, laptop, session, cert))
    wait_until(lambda: connected(laptop), 20, "the tunnel to connect")
    docker_ok(laptop, "ps")
    assert laptop.socket.stat().st_mode & 0o777 == 0o600
    assert laptop.socket.parent.stat().st_mode & 0o777 == 0o700


def test_activity_snapshot_follows_connections_on_its_clock(
    loop_thread: LoopThread, own_runner: Runner, laptop: Laptop, dockerd: Dockerd
) -> None:
    now = [100.0]
    session = own_runner.add_session(dockerd)
    cert = own_runner.ca.sign(laptop.key, [session])
    start(loop_thread, laptop, target_for(own_runner, laptop, session, cert), clock=lambda: now[0])
    wait_until(lambda: connected(laptop), 20, "the tunnel to connect")
    proxy = laptop.proxy
    assert proxy is not None
    snap = proxy.activity_snapshot()
    assert (snap.open_connections, snap.total_connections, snap.last_activity) == (0, 0, None)

    now[0] = 200.0
    docker_ok(laptop, "ps")
    assert proxy.activity_snapshot().last_activity == 200.0
    assert proxy.activity_snapshot().total_connections >= 1

    # The CLI has exited; its connection ends once the engine has closed its side too.
    wait_until(lambda: proxy.activity_snapshot().open_connections == 0, 10, "none open")
    total = proxy.activity_snapshot().total_connections

    now[0] = 300.0
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(laptop.socket))
        wait_until(lambda: proxy.activity_snapshot().total_connections == total + 1, 10, "accept")
        snap = proxy.activity_snapshot()
        assert (snap.open_connections, snap.last_activity) == (1, 300.0)
    wait_until(lambda: proxy.activity_snapshot().open_connections == 0, 10, "none open")


def test_keepalives_notice_a_dead_path_on_both_ends(
    loop_thread: LoopThread, ca: CertificateAuthority, laptop: Laptop, dockerd: Dockerd
) -> None:
    runner = Runner(host_key=asyncssh.generate_private_key("ssh-ed25519"), ca=ca)
    endpoint = loop_thread.run(runner.start(keepalive_interval=0.2, keepalive_count_max=2))
    relay = Relay(endpoint.port)
    loop_thread.run(relay.start())
    try:
        session = runner.add_session(dockerd)
        cert = runner.ca.sign(laptop.key, [session])
        target = target_for(runner, laptop, session, cert)
        target = TunnelTarget(**{**target.__dict__, "port": relay.port})
        start(loop_thread, laptop, target, keepalive_interval_s=0.2, keepalive_count_max=2)
        wait_until(lambda: connected(laptop), 20, "the tunnel to connect")
        assert len(endpoint._connections) == 1

        relay.frozen = True  # packets vanish; no FIN, no RST
        wait_until(lambda: not connected(laptop), 20, "the agent's keepalive to give up")
        wait_until(lambda: not endpoint._connections, 20, "the runner's keepalive to give up")
    finally:
        loop_thread.run(relay.stop())
        loop_thread.run(endpoint.stop())
