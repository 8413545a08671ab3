"""TCP channels opened ahead of need, so that a forwarded connection does not wait for one.

Opening an SSH channel is a round trip to the runner plus the hops asyncssh and both event loops
add: bench/ports.py traced it at about 0.4 ms of a forwarded request's overhead. So the agent
keeps `SPARES` channels of kind `STANDBY_CHANNEL_PATH` open. A laptop connection takes one at
once; the channel's first bytes (`STANDBY_HEADER`, the port, big-endian) travel with the
client's first request, and the runner checks and connects that published port only then, with
the same rules as for a `direct-tcpip` channel (`offload.runner.netns_connect.StandbyTcpSession`).
A refused port closes the channel, which the laptop's client sees as the connection closing.

A spare holds nothing on the runner but the channel: no socket, nothing reached in the session's
namespace, and it is not activity. A spare that closes unused (the tunnel dropped) is forgotten;
taking the last one opens the next in the background, and without a spare the caller opens a
channel the usual way.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

STANDBY_CHANNEL_PATH = "/tcp-standby"
STANDBY_HEADER = struct.Struct("!H")
SPARES = 2

# open_channel(session_factory): an SSH channel to STANDBY_CHANNEL_PATH driven by the session
# the factory makes; returns the channel once open.
OpenChannel = Callable[[Callable[[], Any]], Awaitable[Any]]


class _Spare:
    """The asyncssh session of a spare channel: nobody's until taken, then passes everything to
    the session it was given."""

    def __init__(self, pool: StandbyChannels) -> None:
        self._pool = pool
        self.chan: Any = None
        self.target: Any = None
        self.closed = False

    def connection_made(self, chan: Any) -> None:
        self.chan = chan

    def session_started(self) -> None:
        pass

    def data_received(self, data: bytes, datatype: Any) -> None:
        if self.target is not None:
            self.target.data_received(data, datatype)

    def eof_received(self) -> bool:
        return bool(self.target.eof_received()) if self.target is not None else False

    def pause_writing(self) -> None:
        if self.target is not None:
            self.target.pause_writing()

    def resume_writing(self) -> None:
        if self.target is not None:
            self.target.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.target is not None:
            self.target.connection_lost(exc)
        else:
            self._pool.forget(self)


class StandbyChannels:
    def __init__(self, open_channel: OpenChannel, spares: int = SPARES) -> None:
        self._open_channel = open_channel
        self.spares = spares
        self._ready: list[_Spare] = []
        self._filling: asyncio.Task[None] | None = None
        self.taken = 0

    @property
    def ready(self) -> int:
        return len(self._ready)

    def take(self, port: int, session_factory: Callable[[], Any]) -> Any | None:
        """A channel to published `port`, driven by the session the factory makes, at once; None
        when no spare is ready (one is opened in the background for next time)."""
        spare = None
        while self._ready and spare is None:
            spare = self._ready.pop()
            if spare.closed:
                spare = None
        self.fill()
        if spare is None:
            return None
        self.taken += 1
        spare.chan.write(STANDBY_HEADER.pack(port))
        session = session_factory()
        spare.target = session
        session.connection_made(spare.chan)
        session.session_started()
        return spare.chan

    def fill(self) -> None:
        """Open spares in the background up to `spares` (no-op while that is under way)."""
        if self._filling is None or self._filling.done():
            self._filling = asyncio.get_running_loop().create_task(self._fill())

    def forget(self, spare: _Spare) -> None:
        if spare in self._ready:
            self._ready.remove(spare)

    def close(self) -> None:
        if self._filling is not None:
            self._filling.cancel()
        for spare in self._ready:
            spare.chan.close()
        self._ready.clear()

    async def _fill(self) -> None:
        while len(self._ready) < self.spares:
            spare = _Spare(self)

            def session(spare: _Spare = spare) -> _Spare:
                return spare

            try:
                await self._open_channel(session)
            except Exception as exc:  # the tunnel is down: the next take tries again
                log.debug("could not open a standby channel: %s", exc)
                return
            if not spare.closed:
                self._ready.append(spare)
