"""UDP published ports: datagrams over SSH stream channels, one channel per client address.

SSH channels carry byte streams only, so each datagram travels as a 2-byte big-endian length
followed by its payload (UDP payloads are at most 65,507 bytes). Both ends use the functions here:
the agent (`UdpForward`) and the runner (`offload.runner.netns_connect.relay_udp_channel`).

On the laptop a `UdpForward` listens where docker would; the first datagram from a client address
opens a channel (through the injected `open_udp(port)`) and later ones reuse it, so the container
sees one peer per laptop client and its replies go back to the right one. A client that has sent
and received nothing for `idle_timeout_s` loses its channel (UDP has no close); the next datagram
opens a new one.

Channel path convention for the SSH endpoint: `udp_channel_path(port)` (a `direct-streamlocal`
path, distinct from the engine's `/docker.sock`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65535
IDLE_TIMEOUT_S = 60.0
# Datagrams held for one client while its channel opens; beyond that they are dropped (UDP may).
PENDING_DATAGRAMS = 64
UDP_CHANNEL_PREFIX = "/udp/"
_UDP_PATH = re.compile(r"^/udp/([0-9]{1,5})$")

_LENGTH = struct.Struct("!H")

OpenStream = Callable[[int], Awaitable[tuple[Any, Any]]]


def udp_channel_path(port: int) -> str:
    """The `direct-streamlocal` path that asks the runner for a UDP relay to `port`."""
    return f"{UDP_CHANNEL_PREFIX}{port}"


def parse_udp_channel_path(path: str) -> int | None:
    """The port of a UDP relay path, or None when `path` is not one."""
    match = _UDP_PATH.match(path)
    if match is None:
        return None
    port = int(match.group(1))
    return port if 0 < port < 65536 else None


def frame_datagram(data: bytes) -> bytes:
    return _LENGTH.pack(len(data)) + data


class DatagramDecoder:
    """Incremental decoder for a framed byte stream that arrives in arbitrary pieces."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        datagrams = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                break
            datagrams.append(bytes(self._buffer[_LENGTH.size : end]))
            del self._buffer[:end]
        return datagrams


async def read_datagram(reader: Any) -> bytes | None:
    """The next datagram from a framed stream; None at its end."""
    try:
        head = await reader.readexactly(_LENGTH.size)
        (length,) = _LENGTH.unpack(head)
        return bytes(await reader.readexactly(length)) if length else b""
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


class _ClientRelay:
    """One laptop client address and its channel to the runner."""

    def __init__(self, forward: UdpForward, addr: Any) -> None:
        self.forward = forward
        self.addr = addr
        self.last_seen = forward._clock()
        self._pending: list[bytes] = []
        self._writer: Any = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    def send(self, data: bytes) -> None:
        self.forward._active()
        self.last_seen = self.forward._clock()
        if self._writer is not None:
            self._writer.write(frame_datagram(data))
        elif len(self._pending) < PENDING_DATAGRAMS:
            self._pending.append(data)

    async def _run(self) -> None:
        try:
            reader, writer = await self.forward._open_udp(self.forward.port)
        except Exception as exc:
            log.info("UDP port %s: could not open a relay: %s", self.forward.port, exc)
            self.forward._drop(self)
            return
        self._writer = writer
        try:
            for data in self._pending:
                writer.write(frame_datagram(data))
            self._pending.clear()
            while (reply := await read_datagram(reader)) is not None:
                self.forward._active()
                self.last_seen = self.forward._clock()
                self.forward._reply(reply, self.addr)
        finally:
            writer.close()
            self.forward._drop(self)

    def close(self) -> None:
        self._task.cancel()


class UdpForward(asyncio.DatagramProtocol):
    """A laptop UDP socket relaying each client's datagrams through its own channel."""

    def __init__(
        self,
        port: int,
        open_udp: OpenStream,
        *,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
        on_activity: Callable[[], None] | None = None,
    ) -> None:
        self.port = port
        self._open_udp = open_udp
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._on_change = on_change  # a relay opened or closed
        self._on_activity = on_activity  # a datagram went either way
        self._transport: asyncio.DatagramTransport | None = None
        self._clients: dict[Any, _ClientRelay] = {}

    @property
    def open_relays(self) -> int:
        return len(self._clients)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Selector datagram transports do not subclass DatagramTransport: cast, do not check.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        relay = self._clients.get(addr)
        if relay is None:
            relay = self._clients[addr] = _ClientRelay(self, addr)
            self._changed()
        relay.send(data)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP port %s: %s", self.port, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        for relay in list(self._clients.values()):
            relay.close()

    def sweep(self) -> int:
        """Close the relays idle for longer than the timeout; how many were closed."""
        now = self._clock()
        idle = [r for r in self._clients.values() if now - r.last_seen >= self.idle_timeout_s]
        for relay in idle:
            relay.close()
            self._drop(relay)
        return len(idle)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _reply(self, data: bytes, addr: Any) -> None:
        if self._transport is not None:
            self._transport.sendto(data, addr)

    def _drop(self, relay: _ClientRelay) -> None:
        if self._clients.get(relay.addr) is relay:
            del self._clients[relay.addr]
            self._changed()

    def _active(self) -> None:
        if self._on_activity is not None:
            self._on_activity()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()
