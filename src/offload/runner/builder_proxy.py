"""The builder channel: a session's build requests, served by its organisation's builder.

The agent sends `/build`, `/build/cancel` and BuildKit's `/session` here
(`BUILDER_CHANNEL_PATH`); everything else of the session goes to its own engine. The agent is
the user's, so this side decides what passes, reading each request with h11:

- `HEAD|GET /_ping`, `GET /version` (clients ping before they build), `POST /build`,
  `POST /build/cancel`, and `POST /session` (upgraded: a raw stream from then on, BuildKit's
  session with the laptop: context, `--secret`, `--ssh`, `--output`);
- `POST /build/prune` for the organisation's owners only;
- `GET /offload/builder`: the builder's usage, answered here (`offload builder status`);
- anything else gets 403 and the connection ends: the builder is no session's engine.
  `/grpc` (buildx's gRPC API to BuildKit itself, which includes pruning) is refused too.

A `POST /build` ends with the built image in the session's engine: the builder's answer (a
stream of JSON messages) is passed on line by line as it comes, the image id is read from its
`aux` messages (an error about a full disk gets the fix added), and before the answer's last chunk the image is moved (`image_transfer.move_image`,
tagged as `t=` asked), with one more message saying what moved, or an error message the docker
CLI prints. So `docker build -t app . && docker run app` works at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11

from offload.core.errors import OffloadError

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024
READ = 256 * 1024
_VERSIONED = r"(?:/v[0-9][0-9.]*)?"
_PING = re.compile(_VERSIONED + r"/_ping")
_VERSION = re.compile(_VERSIONED + r"/version")
_BUILD = re.compile(_VERSIONED + r"/build")
_CANCEL = re.compile(_VERSIONED + r"/build/cancel")
_PRUNE = re.compile(_VERSIONED + r"/build/prune")
_SESSION = re.compile(_VERSIONED + r"/session")
STATUS_PATH = "/offload/builder"


async def _nothing() -> None:
    return None


@dataclass(frozen=True)
class BuildRoute:
    """Where one session's builds go, and what it may do there."""

    org: str
    builder_socket: Path  # the organisation's builder (or the session's engine: no builder)
    session_socket: Path
    is_owner: bool
    work_dir: Path  # where image transfers stage their archives
    move: Callable[[str, list[str]], Awaitable[str]] | None  # image id, tags -> what moved
    status: Callable[[], Awaitable[dict[str, Any]]]
    release: Callable[[], None] = lambda: None  # the channel ended
    disk_full: Callable[[], bool] = lambda: False  # the builder's disk (`disk_nearly_full`)
    # Before a build: the builder gets the session's images a FROM may name.
    prepare: Callable[[], Awaitable[None]] | None = None
    # An owner's prune: remove the runner's kept archives of the builder's images.
    prune_exports: Callable[[], Awaitable[None]] = _nothing


Reader = Any  # asyncio's StreamReader, or asyncssh's SSHReader (the same read())
Writer = Any  # asyncio's StreamWriter, or asyncssh's SSHWriter


