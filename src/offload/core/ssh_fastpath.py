"""A lean path for SSH channel data through asyncssh, for AES-GCM connections.

asyncssh's generic packet code copies every payload about ten times on its way out (bytearray
buffer, `String`, three concatenations, padding, slicing the cipher's output, joining the MAC)
and about eight on its way in, and sends an SSH_MSG_IGNORE before every packet (a countermeasure
against CBC-mode attacks that AEAD ciphers do not need). For published-port forwards, docker
build contexts and file sync, that is where the tunnel's CPU goes: measured with bench/ports.py,
it held the forward to a third of OpenSSH's throughput.

`install()` replaces four methods with versions that take a short path for the packets that
carry bulk data and hand everything else to asyncssh's own code unchanged:

- sending: on a connection whose keys are exchanged, whose user is authenticated and which uses
  AES-GCM without compression, a connection-layer packet is laid out in a reusable buffer once and
  encrypted with `encrypt_into` next to its clear length, then written as one buffer. That
  output buffer is reused only while the transport holds none of it: Python 3.12+ queues a
  view of what it cannot send at once instead of a copy, so a backlogged transport gets new
  buffers. Packets before that point (key exchange, authentication), a rekey that is due,
  compression, other ciphers and asyncssh's packet-level debug logging take the original path.
- receiving: a packet for an open channel is decrypted straight out of the input buffer and
  handed to the channel without re-slicing. Anything else (key exchange, global requests,
  unknown channels, errors) is left in the buffer for the original code, which decrypts it again.
- channel writes: data that fits the peer's window and packet size while nothing is queued goes
  straight to the connection instead of through the channel's bytearray queue.

The wire format is exactly the one asyncssh and OpenSSH speak (RFC 4253, RFC 5647 as OpenSSH
implements AES-GCM); tests/unit/test_ssh_fastpath.py checks both directions against the original
code and against OpenSSH. The replaced methods are private to asyncssh, so the version range is
pinned in pyproject.toml and `install()` patches nothing on a version it was not checked with.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from typing import Any

import asyncssh
from asyncssh import channel as _channel
from asyncssh import connection as _connection
from asyncssh.constants import (
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_FIRST,
    MSG_CHANNEL_LAST,
    MSG_GLOBAL_REQUEST,
    MSG_UNIMPLEMENTED,
)
from asyncssh.crypto.cipher import GCMCipher
from asyncssh.encryption import GCMEncryption
from asyncssh.logging import SSHLogger
from asyncssh.misc import MACError, ProtocolError
from asyncssh.packet import PacketDecodeError, SSHPacket
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger(__name__)

CHECKED_VERSIONS = ("2.24.",)  # the releases whose private methods this was checked against
_GCM_TAG = 16
_CHANNEL_HEADER = 9  # byte type, uint32 recipient channel, uint32 data length

_original_send_packet = _connection.SSHConnection.send_packet
_original_recv_pkthdr = _connection.SSHConnection._recv_pkthdr
_original_channel_write = _channel.SSHChannel.write
_installed = False


class Counters:
    """Packets that took the fast path in this process (tests check that it is taken)."""

    sent = 0
    received = 0


def install() -> bool:
    """Patch asyncssh once per process; False (and nothing patched) on an unchecked version."""
    global _installed
    if _installed:
        return True
    if (
        not asyncssh.__version__.startswith(CHECKED_VERSIONS)
        or not hasattr(AESGCM, "encrypt_into")  # cryptography >= 45
        or _async_channel_handlers()
    ):
        log.warning(
            "asyncssh %s is not one the SSH fast path was checked with: using its own, slower "
            "packet path", asyncssh.__version__,
        )  # fmt: skip
        return False
    _connection.SSHConnection.send_packet = _send_packet  # type: ignore[method-assign]
    _connection.SSHConnection._recv_pkthdr = _recv_pkthdr  # type: ignore[method-assign]
    _channel.SSHChannel.send_packet = _channel_send_packet  # type: ignore[method-assign]
    _channel.SSHChannel.write = _channel_write  # type: ignore[method-assign]
    _installed = True
    return True


def _async_channel_handlers() -> list[str]:
    """Channel packet handlers that are coroutines: the receive path assumes there are none."""
    found = []
    classes: list[Any] = [_channel.SSHChannel]
    while classes:
        cls = classes.pop()
        classes += cls.__subclasses__()
        for handler in cls._packet_handlers.values():
            if inspect.iscoroutinefunction(handler):
                found.append(f"{cls.__name__}.{handler.__name__}")
    return found


def _aead(cipher: GCMCipher) -> AESGCM:
    """The cipher's AESGCM object, made once (asyncssh makes one per packet)."""
    aead: AESGCM | None = cipher.__dict__.get("_offload_aead")
    if aead is None:
        aead = cipher._offload_aead = AESGCM(cipher._key)  # type: ignore[attr-defined]
    return aead


def _buffer(conn: Any, name: str, size: int) -> bytearray:
    """A reusable buffer of the connection, at least `size` bytes."""
    buffer: bytearray | None = conn.__dict__.get(name)
    if buffer is None or len(buffer) < size:
        buffer = bytearray(size)
        setattr(conn, name, buffer)
    return buffer


