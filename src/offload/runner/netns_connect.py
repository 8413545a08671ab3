"""Sockets inside an environment's network namespace, for published-port forwards.

A socket belongs to the network namespace it was *created* in, for its whole life, whichever
thread later uses it. So only `socket()` has to run inside the namespace: the calling thread
enters the environment's namespace with setns(2), creates the socket and switches straight back,
a few microseconds in all. (A dedicated worker thread did this before; with asyncio's connect
wait, a traced forward spent about 0.35 ms between asking for the socket and having it
connected on a busy 2-core host. That is gone now, though the p50 of bench/ports.py moved by
only ~0.03 ms: on that host other work fills the freed time.)
Should the switch back ever fail (setns needs CAP_SYS_ADMIN and memory, nothing else), the
process stops at once: a runner thread left in a tenant's namespace must not make one more
socket. Connecting, reading and writing then happen on the event loop like any other socket.

Published ports are reached at 127.0.0.1 inside the namespace. Checked with dockerd 20.10: with
the userland proxy (the default) `docker-proxy` listens on the published host IP there (0.0.0.0
and :: for a plain `-p`, 127.0.0.1 for `-p 127.0.0.1:…`) and docker's DNAT rules leave loopback
alone; with `--userland-proxy=false` docker DNATs loopback itself (route_localnet). Both answer
on 127.0.0.1:PORT.

TCP: `forward_tcp_in_netns` returns an asyncssh forwarder that splices an SSH channel onto the
socket at protocol level (no task, no stream per chunk), which is what the SSH endpoint's
`connection_requested` hands to asyncssh; `StandbyTcpSession` does the same for a channel the
agent opened ahead of need, once its first bytes name the port. `open_connection_in_netns` gives
asyncio streams for everything else (tests, the benchmark's direct peer).

UDP: SSH has no datagram channel, so a UDP forward is a stream channel carrying length-prefixed
datagrams (`offload.agent.udp_relay` holds that wire format). `udp_channel_session` relays such an
SSH channel to a UDP socket in the namespace (one socket per channel, i.e. per laptop client);
`relay_udp_channel` does the same over plain streams.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import select
import socket
from collections.abc import Awaitable, Callable
from typing import Any, cast

import asyncssh

from offload.agent.standby import STANDBY_HEADER
from offload.agent.udp_relay import DatagramDecoder, frame_datagram
from offload.core.errors import NotFound, Unreachable
from offload.core.waiting import within
from offload.runner.netns import netns_path

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
# Where published ports listen inside the namespace (see the module docstring).
NETNS_LOOPBACK = "127.0.0.1"
CONNECT_TIMEOUT_S = 10.0
# Bytes of replies queued towards the laptop before further ones are dropped.
UDP_MAX_BACKLOG = 1024 * 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns(CLONE_NEWNET) failed: {os.strerror(errno)}")


def socket_in_netns(
    netns: str, kind: int = socket.SOCK_STREAM, family: int = socket.AF_INET
) -> socket.socket:
    """A new non-blocking, unconnected socket that lives in network namespace `netns`."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(
                f"Network namespace {netns} does not exist.",
                "The session's environment is gone: start a new session with `offload start`.",
            ) from None
        try:
            _setns(target)
            try:
                sock = socket.socket(family, kind)
            finally:
                _return_home(home)
        finally:
            os.close(target)
    finally:
        os.close(home)
    sock.setblocking(False)
    return sock


def _return_home(home: int) -> None:
    try:
        _setns(home)
    except OSError:
        log.critical("could not leave a session's network namespace: stopping the runner now")
        os.abort()