class BuilderConnection:
    """One builder channel: requests from the agent, relayed to the builder."""

    def __init__(self, route: BuildRoute, reader: Reader, writer: Writer) -> None:
        self.route = route
        self.reader = reader
        self.writer = writer
        self.buffer = b""
        self._buildkit = False  # the build being relayed is BuildKit's (`version=2`)
        self._quiet = False

    async def serve(self) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(
                str(self.route.builder_socket), limit=READ
            )
        except OSError as exc:
            self.route.release()
            log.warning("builder of %s not answering: %s", self.route.org, exc)
            await self._answer(502, "Offload: the organisation's builder is not answering. "
                                    "Try again in a moment.")  # fmt: skip
            return
        try:
            while await self._one_request(up_reader, up_writer):
                pass
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError) as exc:
            log.info("builder channel of %s ended: %s", self.route.org, exc)
        finally:
            up_writer.close()
            self.writer.close()
            self.route.release()

    # ---- one request ------------------------------------------------------------------------

    async def _one_request(
        self, up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter
    ) -> bool:
        server = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        request = await self._next_request(server)
        if request is None:
            return False
        path = urlsplit(request.target.decode("latin-1")).path
        method = request.method.decode()
        if _PING.fullmatch(path) or _VERSION.fullmatch(path) and method == "GET":
            pass
        elif method == "GET" and path == STATUS_PATH:
            await self._answer(200, None, await self.route.status())
            return await self._drain_body(server)
        elif method == "POST" and _PRUNE.fullmatch(path) and not self.route.is_owner:
            await self._answer(403, f"Offload: only an owner of {self.route.org} can prune its "
                                    "build cache. Ask one of them (`offload org show`).")  # fmt: skip
            return False
        elif method == "POST" and _SESSION.fullmatch(path):
            await self._session(request, server.trailing_data[0], up_reader, up_writer)
            return False
        elif method != "POST" or not (
            _BUILD.fullmatch(path) or _CANCEL.fullmatch(path) or _PRUNE.fullmatch(path)
        ):
            await self._answer(403, f"Offload: only build requests go to the organisation's "
                                    f"builder, not {method} {path}.")  # fmt: skip
            return False
        if _BUILD.fullmatch(path) and self.route.prepare is not None:
            try:
                await self.route.prepare()
            except OffloadError as exc:
                log.warning("builds of %s: session images not all on the builder: %s",
                            self.route.org, exc)  # fmt: skip
        if _PRUNE.fullmatch(path):  # an owner frees the builder's disk: the kept archives too
            await self.route.prune_exports()
        client = h11.Connection(h11.CLIENT)
        up_writer.write(client.send(request) or b"")
        await self._relay_body(server, client, up_writer)
        is_build = _BUILD.fullmatch(path) is not None
        query = parse_qs(urlsplit(request.target.decode("latin-1")).query)
        tags = query.get("t", []) if is_build else []
        wants_image = is_build and not _has_outputs(query)
        self._buildkit = query.get("version") == ["2"]
        # `docker build -q` prints what the stream says: only the image id, for scripts.
        self._quiet = query.get("q", ["0"])[-1].lower() in ("1", "true")
        return await self._relay_response(client, up_reader, request.method, wants_image, tags)

    async def _session(
        self,
        request: h11.Request,
        after: bytes,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        """BuildKit's session: raw bytes both ways, but only once the builder has switched
        protocols. Until its `101` the client's further bytes stay here: were dockerd to refuse
        the upgrade and keep the connection, they would reach it as requests of their own."""
        up_writer.write(_encode_head(request))
        try:
            head = await up_reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        self.writer.write(head)
        if head.split(b" ", 2)[1:2] != [b"101"]:
            length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
            if length is not None:  # the refusal's body, then the connection ends
                with contextlib.suppress(asyncio.IncompleteReadError):
                    self.writer.write(await up_reader.readexactly(int(length.group(1))))
            await _drain(self.writer)
            return
        up_writer.write(after)
        await _splice(self.reader, self.writer, up_reader, up_writer)

    async def _next_request(self, server: h11.Connection) -> h11.Request | None:
        while True:
            if self.buffer:
                server.receive_data(self.buffer)
                self.buffer = b""
            event = server.next_event()
            if isinstance(event, h11.Request):
                return event
            if event is h11.NEED_DATA:
                data = await self.reader.read(READ)
                if not data:
                    return None
                server.receive_data(data)
                continue
            return None  # a closed or broken connection

    async def _relay_body(
        self, server: h11.Connection, client: h11.Connection, up_writer: asyncio.StreamWriter
    ) -> None:
        while True:
            event = server.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(READ)
                if not data:
                    raise ConnectionError("the client left in the middle of a request")
                server.receive_data(data)
                continue
            if isinstance(event, h11.Data):
                up_writer.write(client.send(event) or b"")
                await up_writer.drain()
            elif isinstance(event, h11.EndOfMessage):
                up_writer.write(client.send(event) or b"")
                self.buffer = server.trailing_data[0]
                return

    async def _drain_body(self, server: h11.Connection) -> bool:
        while True:
            event = server.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(READ)
                if not data:
                    return False
                server.receive_data(data)
            elif isinstance(event, h11.EndOfMessage):
                self.buffer = server.trailing_data[0]
                return True
            elif not isinstance(event, h11.Data):
                return False

    async def _relay_response(
        self,
        client: h11.Connection,
        up_reader: asyncio.StreamReader,
        method: bytes,
        wants_image: bool,
        tags: list[str],
    ) -> bool:
        # `out` encodes the answer to the agent; it is given a stand-in of the request (same
        # method: a HEAD's answer has no body) so that h11 lets it send a response.
        out = h11.Connection(h11.SERVER)
        out.receive_data(method + b" / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        out.next_event(), out.next_event()
        stream = BuildStream(self.route.disk_full)
        ok = False
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                data = await up_reader.read(READ)
                if not data:
                    raise ConnectionError("the builder closed the connection")
                client.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse | h11.Response):
                self.writer.write(out.send(_as_response(event, wants_image)) or b"")
                if isinstance(event, h11.InformationalResponse):
                    continue
                ok = event.status_code < 300
            elif isinstance(event, h11.Data):
                data = stream.feed(event.data) if wants_image else event.data
                if data:
                    self.writer.write(out.send(h11.Data(data=data)) or b"")
            elif isinstance(event, h11.EndOfMessage):
                if rest := stream.flush():
                    self.writer.write(out.send(h11.Data(data=rest)) or b"")
                if wants_image and ok and stream.id:
                    message = await self._moved(stream.id, tags)
                    if message:
                        self.writer.write(out.send(h11.Data(data=message)) or b"")
                self.writer.write(out.send(event) or b"")
                return out.our_state is h11.DONE and client.our_state is h11.DONE
            await _drain(self.writer)

    async def _moved(self, image_id: str, tags: list[str]) -> bytes:
        if self.route.move is None:
            return b""
        started = time.time()
        try:
            said = await self.route.move(image_id, tags)
            if self._buildkit:  # BuildKit's CLI shows progress steps, not `stream` text
                trace = buildkit_step(said, started, time.time())
                return json.dumps({"id": "moby.buildkit.trace", "aux": trace}).encode() + b"\r\n"
            if self._quiet:
                return b""
            return json.dumps({"stream": said + "\n"}).encode() + b"\r\n"
        except OffloadError as exc:
            log.error("moving image %s of %s failed: %s", image_id, self.route.org, exc)
            text = f"Offload: the image was built but not moved into your session: {exc}"
            return json.dumps({"errorDetail": {"message": text}, "error": text}).encode() + b"\r\n"

    async def _answer(self, status: int, message: str | None, body: object = None) -> None:
        payload = json.dumps(body if message is None else {"message": message}).encode()
        reason = {200: "OK", 403: "Forbidden", 502: "Bad Gateway"}.get(status, "Error")
        self.writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await _drain(self.writer)


_QUIET_ID = re.compile(r"sha256:[0-9a-f]{64}\n?")
DISK_FULL = "no space left on device"
DISK_FULL_FIX = (
    "Offload: the organisation's build cache filled its builder's disk. The builder still "
    "works: an owner frees the cache with `offload builder prune` (or lowers its limit with "
    "`offload org settings --builder-cache-limit`), then build again."
)


def disk_nearly_full(path: Path) -> bool:
    """The builder's disk has under 5% (or 64 MiB) free: a build that failed there most likely
    failed for space, whatever its own error says (a RUN step's tool writes its own message)."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return False
    return usage.free < max(64 * 1024**2, usage.total // 20)


class BuildStream:
    """A build's answer (JSON messages, one a line) on its way to the client: finds the built
    image's id (legacy and BuildKit both send `{"aux": {"ID": "sha256:…"}}`, BuildKit's with
    `"id": "moby.image.id"`; a quiet legacy build (`-q`) sends only `{"stream": "sha256:…\n"}`),
    and says what to do in an error about a full disk (the client stops at the first error, so
    the advice goes into that error's own text).  Whole lines are passed on as they come."""

    def __init__(self, disk_full: Callable[[], bool] = lambda: False) -> None:
        self.id: str | None = None
        self._partial = b""
        self._disk_full = disk_full

    def feed(self, data: bytes) -> bytes:
        """What to send on now: the complete lines of what came so far."""
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        return b"".join(self._line(line) + b"\n" for line in lines)

    def flush(self) -> bytes:
        rest, self._partial = self._partial, b""
        return self._line(rest) if rest else b""

    def _line(self, line: bytes) -> bytes:
        try:
            message = json.loads(line)
        except ValueError:
            return line
        if not isinstance(message, dict):
            return line
        aux, stream, error = message.get("aux"), message.get("stream"), message.get("error")
        if isinstance(aux, dict) and str(aux.get("ID", "")).startswith("sha256:"):
            self.id = str(aux["ID"])
        elif isinstance(stream, str) and _QUIET_ID.fullmatch(stream):
            self.id = stream.strip()
        elif isinstance(error, str) and (DISK_FULL in error.lower() or self._disk_full()):
            log.warning("a build failed on a full builder disk: %s", error[:200])
            message["error"] = f"{error}\n{DISK_FULL_FIX}"
            detail = message.get("errorDetail")
            if isinstance(detail, dict):
                detail["message"] = message["error"]
            ending = b"\r" if line.endswith(b"\r") else b""
            return json.dumps(message).encode() + ending
        return line


def _as_response(
    event: h11.Response | h11.InformationalResponse, chunked: bool
) -> h11.Response | h11.InformationalResponse:
    """The builder's answer head as it is; a build's is sent chunked, as dockerd sends it, so
    that one more message can follow the builder's last."""
    if not chunked or isinstance(event, h11.InformationalResponse):
        return event
    headers = [(n, v) for n, v in event.headers.raw_items() if n.lower() != b"content-length"]
    if not any(n.lower() == b"transfer-encoding" for n, _ in headers):
        headers.append((b"Transfer-Encoding", b"chunked"))
    return h11.Response(status_code=event.status_code, headers=headers, reason=event.reason)


def buildkit_step(name: str, started: float, completed: float) -> str:
    """A BuildKit progress message (`moby.buildkit.trace`: a base64 `StatusResponse` protobuf of
    buildkit's control API) with one finished step called `name`, which the docker CLI shows
    like its own steps (`#9 Offload: moved … DONE 0.3s`)."""
    digest = "sha256:" + hashlib.sha256(f"{name}{started}".encode()).hexdigest()
    vertex = (
        _field(1, digest.encode()) + _field(3, name.encode())
        + _field(5, _timestamp(started)) + _field(6, _timestamp(completed))
    )  # fmt: skip
    return base64.b64encode(_field(1, vertex)).decode()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _timestamp(moment: float) -> bytes:
    """google.protobuf.Timestamp: seconds (1) and nanos (2), both varints (wire type 0)."""
    seconds, nanos = int(moment), int((moment % 1) * 1e9)
    return _varint(1 << 3) + _varint(seconds) + _varint(2 << 3) + _varint(nanos)


def _has_outputs(query: dict[str, list[str]]) -> bool:
    """`--output type=local|tar`: the result goes to the laptop, not into an engine."""
    values = query.get("outputs", [])
    try:
        return any(json.loads(v) for v in values)
    except ValueError:
        return False


def _encode_head(request: h11.Request) -> bytes:
    lines = [b"%s %s HTTP/%s" % (request.method, request.target, request.http_version)]
    lines += [name + b": " + value for name, value in request.headers.raw_items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _drain(writer: Writer) -> None:
    drain = getattr(writer, "drain", None)
    if drain is not None:
        await drain()


async def _splice(
    reader: Reader, writer: Writer, up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter
) -> None:
    """Both directions as raw bytes until each side has ended (an upgraded connection)."""

    async def pump(source: Any, sink: Any) -> None:
        while data := await source.read(READ):
            sink.write(data)
            await _drain(sink)
        if hasattr(sink, "write_eof") and (getattr(sink, "can_write_eof", lambda: True)()):
            sink.write_eof()

    await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer), return_exceptions=True)
