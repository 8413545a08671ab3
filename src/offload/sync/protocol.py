"""The sync wire protocol: framed messages over one byte stream (an SSH channel, a socketpair).

Frame = 4-byte big-endian payload length, 1-byte kind, payload. Control payloads are compact
JSON; file content travels raw: small files whole in one `FILE_SMALL` frame (a JSON header plus
the bytes), large ones as `FILE_BEGIN`, `FILE_DATA` chunks of `CHUNK_SIZE`, `FILE_END`, so that
neither side ever holds a large file in memory.

Conversation (L = laptop, R = runner endpoint):

    L: HELLO {v, subdir, read_only, ignore, only}      R: WELCOME {mount_area, root}
    (or L: HELLO {v, probe: true}                      R: WELCOME {mount_area}, end of stream)
                                                       R: MANIFEST [entries]..., MANIFEST_END
    both ways, at any time after that:
       MKDIR / SYMLINK / FILE_* / DELETE / META        a change, with `expect`: the entry the
                                                       sender believes the receiver has
       HASH_REQ {paths} -> HASH_REPLY {hashes}         only files with equal size and another
                                                       mtime, when the laptop reconnects
       NEED {p} (either way)                           send me all of p (a META came for
                                                       content that moved on)
       PULL (L→R)                                      send me these paths
       BARRIER {seq} -> BARRIER_ACK {seq}              everything before it has been applied
       ERROR {p, message}, CONFLICT {p, kept_at}       reports for the laptop's status

Within one direction frames are applied strictly in order, so a barrier's answer means every
change sent before it is visible on the other side.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

# The unix-socket name the runner's SSH endpoint maps to the sync endpoint of the session's
# mount area (next to `ENGINE_CHANNEL_PATH`).
SYNC_CHANNEL_PATH = "/sync"
PROTOCOL_VERSION = 1
CHUNK_SIZE = 256 * 1024
SMALL_FILE_MAX = 256 * 1024
MAX_PAYLOAD = 4 * 1024 * 1024
READ_SIZE = 1024 * 1024
# Names both sides use for their own temporary files: never synced, never reported.
TEMP_PREFIX = ".offload-tmp-"

_HEAD = struct.Struct(">IB")
_SMALL_HEAD = struct.Struct(">I")


class Kind(IntEnum):
    HELLO = 1
    WELCOME = 2
    MANIFEST = 3
    MANIFEST_END = 4
    MKDIR = 10
    SYMLINK = 11
    FILE_BEGIN = 12
    FILE_DATA = 13
    FILE_END = 14
    FILE_SMALL = 15
    DELETE = 16
    META = 17
    HASH_REQ = 18
    NEED = 19
    BARRIER = 20
    BARRIER_ACK = 21
    ERROR = 22
    CONFLICT = 23
    PULL = 24
    HASH_REPLY = 25


class ProtocolError(Exception):
    """The peer sent something this side cannot parse: the session ends."""


class ByteReader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class ByteWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Entry:
    """What one path is: `kind` "f" (file), "d" (directory) or "l" (symlink)."""

    kind: str
    size: int = 0
    mtime_ns: int = 0
    mode: int = 0  # permission bits (0o777): executable bits travel
    target: str | None = None  # symlinks only

    def same(self, other: Entry | None) -> bool:
        """Whether `other` holds the same content: directories ignore mtime, links all but target."""
        if other is None or other.kind != self.kind:
            return False
        if self.kind == "d":
            return self.mode == other.mode
        if self.kind == "l":
            return self.target == other.target
        return (self.size, self.mtime_ns, self.mode) == (other.size, other.mtime_ns, other.mode)

    def to_wire(self) -> list[Any]:
        return [self.kind, self.size, self.mtime_ns, self.mode, self.target]

    @staticmethod
    def from_wire(value: Any) -> Entry | None:
        if value is None:
            return None
        try:
            kind, size, mtime_ns, mode, target = value
        except (TypeError, ValueError):
            raise ProtocolError(f"malformed entry {value!r}") from None
        if kind not in ("f", "d", "l") or not isinstance(size, int) or not isinstance(mode, int):
            raise ProtocolError(f"malformed entry {value!r}")
        return Entry(kind, size, int(mtime_ns), mode & 0o777, target)


def same(a: Entry | None, b: Entry | None) -> bool:
    return b is None if a is None else a.same(b)


def wire(entry: Entry | None) -> list[Any] | None:
    return None if entry is None else entry.to_wire()


# ---- encoding -------------------------------------------------------------------------------


def frame(kind: Kind, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return _HEAD.pack(len(payload), kind) + payload


def jframe(kind: Kind, obj: Any) -> bytes:
    return frame(kind, json.dumps(obj, separators=(",", ":")).encode())


def small_file_frame(header: dict[str, Any], content: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return frame(Kind.FILE_SMALL, _SMALL_HEAD.pack(len(head)) + head + content)


def split_small_file(payload: bytes) -> tuple[dict[str, Any], memoryview]:
    if len(payload) < _SMALL_HEAD.size:
        raise ProtocolError("truncated FILE_SMALL frame")
    (n,) = _SMALL_HEAD.unpack_from(payload)
    view = memoryview(payload)
    return decode_json(bytes(view[4 : 4 + n])), view[4 + n :]


def decode_json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError as exc:
        raise ProtocolError(f"malformed message: {exc}") from None


# ---- decoding -------------------------------------------------------------------------------


Frame = tuple[Kind, bytes]


class FrameParser:
    """Incremental parser: feed bytes, get every complete frame."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= _HEAD.size:
            length, kind = _HEAD.unpack_from(buf, pos)
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
            end = pos + _HEAD.size + length
            if len(buf) < end:
                break
            try:
                frames.append((Kind(kind), bytes(buf[pos + _HEAD.size : end])))
            except ValueError:
                raise ProtocolError(f"unknown frame kind {kind}") from None
            pos = end
        if pos:
            del buf[:pos]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buf)


async def read_frames(reader: ByteReader) -> AsyncIterator[list[Frame]]:
    """Every frame of the stream, in batches of whatever arrived together (until EOF)."""
    parser = FrameParser()
    while True:
        data = await reader.read(READ_SIZE)
        if not data:
            if parser.buffered:
                raise ProtocolError("stream ended inside a frame")
            return
        frames = parser.feed(data)
        if frames:
            yield frames


async def read_one(reader: ByteReader, parser: FrameParser, pending: list[Frame]) -> Frame:
    """The next frame (for the handshake), keeping any frames read past it in `pending`."""
    while not pending:
        data = await reader.read(READ_SIZE)
        if not data:
            raise ProtocolError("the peer closed the stream during the handshake")
        pending.extend(parser.feed(data))
    return pending.pop(0)