def _fast_send(conn: Any) -> bool:
    return (
        type(conn._send_encryption) is GCMEncryption
        and conn._kex_complete
        and conn._auth_complete
        and not conn._compressor
        and conn._rekey_bytes_sent < conn._rekey_bytes
        and not (conn._rekey_seconds and time.monotonic() >= conn._rekey_time)
        and SSHLogger._debug_level < 3
        and conn._transport is not None
    )


def _send_packet(self: Any, pkttype: int, *args: bytes, handler: Any = None) -> None:
    if pkttype < MSG_GLOBAL_REQUEST or not _fast_send(self):  # transport and auth: asyncssh's
        _original_send_packet(self, pkttype, *args, handler=handler)
        return
    payload_len = 1 + sum(map(len, args))
    padlen = -(self._send_enchdrlen + payload_len) % self._send_blocksize
    if padlen < 4:
        padlen += self._send_blocksize
    pktlen = 1 + payload_len + padlen
    size = 4 + pktlen + _GCM_TAG
    plain = _buffer(self, "_offload_plain", pktlen)
    plain[0] = padlen
    plain[1] = pkttype
    pos = 2
    for arg in args:
        end = pos + len(arg)
        plain[pos:end] = arg
        pos = end
    plain[pos : pos + padlen] = os.urandom(padlen)
    header = pktlen.to_bytes(4, "big")
    cipher = self._send_encryption._cipher
    transport = self._transport
    try:
        with memoryview(plain) as p:
            if transport.get_write_buffer_size():
                # Backlogged: the transport queues what it is given (Python 3.12+ without a
                # copy), so it gets buffers of its own.
                sealed = _aead(cipher).encrypt(cipher._iv, p[:pktlen], header)
                transport.write(header)
                transport.write(sealed)
            else:
                out = _buffer(self, "_offload_out", size)
                out[:4] = header
                with memoryview(out) as o:
                    _aead(cipher).encrypt_into(cipher._iv, p[:pktlen], header, o[4:size])
                    transport.write(o[:size])
                if transport.get_write_buffer_size():
                    self._offload_out = None  # it may hold a view of `out`: never reuse it
    except ConnectionError:  # as asyncssh's _send: the connection's loss is reported apart
        pass
    cipher._update_iv()
    self._send_seq = (self._send_seq + 1) & 0xFFFFFFFF
    self._rekey_bytes_sent += pktlen
    Counters.sent += 1


def _recv_pkthdr(self: Any) -> bool:
    encryption = self._recv_encryption
    if (
        type(encryption) is not GCMEncryption
        or not self._auth_complete
        or self._decompressor
        or SSHLogger._debug_level >= 3
    ):
        return bool(_original_recv_pkthdr(self))
    inp = self._inpbuf
    if len(inp) < 4:
        return False
    pktlen = int.from_bytes(inp[:4], "big")
    if pktlen > self._max_recv_pktlen:
        raise ProtocolError("Max packet size exceeded")
    end = 4 + pktlen + _GCM_TAG
    if len(inp) < end:
        return False
    cipher = encryption._cipher
    with memoryview(inp) as view:
        try:
            plain = _aead(cipher).decrypt(cipher._iv, view[4:end], view[:4])
        except InvalidTag:
            raise MACError("MAC verification failed") from None
    payload_end = pktlen - plain[0]
    pkttype = plain[1]
    channel = None
    if payload_end >= 6 and MSG_CHANNEL_FIRST <= pkttype <= MSG_CHANNEL_LAST:
        channel = self._channels.get(int.from_bytes(plain[2:6], "big"))
    if channel is None:
        return bool(_original_recv_pkthdr(self))
    cipher._update_iv()
    if type(inp) is not bytearray:  # deleting from a bytearray's front does not copy the rest
        inp = self._inpbuf = bytearray(inp)
    del inp[:end]
    packet = SSHPacket(plain)
    packet._idx, packet._len = 6, payload_end  # past padding length, type and channel number
    seq = self._recv_seq
    try:
        handled = channel.process_packet(pkttype, seq, packet)
    except PacketDecodeError as exc:
        raise ProtocolError(str(exc)) from None
    if not handled:
        self.send_packet(MSG_UNIMPLEMENTED, seq.to_bytes(4, "big"))
    self._finish_recv_packet(pkttype, seq)
    Counters.received += 1
    return True


def _channel_send_packet(self: Any, pkttype: int, *args: bytes) -> None:
    if self._send_chan is None:
        return
    self._conn.send_packet(pkttype, self._send_chan.to_bytes(4, "big"), *args, handler=self)


def _channel_write(self: Any, data: Any, datatype: Any = None) -> None:
    size = len(data)
    if (
        datatype is None
        and not self._encoding
        and not self._send_buf
        and self._send_state == "open"
        and 0 < size <= self._send_window
        and size <= self._send_pktsize
    ):
        self._send_window -= size
        self.send_packet(MSG_CHANNEL_DATA, size.to_bytes(4, "big"), data)
        return
    _original_channel_write(self, data, datatype)
