"""Which ports a session may reach in its namespace: those its own engine publishes right now.

The SSH endpoint asks `PortGate.allows(env, proto, port)` before it opens a forward: only a port
that a running (or paused) container of that session's engine publishes is let through, so a
laptop cannot reach dockerd's own listeners, a container port nobody published, or anything of
another session (each session's namespace is its own; this gate is the second fence).

The answer comes from the engine itself (`GET /containers/json`, `Ports[].PublicPort/Type`) and is
cached briefly. A port missing from the cache triggers a fresh look, so a container that has just
started is reachable at once; concurrent looks at one engine share a single call, so a burst of
refused attempts costs that session's own engine one listing at a time and nothing more.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import httpx

from offload.agent.udp_relay import parse_udp_channel_path
from offload.core.engine_http import engine_client
from offload.core.errors import Unreachable
from offload.runner.driver import Environment
from offload.runner.netns_connect import (
    NETNS_LOOPBACK,
    StandbyTcpSession,
    connect_in_netns,
    forward_tcp_in_netns,
    udp_channel_session,
)

log = logging.getLogger(__name__)

CACHE_TTL_S = 2.0
STALE_S = 10.0
ENGINE_TIMEOUT_S = 10.0

PortKey = tuple[str, int]  # ("tcp" | "udp", port)


def published_from_containers(containers: list[dict]) -> set[PortKey]:
    """(proto, public port) of every published port in a `GET /containers/json` answer."""
    found: set[PortKey] = set()
    for container in containers:
        for port in container.get("Ports") or []:
            public, proto = port.get("PublicPort"), port.get("Type", "tcp")
            if isinstance(public, int) and public > 0 and proto in ("tcp", "udp"):
                found.add((proto, public))
    return found


async def allowed_ports(engine_socket: Path) -> set[PortKey]:
    """Ports published by the running and paused containers of the engine at `engine_socket`."""
    try:
        async with engine_client(engine_socket, ENGINE_TIMEOUT_S) as client:
            response = await client.get("/containers/json")
    except httpx.TransportError as exc:
        raise Unreachable(
            f"The session's engine does not answer ({exc.__class__.__name__}).",
            "The environment is broken: end the session (`offload stop`) and start again.",
        ) from None
    if response.status_code != 200:
        raise Unreachable(
            f"The session's engine refused to list containers: {response.status_code}.",
            "Check the environment's dockerd.log on the runner.",
        )
    return published_from_containers(response.json())


@dataclass
class _Entry:
    ports: set[PortKey]
    at: float


class PortGate:
    """A short-lived cache of `allowed_ports` per engine socket, on an injectable clock.

    Within `ttl_s` a cached port is allowed at once. Up to `stale_s` a cached port is still
    allowed at once while a fresh listing runs in the background, so a busy forward never waits
    on the engine; a port the cache does not hold always waits for a fresh listing.
    """

    def __init__(
        self,
        *,
        ttl_s: float = CACHE_TTL_S,
        stale_s: float = STALE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.stale_s = stale_s
        self._clock = clock
        self._cache: dict[Path, _Entry] = {}
        self._refreshing: dict[Path, asyncio.Future[set[PortKey]]] = {}
        self._background: set[asyncio.Task[set[PortKey]]] = set()

    async def allows(self, engine_socket: Path, proto: str, port: int) -> bool:
        key = (proto, port)
        entry = self._cache.get(engine_socket)
        if entry is not None and key in entry.ports:
            age = self._clock() - entry.at
            if age < self.ttl_s:
                return True
            if age < self.stale_s:
                self._refresh_in_background(engine_socket)
                return True
        return key in await self._refresh(engine_socket)

    def _refresh_in_background(self, engine_socket: Path) -> None:
        if engine_socket in self._refreshing:
            return
        task = asyncio.get_running_loop().create_task(self._refresh(engine_socket))
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[set[PortKey]]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("refreshing published ports failed: %s", task.exception())

    def forget(self, engine_socket: Path) -> None:
        """Drop what is cached for an engine (its environment is going away)."""
        self._cache.pop(engine_socket, None)

    async def _refresh(self, engine_socket: Path) -> set[PortKey]:
        pending = self._refreshing.get(engine_socket)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[set[PortKey]] = asyncio.get_running_loop().create_future()
        self._refreshing[engine_socket] = future
        try:
            ports = await allowed_ports(engine_socket)
            self._cache[engine_socket] = _Entry(ports, self._clock())
            future.set_result(ports)
            return ports
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here so an unwaited future logs nothing
            raise
        finally:
            del self._refreshing[engine_socket]


# ---- what the SSH endpoint calls --------------------------------------------------------------

# Laptops ask for the published port on the namespace's loopback; any other host is refused, so
# the endpoint can never be used to reach container IPs, the runner's network or anything else.
LOOPBACK_NAMES = ("127.0.0.1", "localhost")


async def tcp_forward(
    gate: PortGate, env: Environment, dest_host: str, dest_port: int
) -> asyncssh.SSHTCPSession[bytes]:
    """The session for a `direct-tcpip` channel to a published port of `env`, or a refusal."""
    if dest_host not in LOOPBACK_NAMES:
        raise _refused(f"forwards go to 127.0.0.1 only, not {dest_host!r}")
    await _require_published(gate, env, "tcp", dest_port)
    return await forward_tcp_in_netns(env.netns, dest_port)


def standby_tcp_forward(
    gate: PortGate, env: Callable[[], Awaitable[Environment]]
) -> asyncssh.SSHUNIXSession[bytes]:
    """The session for a standby channel: the same checks as `tcp_forward`, once the port is
    named. `env()` gives the session's environment (or raises ChannelOpenError)."""

    async def connect(port: int) -> socket.socket:
        bound = await env()
        await _require_published(gate, bound, "tcp", port)
        return await connect_in_netns(bound.netns, NETNS_LOOPBACK, port)

    return StandbyTcpSession(connect)


async def udp_forward(
    gate: PortGate, env: Environment, path: str
) -> asyncssh.SSHUNIXSession[bytes]:
    """The session for a `udp_channel_path(port)` channel of `env`, or a refusal."""
    port = parse_udp_channel_path(path)
    if port is None:
        raise _refused(f"no such channel {path!r}")
    await _require_published(gate, env, "udp", port)
    return await udp_channel_session(env.netns, port)


async def _require_published(gate: PortGate, env: Environment, proto: str, port: int) -> None:
    try:
        allowed = await gate.allows(env.engine_socket, proto, port)
    except Unreachable as exc:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, exc.message) from None
    if not allowed:
        log.info("environment %s: forward to %s/%s refused (not published)", env.id, port, proto)
        raise _refused(
            f"port {port}/{proto} is not published by a running container of this session"
        )


def _refused(reason: str) -> asyncssh.ChannelOpenError:
    return asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, reason)
