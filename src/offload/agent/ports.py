"""Published ports on the laptop: listen where docker would, forward into the session's namespace.

`PortForwarder` follows the session engine: it lists the running containers' published ports
(`GET /containers/json`) and re-lists whenever a container event says that set may have changed
(`GET /events`, type container: start, die, stop, kill, pause, unpause, destroy). Each published
port becomes a laptop listener on the same host IP and port as docker would bind (`-p 8080:80` on
0.0.0.0 and `::`, `-p 127.0.0.1:8080:80` on loopback only; `-P`, ranges and compose services are
just more entries of the same list). Every accepted connection is forwarded through the injected
`take_tcp(port)` (a standby channel opened ahead, `offload.agent.standby`) or, when none is
ready, `open_tcp(port)`, which the agent wires to a `direct-tcpip` channel of the session's SSH
connection; the runner maps either to that port inside the session's network namespace. UDP ports
relay datagrams per client address (`offload.agent.udp_relay`).

A port already taken on the laptop does not stop anything else: it is kept as a `PortConflict`
naming the container that wanted it (for `offload status` and the log) and tried again at every
re-list, so it starts forwarding once the port is free. Paused containers keep their forwards,
as docker keeps their ports bound: a connection during an idle session is activity that resumes it.
When the engine cannot be reached (tunnel down), listeners stay and the follower retries; the
engine's state is re-read on every reconnect, so forwards come back after a resume.

The three transports are injected (the module knows nothing about SSH): tests wire them straight
into a namespace, the agent through its tunnel.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote

from offload.agent.engine_requests import OpenEngine, Streams, engine_get_json, engine_stream
from offload.agent.state import ForwardInfo, PortConflict, PortsSnapshot
from offload.agent.udp_relay import IDLE_TIMEOUT_S, UdpForward
from offload.core.waiting import wait_event, within

log = logging.getLogger(__name__)

OpenUdp = Callable[[int], Awaitable[Streams]]
# open_tcp(port, protocol_factory): connect the protocol the factory makes to `port` in the
# session, e.g. `conn.create_connection(factory, "127.0.0.1", port)` (asyncssh) or
# `loop.create_connection(factory, sock=...)`; it returns once connected and raises if it cannot.
OpenTcp = Callable[[int, Callable[[], Any]], Awaitable[Any]]
# take_tcp(port, protocol_factory): the same at once over a channel opened ahead
# (`offload.agent.standby`), or None when there is none ready.
TakeTcp = Callable[[int, Callable[[], Any]], Any | None]

# The laptop socket's write buffer may hold this much before the far side is paused.
LOCAL_WRITE_BUFFER = 4 * 1024 * 1024
RESYNC_INTERVAL_S = 30.0
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 10.0
ENGINE_TIMEOUT_S = 30.0
EVENT_ACTIONS = ("start", "die", "stop", "kill", "pause", "unpause", "destroy")
EVENTS_PATH = "/events?filters=" + quote(
    json.dumps({"type": ["container"], "event": list(EVENT_ACTIONS)}, separators=(",", ":"))
)


# ---- what the engine publishes -------------------------------------------------------------

ListenKey = tuple[str, str, int]  # (proto, laptop host ip, port)


@dataclass(frozen=True)
class WantedPort:
    proto: str
    host_ip: str
    port: int
    container_id: str
    container_name: str
    private_port: int

    @property
    def key(self) -> ListenKey:
        return (self.proto, self.host_ip, self.port)


def laptop_host_ip(engine_ip: str | None) -> str:
    """Where to listen on the laptop for a port the engine publishes on `engine_ip`."""
    return engine_ip or "0.0.0.0"  # older engines leave IP empty for "all addresses"


def wanted_ports(containers: list[dict[str, Any]]) -> dict[ListenKey, WantedPort]:
    """Every published port of a `GET /containers/json` answer, by where it listens."""
    wanted: dict[ListenKey, WantedPort] = {}
    for container in containers:
        names = container.get("Names") or []
        name = names[0].lstrip("/") if names else container.get("Id", "")[:12]
        for port in container.get("Ports") or []:
            public, proto = port.get("PublicPort"), port.get("Type", "tcp")
            if not isinstance(public, int) or public <= 0 or proto not in ("tcp", "udp"):
                continue  # exposed but not published
            item = WantedPort(
                proto=proto,
                host_ip=laptop_host_ip(port.get("IP")),
                port=public,
                container_id=container.get("Id", ""),
                container_name=name,
                private_port=int(port.get("PrivatePort") or 0),
            )
            wanted.setdefault(item.key, item)
    return wanted


# ---- laptop sockets ------------------------------------------------------------------------


class _Unsupported(Exception):
    """The laptop has no such address family (e.g. `::` without IPv6): nothing to report."""


def bind_socket(proto: str, host_ip: str, port: int) -> socket.socket:
    """A laptop socket bound like docker-proxy binds: v6 sockets are v6-only, so 0.0.0.0 and ::
    are two listeners; no SO_REUSEADDR on UDP, where it would let two owners share a port."""
    family = socket.AF_INET6 if ":" in host_ip else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    try:
        sock = socket.socket(family, kind)
    except OSError as exc:
        raise _Unsupported(str(exc)) from None
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host_ip, port))
        except OSError as exc:
            if family == socket.AF_INET6 and host_ip == "::" and exc.errno == errno.EADDRNOTAVAIL:
                raise _Unsupported(str(exc)) from None
            raise
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_failure(exc: OSError, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "the port is already in use on this machine"
    if exc.errno == errno.EACCES:
        return (
            f"binding port {port} needs privileges on this machine: publish it on a port above "
            "1023 (-p 8080:<container port>), or allow it with "
            f"`sudo sysctl net.ipv4.ip_unprivileged_port_start={port}`"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return "this machine has no such address"
    return exc.strerror or str(exc)


# ---- one forward ---------------------------------------------------------------------------


class _Forward:
    """A laptop listener for one published port, and its connections."""

    def __init__(self, forwarder: PortForwarder, wanted: WantedPort) -> None:
        self.forwarder = forwarder
        self.wanted = wanted
        self.pipes: set[_LocalSide] = set()
        self._server: asyncio.AbstractServer | None = None
        self._udp: UdpForward | None = None

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        if self.wanted.proto == "tcp":
            self._server = await loop.create_server(lambda: _LocalSide(self), sock=sock)
        else:
            udp = UdpForward(
                self.wanted.port,
                self.forwarder._open_udp,
                idle_timeout_s=self.forwarder.udp_idle_timeout_s,
                clock=self.forwarder._clock,
                on_change=self.forwarder._notify,
                on_activity=self.forwarder._touch,
            )
            await loop.create_datagram_endpoint(lambda: udp, sock=sock)
            self._udp = udp

    @property
    def open_connections(self) -> int:
        return self._udp.open_relays if self._udp is not None else len(self.pipes)

    def sweep(self) -> None:
        if self._udp is not None:
            self._udp.sweep()

    def abort_connections(self) -> None:
        for pipe in list(self.pipes):
            pipe.abort()

    def close(self) -> None:
        # Live connections are left to end on their own: the container side closes them when it
        # stops, and a compose re-create on the same port keeps serving the new listener.
        if self._server is not None:
            self._server.close()
        if self._udp is not None:
            self._udp.close()


class _LocalSide(asyncio.Protocol):
    """One laptop connection, spliced at protocol level onto one far-side connection.

    No stream and no task per chunk: bytes go from `data_received` straight to the other side's
    `write`, with flow control (pause/resume reading) and half-close passed through both ways.
    The client is not read until the far side is open, so nothing needs buffering meanwhile.
    """

    def __init__(self, forward: _Forward) -> None:
        self._forward = forward
        self._touch = forward.forwarder._touch
        self._transport: asyncio.Transport | None = None
        self._far: Any = None  # the far side's transport (asyncio transport or SSH channel)
        self._local_eof = False
        self._far_eof = False
        self._opening: asyncio.Task[None] | None = None  # held so it is not collected mid-way

    # local socket events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        # A small buffer would pause the channel at every burst: far data arrives in packets
        # of up to 256 KiB and a 16 MiB window.
        self._transport.set_write_buffer_limits(high=LOCAL_WRITE_BUFFER)
        self._transport.pause_reading()
        self._forward.pipes.add(self)
        self._forward.forwarder._connection_opened()
        take = self._forward.forwarder._take_tcp
        if take is None or take(self._forward.wanted.port, lambda: _FarSide(self)) is None:
            self._opening = asyncio.get_running_loop().create_task(self._open_far())

    def data_received(self, data: bytes) -> None:
        self._touch()
        self._far.write(data)

    def eof_received(self) -> bool:
        self._local_eof = True
        if self._far is not None:
            self._far.write_eof()
        return not self._far_eof  # False: both directions done, asyncio closes the socket

    def pause_writing(self) -> None:
        if self._far is not None:
            self._far.pause_reading()  # the laptop client reads slowly: stop taking far data

    def resume_writing(self) -> None:
        if self._far is not None:
            self._far.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._far is not None:
            self._far.close()
        if self in self._forward.pipes:
            self._forward.pipes.discard(self)
            self._forward.forwarder._connection_closed()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def _open_far(self) -> None:
        try:
            await self._forward.forwarder._open_tcp(
                self._forward.wanted.port, lambda: _FarSide(self)
            )
        except Exception as exc:
            log.info(
                "port %s/tcp (container %s): could not reach it in the session: %s",
                self._forward.wanted.port, self._forward.wanted.container_name, _describe(exc),
            )  # fmt: skip
            if self._transport is not None:
                self._transport.close()

    # far side events (from _FarSide)
    def far_opened(self, far: Any) -> None:
        if self._transport is None:  # the client left while the far side was opening
            far.close()
            return
        self._far = far
        self._transport.resume_reading()

    def far_data(self, data: bytes) -> None:
        self._touch()
        if self._transport is not None:
            self._transport.write(data)

    def far_eof(self) -> bool:
        self._far_eof = True
        if self._transport is not None and self._transport.can_write_eof():
            self._transport.write_eof()
        return not self._local_eof

    def far_closed(self) -> None:
        self._far = None
        if self._transport is not None:
            self._transport.close()  # flushes what the far side sent, then closes

    def pause_local(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_local(self) -> None:
        if self._transport is not None and self._far is not None:
            self._transport.resume_reading()


class _FarSide:
    """The far half of a `_LocalSide`: both an asyncio `Protocol` and an asyncssh `SSHTCPSession`
    (their callbacks match except for the `datatype` argument asyncssh adds), so `open_tcp` may
    connect it with `loop.create_connection` or `SSHClientConnection.create_connection`."""

    def __init__(self, local: _LocalSide) -> None:
        self._local = local

    def connection_made(self, transport: Any) -> None:
        self._local.far_opened(transport)

    def data_received(self, data: bytes, datatype: Any = None) -> None:
        self._local.far_data(data)

    def eof_received(self) -> bool:
        return self._local.far_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self._local.far_closed()

    def pause_writing(self) -> None:
        self._local.pause_local()  # the far side's window or buffer is full

    def resume_writing(self) -> None:
        self._local.resume_local()

    def session_started(self) -> None:  # asyncssh calls this after connection_made
        pass


def _describe(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or getattr(exc, "reason", None) or str(exc)
    return (message or exc.__class__.__name__).splitlines()[0]


# ---- the forwarder -------------------------------------------------------------------------


class PortForwarder:
    def __init__(
        self,
        open_tcp: OpenTcp,
        open_udp: OpenUdp,
        open_engine: OpenEngine,
        *,
        clock: Callable[[], float] = time.monotonic,
        resync_interval_s: float = RESYNC_INTERVAL_S,
        retry_initial_s: float = RETRY_INITIAL_S,
        retry_max_s: float = RETRY_MAX_S,
        udp_idle_timeout_s: float = IDLE_TIMEOUT_S,
        take_tcp: TakeTcp | None = None,
    ) -> None:
        self._open_tcp = open_tcp
        self._take_tcp = take_tcp
        self._open_udp = open_udp
        self._open_engine = open_engine
        self._clock = clock
        self.resync_interval_s = resync_interval_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.udp_idle_timeout_s = udp_idle_timeout_s
        self._forwards: dict[ListenKey, _Forward] = {}
        self._conflicts: dict[ListenKey, PortConflict] = {}
        self._last_activity: float | None = None
        self._following = False
        self._last_error: str | None = None
        self._dirty = asyncio.Event()
        self._wake = asyncio.Event()
        self._sync_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.on_change: Callable[[PortForwarder], None] | None = None
        # Told of every byte or datagram forwarded (the agent counts it as Docker activity).
        self.on_activity: Callable[[], None] | None = None

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Follow the engine in the background (returns at once)."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow()), loop.create_task(self._reconcile_loop())]

    def kick(self) -> None:
        """Re-read the engine now (e.g. the tunnel has just reconnected)."""
        self._wake.set()
        self._dirty.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for forward in self._forwards.values():
            forward.close()
            forward.abort_connections()
        self._forwards.clear()
        self._conflicts.clear()

    # ---- what status shows ------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        return sum(f.open_connections for f in self._forwards.values())

    @property
    def last_activity(self) -> float | None:
        """When a forwarded connection last opened, closed or carried bytes (on the clock)."""
        return self._last_activity

    def snapshot(self) -> PortsSnapshot:
        forwards = [
            ForwardInfo(
                proto=f.wanted.proto,
                host_ip=f.wanted.host_ip,
                port=f.wanted.port,
                container_id=f.wanted.container_id,
                container_name=f.wanted.container_name,
                private_port=f.wanted.private_port,
                open_connections=f.open_connections,
            )
            for f in self._forwards.values()
        ]
        return PortsSnapshot(
            forwards=sorted(forwards, key=lambda f: (f.port, f.proto, f.host_ip)),
            conflicts=sorted(self._conflicts.values(), key=lambda c: (c.port, c.proto, c.host_ip)),
            open_connections=self.open_connections,
            following=self._following,
            last_error=self._last_error,
        )

    # ---- reconciling ------------------------------------------------------------------------

    async def sync(self) -> None:
        """List the engine's published ports and make the laptop listeners match them."""
        async with self._sync_lock:
            containers = await within(self._engine_get_json("/containers/json"), ENGINE_TIMEOUT_S)
            await self._apply(wanted_ports(containers))
            for forward in self._forwards.values():
                forward.sweep()

    async def _apply(self, wanted: dict[ListenKey, WantedPort]) -> None:
        changed = False
        for key in [k for k in self._forwards if k not in wanted]:
            forward = self._forwards.pop(key)
            forward.close()
            log.info(
                "port %s/%s of %s: forward removed", key[2], key[0], forward.wanted.container_name
            )
            changed = True
        for key in [k for k in self._conflicts if k not in wanted]:
            del self._conflicts[key]
            changed = True
        for key, item in wanted.items():
            if key in self._forwards:
                self._forwards[key].wanted = item  # e.g. compose re-created it on the same port
            else:
                changed |= await self._listen(item)
        if changed:
            self._notify()

    async def _listen(self, item: WantedPort) -> bool:
        try:
            sock = bind_socket(item.proto, item.host_ip, item.port)
        except _Unsupported:
            return False
        except OSError as exc:
            return self._conflict(item, _bind_failure(exc, item.port))
        forward = _Forward(self, item)
        try:
            await forward.start(sock)
        except OSError as exc:
            sock.close()
            return self._conflict(item, _bind_failure(exc, item.port))
        self._forwards[item.key] = forward
        self._conflicts.pop(item.key, None)
        log.info(
            "port %s:%s/%s forwarded to container %s (%s)",
            item.host_ip, item.port, item.proto, item.container_name, item.private_port,
        )  # fmt: skip
        return True

    def _conflict(self, item: WantedPort, reason: str) -> bool:
        known = self._conflicts.get(item.key)
        conflict = PortConflict(
            proto=item.proto,
            host_ip=item.host_ip,
            port=item.port,
            container_id=item.container_id,
            container_name=item.container_name,
            reason=reason,
        )
        self._conflicts[item.key] = conflict
        if known == conflict:
            return False
        log.warning(
            "port %s:%s/%s wanted by container %s is not forwarded: %s. Free the port on this "
            "machine (it is retried at every change) or publish another one.",
            item.host_ip, item.port, item.proto, item.container_name, reason,
        )  # fmt: skip
        return True

    async def _reconcile_loop(self) -> None:
        """Re-list when the follower marks a change, and every `resync_interval_s` anyway (retries
        conflicts, sweeps idle UDP relays, and catches anything an event stream could miss)."""
        while True:
            await wait_event(self._dirty, self.resync_interval_s)
            self._dirty.clear()
            try:
                await self.sync()
            except Exception as exc:
                self._set_error(exc)

    # ---- following the engine ---------------------------------------------------------------

    async def _follow(self) -> None:
        delay = self.retry_initial_s
        while True:
            try:
                async for event in self._engine_stream(EVENTS_PATH):
                    if not self._following:
                        # Subscribed first, listed second: no change can slip in between.
                        self._following = True
                        self._last_error = None
                        delay = self.retry_initial_s
                        self._dirty.set()
                        self._notify()
                    if event is not None and event.get("Action") in EVENT_ACTIONS:
                        self._dirty.set()
                raise ConnectionError("the engine ended the event stream")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._set_error(exc)
            if self._following:
                self._following = False
                self._notify()
            self._wake.clear()
            await wait_event(self._wake, delay)
            delay = min(delay * 2, self.retry_max_s)

    def _set_error(self, exc: BaseException) -> None:
        message = _describe(exc)
        if message != self._last_error:
            log.info("following the session engine's containers: %s", message)
            self._last_error = message
            self._notify()

    # ---- a tiny HTTP/1.1 client over the engine channel ----------------------------------

    async def _engine_get_json(self, path: str) -> Any:
        return await engine_get_json(self._open_engine, path)

    async def _engine_stream(self, path: str) -> AsyncIterator[dict[str, Any] | None]:
        async for event in engine_stream(self._open_engine, path):
            yield event

    # ---- activity ----------------------------------------------------------------------------

    def _touch(self) -> None:
        self._last_activity = self._clock()
        if self.on_activity is not None:
            self.on_activity()

    def _connection_opened(self) -> None:
        self._touch()
        self._notify()

    def _connection_closed(self) -> None:
        self._touch()
        self._notify()

    def _notify(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:
                log.exception("port forwarder on_change callback failed")
