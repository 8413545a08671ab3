"""What the port forwarder opens through the tunnel, as activity of the session.

`ForwardChannels` gives `offload.agent.ports.PortForwarder` its three transports over the
session's SSH connection. A forwarded TCP connection is an open stream for as long as it lasts
(`ActivityTracker.opened_stream`), a UDP relay a call; either wakes an idle session first, as a
Docker request would (the containers were paused, the tunnel suspended: the user is back). The
forwarder's own engine requests (`GET /containers/json`, `/events`) are Offload's traffic, not
the user's: they never wake the session and never count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import asyncssh

from offload.agent.activity import ActivityTracker, ConnectionWatch
from offload.agent.standby import StandbyChannels
from offload.agent.tunnel import Tunnel


class Waker(Protocol):
    """The agent's SessionKeeper, as far as forwards need it."""

    ended: Any

    def needs_wake(self) -> bool: ...

    async def wake(self) -> None: ...


class ForwardChannels:
    def __init__(self, tunnel: Tunnel, tracker: ActivityTracker, keeper: Waker) -> None:
        self.tunnel = tunnel
        self.tracker = tracker
        self.keeper = keeper
        self.standby = StandbyChannels(tunnel.open_standby_channel)

    def take_tcp(self, port: int, session_factory: Callable[[], Any]) -> Any | None:
        """A forwarded connection on a channel opened ahead (at once), or None: then `open_tcp`.
        A session that must be woken first takes the long way, which wakes it."""
        if self.keeper.ended is None and self.keeper.needs_wake():
            return None
        return self.standby.take(
            port, lambda: _CountedSession(session_factory(), self.tracker.opened_stream())
        )

    async def open_tcp(self, port: int, session_factory: Callable[[], Any]) -> Any:
        await self._awake()
        watch = self.tracker.opened_stream()
        try:
            return await self.tunnel.open_port_channel(
                port, lambda: _CountedSession(session_factory(), watch)
            )
        except BaseException:
            watch.closed()
            raise

    async def open_udp(self, port: int) -> tuple[Any, Any]:
        await self._awake()
        self.tracker.note_call()
        return await self.tunnel.open_udp_channel(port)

    async def open_engine(self) -> tuple[Any, Any]:
        return await self.tunnel.open_engine_channel()

    async def _awake(self) -> None:
        # An ended session is not replaced for a port: its forwards belong to the old one, and
        # only a Docker command starts a new session.
        if self.keeper.ended is None and self.keeper.needs_wake():
            await self.keeper.wake()


class _CountedSession:
    """The far side of a forwarded connection, counted as an open stream until it closes."""

    def __init__(self, inner: Any, watch: ConnectionWatch) -> None:
        self._inner = inner
        self._watch = watch

    def connection_made(self, chan: Any) -> None:
        self._inner.connection_made(chan)

    def session_started(self) -> None:
        self._inner.session_started()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._inner.data_received(data, datatype)

    def eof_received(self) -> bool:
        return bool(self._inner.eof_received())

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._watch.closed()
        self._inner.connection_lost(exc)