async def connect_in_netns(
    netns: str, host: str, port: int, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    """A socket in `netns` connected to host:port there (TCP handshake done, or UDP peer set)."""
    sock = socket_in_netns(netns, kind)
    try:
        if kind == socket.SOCK_DGRAM:
            sock.connect((host, port))  # sets the peer only: never blocks
        else:
            await _connect(sock, (host, port))
    except (OSError, TimeoutError) as exc:
        sock.close()
        raise Unreachable(
            f"Nothing answers on {host}:{port} in the session's network namespace "
            f"({exc.__class__.__name__}).",
            "Check that the container publishing this port is running and listening.",
        ) from None
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect(sock: socket.socket, address: tuple[str, int]) -> None:
    # A non-blocking connect says EINPROGRESS even on loopback, where the kernel has finished
    # the handshake by the time it returns: look (poll, no wait) before involving the event loop
    # and a timeout task, which costs a tenth of a millisecond or more on every forward.
    try:
        sock.connect(address)
        return
    except BlockingIOError:
        pass
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    if poller.poll(0):
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
        return
    loop = asyncio.get_running_loop()
    await within(loop.sock_connect(sock, address), CONNECT_TIMEOUT_S)


async def open_connection_in_netns(
    netns: str, host: str, port: int, **kwargs: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams of a TCP connection to host:port inside `netns`."""
    sock = await connect_in_netns(netns, host, port)
    return await asyncio.open_connection(sock=sock, **kwargs)


async def open_datagram_in_netns(
    netns: str, host: str, port: int, protocol_factory: Any
) -> tuple[asyncio.DatagramTransport, asyncio.DatagramProtocol]:
    """A UDP endpoint in `netns` whose peer is host:port there."""
    sock = await connect_in_netns(netns, host, port, socket.SOCK_DGRAM)
    loop = asyncio.get_running_loop()
    return await loop.create_datagram_endpoint(protocol_factory, sock=sock)  # type: ignore[return-value]


async def forward_tcp_in_netns(
    netns: str, port: int, host: str = NETNS_LOOPBACK
) -> asyncssh.SSHTCPSession[bytes]:
    """An asyncssh session splicing an SSH channel onto host:port inside `netns`.

    Return it (it is an `SSHTCPSession`) from `SSHServer.connection_requested` through a
    coroutine; a failure becomes a channel-open failure the client sees.
    """
    try:
        sock = await connect_in_netns(netns, host, port)
    except (NotFound, Unreachable) as exc:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, exc.message) from None
    return await splice_socket(sock)  # type: ignore[return-value]  # an SSHTCPSession at run time


class _ChannelSide(asyncssh.SSHForwarder):
    """The channel's half of a splice. The socket's half reads nothing until this one has its
    channel: a greeting from a server that speaks first (SSH, SMTP, databases) read before that
    would be dropped by a forwarder with nowhere to write yet (asyncssh's `SSHForwarder.write`
    without a transport). Whether that can happen depends on callback order; now it cannot."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if self._peer is not None:
            self._peer.resume_reading()


async def splice_socket(sock: socket.socket) -> asyncssh.SSHForwarder:
    """The channel-side session of a protocol-level splice onto connected `sock`."""
    transport, peer = await asyncio.get_running_loop().create_connection(
        asyncssh.SSHForwarder, sock=sock
    )
    transport.pause_reading()
    return _ChannelSide(peer)


class StandbyTcpSession(asyncssh.SSHUNIXSession[bytes]):
    """The runner's side of a standby channel (`offload.agent.standby`).

    The channel was opened before the laptop had a connection for it. Its first bytes name the
    published port; only then does `connect(port)` check and connect it (raising
    `asyncssh.ChannelOpenError`, `NotFound` or `Unreachable` when it may not or cannot), and the
    channel is spliced onto the socket exactly as a `direct-tcpip` one. Bytes that came with the
    port wait meanwhile, and the channel is not read further until the splice stands. A refusal
    closes the channel, which the laptop's client sees as the connection closing.
    """

    def __init__(self, connect: Callable[[int], Awaitable[socket.socket]]) -> None:
        self._connect = connect
        self._chan: Any = None
        self._early = bytearray()
        self._early_eof = False
        self._splice: asyncssh.SSHForwarder | None = None
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, chan: Any) -> None:
        self._chan = chan

    def data_received(self, data: bytes, datatype: Any) -> None:
        if self._splice is not None:
            self._splice.data_received(data, datatype)
            return
        self._early += data
        if self._task is None and len(self._early) >= STANDBY_HEADER.size:
            self._chan.pause_reading()
            self._task = asyncio.get_running_loop().create_task(self._start())

    def eof_received(self) -> bool:
        if self._splice is not None:
            return bool(self._splice.eof_received())
        self._early_eof = True
        return True  # keep the channel open: the reply may still come

    def pause_writing(self) -> None:
        if self._splice is not None:
            self._splice.pause_writing()

    def resume_writing(self) -> None:
        if self._splice is not None:
            self._splice.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._splice is not None:
            self._splice.connection_lost(exc)
        elif self._task is not None:
            self._task.cancel()

    async def _start(self) -> None:
        (port,) = STANDBY_HEADER.unpack_from(self._early)
        try:
            splice = await splice_socket(await self._connect(port))
        except (asyncssh.ChannelOpenError, NotFound, Unreachable) as exc:
            reason = exc.reason if isinstance(exc, asyncssh.ChannelOpenError) else exc.message
            log.info("forward to port %s refused: %s", port, reason)
            self._chan.close()
            return
        except Exception:
            log.exception("forward to port %s failed", port)
            self._chan.close()
            return
        splice.connection_made(self._chan)
        self._splice = splice
        if rest := bytes(self._early[STANDBY_HEADER.size :]):
            splice.data_received(rest)
        self._early.clear()
        if self._early_eof:
            splice.eof_received()
        self._chan.resume_reading()


class UdpRelay(asyncio.DatagramProtocol):
    """A UDP socket in the namespace on one side, a framed byte stream on the other.

    `write` sends bytes towards the laptop (an SSH channel's or a stream's write); `feed` takes
    bytes from the laptop. When the laptop side falls behind by more than `max_backlog` bytes,
    datagrams from the container are dropped, as a congested network would.
    """

    def __init__(
        self,
        write: Callable[[bytes], None],
        backlog: Callable[[], int] = lambda: 0,
        max_backlog: int = UDP_MAX_BACKLOG,
    ) -> None:
        self._write = write
        self._backlog = backlog
        self._max_backlog = max_backlog
        self._decoder = DatagramDecoder()
        self._transport: asyncio.DatagramTransport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Selector datagram transports do not subclass DatagramTransport: cast, do not check.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def feed(self, data: bytes) -> None:
        for datagram in self._decoder.feed(data):
            if self._transport is not None:
                self._transport.sendto(datagram)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self._backlog() <= self._max_backlog:
            self._write(frame_datagram(data))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable while nothing listens yet: UDP carries on.
        log.debug("UDP forward: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def open_udp_relay(
    netns: str,
    port: int,
    write: Callable[[bytes], None],
    backlog: Callable[[], int] = lambda: 0,
    host: str = NETNS_LOOPBACK,
) -> UdpRelay:
    """A `UdpRelay` whose socket lives in `netns` and talks to host:port there."""
    _, relay = await open_datagram_in_netns(netns, host, port, lambda: UdpRelay(write, backlog))
    return relay  # type: ignore[return-value]


class _UdpChannelSession(asyncssh.SSHUNIXSession[bytes]):
    """The SSH channel's side of a `UdpRelay`."""

    def __init__(self) -> None:
        self._chan: Any = None
        self.relay: UdpRelay | None = None

    def write(self, data: bytes) -> None:
        if self._chan is not None:
            self._chan.write(data)

    def backlog(self) -> int:
        return int(self._chan.get_write_buffer_size()) if self._chan is not None else 0

    def connection_made(self, chan: Any) -> None:
        self._chan = chan

    def data_received(self, data: bytes, datatype: Any) -> None:
        if self.relay is not None:
            self.relay.feed(data)

    def eof_received(self) -> bool:
        return False  # the laptop side is done: close the channel

    def connection_lost(self, exc: Exception | None) -> None:
        self._chan = None
        if self.relay is not None:
            self.relay.close()


async def udp_channel_session(netns: str, port: int) -> asyncssh.SSHUNIXSession[bytes]:
    """An asyncssh session relaying framed datagrams to port in `netns`.

    Return it from `SSHServer.unix_connection_requested` (through a coroutine) for a
    `udp_channel_path(port)` channel.
    """
    session = _UdpChannelSession()
    try:
        session.relay = await open_udp_relay(netns, port, session.write, session.backlog)
    except (NotFound, Unreachable) as exc:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, exc.message) from None
    return session


async def relay_udp_channel(netns: str, port: int, reader: Any, writer: Any) -> None:
    """The same relay over (reader, writer) streams; returns when the stream ends."""
    relay = await open_udp_relay(netns, port, writer.write, writer.transport.get_write_buffer_size)
    try:
        while data := await reader.read(65536):
            relay.feed(data)
    finally:
        relay.close()
        writer.close()
