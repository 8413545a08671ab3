"""The local Docker API socket: each client connection becomes one SSH channel to the engine.

Bytes are spliced unchanged at the asyncio protocol level (no HTTP parsing, no streams, no task
per chunk), so hijacked attach/exec connections, `docker run -i` and every stream keep full
fidelity. Half-close travels both ways: the docker CLI's CloseWrite after stdin ends becomes a
channel EOF, and the engine's EOF becomes a write shutdown on the client socket. A connection
ends once both directions are done or either side goes away.

When the tunnel is down (or a channel cannot open) the client still gets an answer it can show:
the request head is read and answered with a 503 whose JSON `message` the docker CLI prints as
`Error response from daemon: Offload: …`.

One request is looked at more closely: a container create (`offload.agent.intercept`). Its bind
mounts of laptop directories are synced into the session's mount area first and its body points
them there before it goes on; a bad bind is answered with a 400, a failed sync with a 502, each
with a JSON `message`. Every other request is handed on in the same call that received it, so
the scan adds no latency; it stops at the first upgrade or hijack of a connection.

The answers to the requests the scan marks as naming bind sources (container inspect and list)
go through the `responses` hook: that one response is held whole (`offload.agent.responses`),
its runner paths shown as the laptop's, and the splice goes on raw after it.

Every chunk is also shown to the connection's `ConnectionWatch` (offload.agent.activity), which
peeks at request lines and response heads to tell what counts as activity. While the session is
idle (tunnel suspended) or has ended, a new connection is held while the `gate` wakes the session
up (resume, or a new session), then spliced as usual: the user's command just works.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import asyncssh

from offload.agent.activity import ActivityTracker
from offload.agent.bind_sources import ResponseKind
from offload.agent.intercept import CreateRequest, RequestScanner, Route
from offload.agent.networks import with_sandbox_mtu
from offload.agent.responses import ResponseRewriter
from offload.agent.tunnel import Tunnel
from offload.core.errors import InvalidInput, OffloadError

log = logging.getLogger(__name__)

# The client socket's write buffer may hold this much before the engine channel is paused.
CLIENT_WRITE_BUFFER = 4 * 1024 * 1024
# Bytes buffered from a client while its channel opens, before reading from it pauses.
PENDING_LIMIT = 4 * 1024 * 1024
# An HTTP request head larger than this is not worth reading just to refuse it.
MAX_REQUEST_HEAD = 64 * 1024
RECONNECT_HINT = "Run `docker offload start` to reconnect."
# A request that finds the tunnel reconnecting waits this long at most for that attempt's outcome.
RECONNECT_HOLD_S = 3.0


@dataclass(frozen=True)
class ActivitySnapshot:
    open_connections: int
    total_connections: int
    last_activity: float | None  # on the proxy's clock (monotonic); None: nothing yet


class Gate(Protocol):
    """Wakes the session up before a connection is spliced (the agent's SessionKeeper)."""

    def needs_wake(self) -> bool: ...

    async def wake(self) -> None:
        """Make the tunnel usable; an OffloadError is the client's answer."""


class CreateHook(Protocol):
    """Prepares a container create's body before it goes on (the agent's `CreateBinds`)."""

    async def prepare(self, body: bytes) -> bytes:
        """The body to send instead; an OffloadError is the client's answer (InvalidInput: 400,
        anything else: 502)."""


class ResponseHook(Protocol):
    """Shows the engine's answers that name bind sources as a local engine's (the agent's
    `BindSources`)."""

    def restore(self, kind: ResponseKind, body: bytes) -> bytes:
        """The body to hand on instead (`body` itself when nothing changes)."""


class AgentProxy:
    def __init__(
        self,
        socket_path: Path,
        tunnel: Tunnel,
        *,
        clock: Callable[[], float] = time.monotonic,
        tracker: ActivityTracker | None = None,
        gate: Gate | None = None,
        creates: CreateHook | None = None,
        responses: ResponseHook | None = None,
        builds: bool = False,
    ) -> None:
        self.socket_path = socket_path
        # Builds go to the organisation's builder over a channel of their own (the runner's
        # builder channel); False, or once the runner refused that channel: to the engine.
        self.builds = builds
        self.tunnel = tunnel
        self._clock = clock
        self.tracker = tracker or ActivityTracker(clock)
        self.gate = gate
        self.creates = creates
        self.responses = responses
        self._server: asyncio.AbstractServer | None = None
        self._pipes: set[_ClientPipe] = set()
        self._total = 0
        self._last_activity: float | None = None
        self._refusal: str | None = None
        self.on_change: Callable[[AgentProxy], None] | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        directory = self.socket_path.parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        # A socket file left by an agent that died is stale: nobody else may own this path.
        self.socket_path.unlink(missing_ok=True)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: _ClientPipe(self), str(self.socket_path), backlog=128
        )
        os.chmod(self.socket_path, 0o600)
        log.info("Docker API socket ready at %s", self.socket_path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for pipe in list(self._pipes):
            pipe.abort()
        self.socket_path.unlink(missing_ok=True)
        log.info("Docker API socket %s closed", self.socket_path)

    def refuse_all(self, message: str) -> None:
        """From now on, answer every request with a 503 carrying `message` (e.g. session ended)."""
        self._refusal = message
        for pipe in list(self._pipes):
            pipe.abort()

    # ---- activity -------------------------------------------------------------------------

    def activity_snapshot(self) -> ActivitySnapshot:
        return ActivitySnapshot(
            open_connections=len(self._pipes),
            total_connections=self._total,
            last_activity=self._last_activity,
        )

    def _touch(self) -> None:
        self._last_activity = self._clock()

    def _opened(self, pipe: _ClientPipe) -> None:
        self._pipes.add(pipe)
        self._total += 1
        self._touch()
        self._notify()

    def _closed(self, pipe: _ClientPipe) -> None:
        if pipe in self._pipes:
            self._pipes.discard(pipe)
            self._touch()
            self._notify()

    def _notify(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:
                log.exception("proxy on_change callback failed")

    def _unavailable_message(self, reason: str | None) -> str:
        if self._refusal is not None:
            return self._refusal
        return f"Offload: {reason or 'the tunnel to the runner is down'}. {RECONNECT_HINT}"


class _ClientPipe(asyncio.Protocol):
    """One docker client connection, spliced onto one engine channel."""

    def __init__(self, proxy: AgentProxy) -> None:
        self._proxy = proxy
        self._transport: asyncio.Transport | None = None
        self._chan: asyncssh.SSHUNIXChannel[bytes] | None = None
        self._pending = bytearray()  # client bytes that arrived before the channel opened
        self._client_eof = False
        self._engine_eof = False
        self._refusing: str | None = None  # the 503 message, once refusing
        self._watch = proxy.tracker.opened()
        # Requests are looked at only when there is something to do with them.
        self._responses = proxy.responses
        scan = proxy.creates is not None or self._responses is not None or proxy.builds
        self._scanner = RequestScanner() if scan else None
        if self._scanner is not None:
            self._scanner.routes = proxy.builds
        self._route = Route.ENGINE
        self._builder: asyncssh.SSHUNIXChannel[bytes] | None = None
        self._marked: deque[ResponseKind] = deque()  # answers to rewrite, in request order
        self._response: ResponseRewriter | None = None  # the answer being rewritten
        self._held: bytearray | None = None  # client bytes behind a create being prepared
        self._preparing: asyncio.Task[None] | None = None
        self._settled = False  # the channel is open, or will never be (refusing)
        self._settled_waiter: asyncio.Future[None] | None = None

    # ---- client socket side ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.set_write_buffer_limits(high=CLIENT_WRITE_BUFFER)
        self._transport = transport
        self._proxy._opened(self)
        proxy = self._proxy
        loop = asyncio.get_running_loop()
        if proxy._refusal is None and proxy.gate is not None and proxy.gate.needs_wake():
            loop.create_task(self._wake_then_open(proxy.gate))
            return
        if proxy._refusal is None and proxy.tunnel.reconnecting:
            proxy.tunnel.kick()  # no backoff: a request is waiting
            loop.create_task(self._hold_for_reconnect())
            return
        if proxy._refusal is not None or not proxy.tunnel.connected:
            if not proxy.tunnel.connected:
                proxy.tunnel.kick()
            self._refuse(proxy._unavailable_message(_tunnel_reason(proxy.tunnel)))
            return
        loop.create_task(self._open_channel())

    def data_received(self, data: bytes) -> None:
        self._proxy._touch()
        self._watch.client_bytes(data)
        if self._held is not None:  # behind a create being prepared: keep the order
            self._held += data
            if len(self._held) > PENDING_LIMIT and self._transport is not None:
                self._transport.pause_reading()
        elif self._scanner is not None and self._refusing is None:
            self._scan(data)
        else:
            self._to_engine(data)

    def _to_engine(self, data: bytes) -> None:
        if self._route is Route.BUILDER and self._builder is not None:
            self._builder.write(data)
            return
        if self._chan is not None:
            self._chan.write(data)
            return
        self._pending += data
        if self._refusing is not None:
            self._answer_if_head_complete()
        elif len(self._pending) > PENDING_LIMIT and self._transport is not None:
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._client_eof = True
        if self._held is not None:
            return True  # the EOF goes on after the create and what followed it
        if self._refusing is not None:
            self._send_refusal()
            return True
        if self._builder is not None:
            self._builder.write_eof()
        if self._chan is not None:
            self._chan.write_eof()
            if self._engine_eof:
                return False  # both directions done: close
        return True

    def pause_writing(self) -> None:
        for chan in (self._chan, self._builder):
            if chan is not None:
                chan.pause_reading()  # the client reads slowly: stop taking engine data

    def resume_writing(self) -> None:
        for chan in (self._chan, self._builder):
            if chan is not None:
                chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._preparing is not None:
            self._preparing.cancel()
        for chan in (self._chan, self._builder):
            if chan is not None:
                chan.close()
        self._chan = self._builder = None
        self._watch.closed()
        self._proxy._closed(self)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # ---- engine channel side --------------------------------------------------------------

    async def _wake_then_open(self, gate: Gate) -> None:
        """Hold the request (its bytes wait in `_pending`) while the session wakes up."""
        try:
            await gate.wake()
        except OffloadError as exc:
            fix = f" {exc.fix}" if exc.fix else ""
            self._refuse(f"Offload: {exc.message.rstrip('.')}.{fix}")
            return
        if self._transport is None:
            return  # the client gave up meanwhile
        if self._proxy._refusal is not None:
            self._refuse(self._proxy._refusal)
            return
        await self._open_channel()

    async def _hold_for_reconnect(self) -> None:
        """The connection dropped a moment ago and the tunnel is trying again: hold the request
        (its bytes wait in `_pending`) for that attempt's outcome, at most `RECONNECT_HOLD_S`,
        rather than refuse what may work a few milliseconds later. An attempt that learns the
        session ended (wiped after its grace period) lets the gate start a new one, as for any
        request after that."""
        proxy = self._proxy
        await proxy.tunnel.next_change(RECONNECT_HOLD_S)
        if self._transport is None:
            return  # the client gave up meanwhile
        if proxy._refusal is None and proxy.gate is not None and proxy.gate.needs_wake():
            await self._wake_then_open(proxy.gate)
        elif proxy._refusal is not None or not proxy.tunnel.connected:
            self._refuse(proxy._unavailable_message(_tunnel_reason(proxy.tunnel)))
        else:
            await self._open_channel()

    async def _open_channel(self) -> None:
        try:
            chan = await self._proxy.tunnel.open_engine_session(lambda: _EngineSide(self))
        except OffloadError as exc:
            self._refuse(self._proxy._unavailable_message(exc.message))
            return
        if self._transport is None:  # the client left while the channel was opening
            chan.close()
            return
        self._chan = chan
        self._settle()
        if self._pending:
            chan.write(bytes(self._pending))
            self._pending.clear()
            self._transport.resume_reading()
        if self._client_eof and self._held is None:
            chan.write_eof()

    # ---- container creates ----------------------------------------------------------------

    def _scan(self, data: bytes) -> None:
        assert self._scanner is not None
        scan = self._scanner.feed(data)
        if self._scanner.raw:
            self._scanner = None  # upgraded or hijacked: a raw stream from here on
        if scan.responses and self._responses is not None:
            self._marked.extend(scan.responses)
        if scan.forward:
            self._to_engine(scan.forward)
        if scan.create is not None:
            self._held = bytearray(scan.rest)
            self._preparing = asyncio.get_running_loop().create_task(self._prepare(scan.create))
        elif scan.switch is not None:
            self._held = bytearray(scan.rest)
            self._preparing = asyncio.get_running_loop().create_task(self._switch(scan.switch))

    async def _switch(self, route: Route) -> None:
        """The next request goes to `route`: open the builder channel first if it is needed."""
        await self._until_settled()
        if route is Route.BUILDER and self._builder is None and self._refusing is None:
            try:
                self._builder = await self._proxy.tunnel.open_builder_session(
                    lambda: _EngineSide(self, builder=True)
                )
            except OffloadError as exc:
                # A runner without builders: builds run on the session's engine, as before.
                log.info("builds go to the session's engine: %s", exc.message)
                self._proxy.builds = False
                route = Route.ENGINE
                if self._scanner is not None:
                    self._scanner.routes, self._scanner.route = False, Route.ENGINE
        self._preparing = None
        if self._transport is None:
            if self._builder is not None:
                self._builder.close()
            return
        self._route = route
        self._release_held()
        if self._client_eof and self._held is None:
            self.eof_received()

    async def _prepare(self, create: CreateRequest) -> None:
        """Sync the create's laptop binds and send it rewritten; then what came after it."""
        hook = self._proxy.creates
        assert hook is not None
        try:
            await self._until_settled()  # the session is awake and its engine channel open
            if self._refusing is not None:
                body = create.body
            elif create.network:
                body = with_sandbox_mtu(create.body)
            else:
                body = await hook.prepare(create.body)
        except OffloadError as exc:
            status = 400 if isinstance(exc, InvalidInput) else 502
            fix = f" {exc.fix}" if exc.fix else ""
            self._answer_error(status, f"Offload: {exc.message.rstrip('.')}.{fix}")
            return
        except Exception:  # a bug must not leave the docker client waiting forever
            log.exception("preparing a container create failed")
            self._answer_error(502, "Offload: the agent could not prepare this container.")
            return
        self._preparing = None
        if self._transport is None:
            return
        self._to_engine(create.encode(body))
        self._release_held()
        if self._client_eof and self._held is None and self._chan is not None:
            self._chan.write_eof()

    def _release_held(self) -> None:
        """What the client sent while a create was prepared or a channel switched goes on."""
        assert self._transport is not None
        held, self._held = self._held, None
        self._transport.resume_reading()
        if held:
            self._feed(bytes(held))

    def _feed(self, data: bytes) -> None:
        """What the client sent while its create was prepared (it may hold another create)."""
        if self._scanner is not None and self._refusing is None:
            self._scan(data)
        else:
            self._to_engine(data)

    async def _until_settled(self) -> None:
        if self._settled:
            return
        if self._settled_waiter is None:
            self._settled_waiter = asyncio.get_running_loop().create_future()
        await self._settled_waiter

    def _settle(self) -> None:
        self._settled = True
        if self._settled_waiter is not None and not self._settled_waiter.done():
            self._settled_waiter.set_result(None)

    def _answer_error(self, status: int, message: str) -> None:
        """Answer the held create ourselves (the engine never saw it) and end the connection."""
        log.info("container create refused (%d): %s", status, message)
        self._preparing = None
        if self._transport is None:
            return
        reason = "Bad Request" if status == 400 else "Bad Gateway"
        self._transport.write(_json_response(status, reason, message))
        self._transport.close()

    def engine_data(self, data: bytes) -> None:
        self._proxy._touch()
        self._watch.engine_bytes(data)
        if self._transport is None:
            return
        if self._response is None and not self._marked:
            self._transport.write(data)
        else:
            self._rewrite(data)

    def _rewrite(self, data: bytes) -> None:
        """Engine bytes while an answer to rewrite is expected or being held."""
        assert self._transport is not None
        while data:
            response = self._response
            if response is None:
                if not self._marked or self._responses is None:
                    self._transport.write(data)
                    return
                kind = self._marked.popleft()
                response = self._response = ResponseRewriter(partial(self._responses.restore, kind))
            step = response.feed(data)
            if step.out:
                self._transport.write(step.out)
            if step.raw:  # not HTTP we can follow: the rest of this connection is spliced
                self._response, self._responses = None, None
                self._marked.clear()
                return
            if not step.done:
                return
            self._response, data = None, step.rest

    def _flush_response(self) -> None:
        """The engine's side ended: whatever of an answer is held goes to the client as it is."""
        if self._response is not None:
            held = self._response.abandon()
            self._response = None
            if held and self._transport is not None:
                self._transport.write(held)

    def builder_data(self, data: bytes) -> None:
        self._proxy._touch()
        self._watch.engine_bytes(data)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def builder_closed(self) -> None:
        self._builder = None
        if self._route is Route.BUILDER and self._transport is not None:
            self._transport.close()

    def engine_eof(self, builder: bool = False) -> bool:
        """A channel ended its side. Only the channel the connection is on now speaks for it:
        the other one got the client's EOF too and answers it, while the answer that counts
        still comes."""
        if builder != (self._route is Route.BUILDER):
            return False  # the idle channel: asyncssh closes it
        self._flush_response()
        self._engine_eof = True
        if self._transport is not None and self._transport.can_write_eof():
            self._transport.write_eof()
        return not self._client_eof  # False: both directions done, asyncssh closes the channel

    def engine_closed(self) -> None:
        self._flush_response()
        self._chan = None
        if self._route is Route.BUILDER:
            return  # the connection is on the builder's channel now
        if self._transport is not None:
            self._transport.close()  # flushes what the engine sent, then closes

    def pause_client(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_client(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    # ---- refusal --------------------------------------------------------------------------

    def _refuse(self, message: str) -> None:
        log.info("refusing a Docker API request: %s", message)
        self._refusing = message
        self._settle()
        if self._transport is not None:
            self._transport.resume_reading()
        self._answer_if_head_complete()

    def _answer_if_head_complete(self) -> None:
        if b"\r\n\r\n" in self._pending or len(self._pending) >= MAX_REQUEST_HEAD:
            self._send_refusal()
        elif self._client_eof:
            self._send_refusal()

    def _send_refusal(self) -> None:
        if self._transport is None or self._refusing is None:
            return
        self._transport.write(_json_response(503, "Service Unavailable", self._refusing))
        self._transport.close()
        self._pending.clear()


class _EngineSide(asyncssh.SSHUNIXSession[bytes]):
    """The channel's half of a `_ClientPipe`: hands every event to the client side."""

    def __init__(self, pipe: _ClientPipe, builder: bool = False) -> None:
        self._pipe = pipe
        self._builder = builder  # the builder channel's half (its answers are never rewritten)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._builder:
            self._pipe.builder_data(data)
        else:
            self._pipe.engine_data(data)

    def eof_received(self) -> bool:
        return self._pipe.engine_eof(self._builder)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._builder:
            self._pipe.builder_closed()
        else:
            self._pipe.engine_closed()

    def pause_writing(self) -> None:
        self._pipe.pause_client()  # the channel's window is full: stop reading the client

    def resume_writing(self) -> None:
        self._pipe.resume_client()


def _json_response(status: int, reason: str, message: str) -> bytes:
    """A complete response whose JSON `message` the docker CLI prints as the daemon's error."""
    body = json.dumps({"message": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body


def _tunnel_reason(tunnel: Tunnel) -> str | None:
    if tunnel.failed is not None:
        return tunnel.failed.message.rstrip(".")
    if tunnel.last_error:
        return f"the tunnel to the runner is down ({tunnel.last_error})"
    return None
