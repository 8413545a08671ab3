"""Container creates with laptop bind mounts: find them in a client's bytes, sync, rewrite.

The proxy splices bytes unchanged, except for two requests: `POST (/vX.Y)?/containers/create`,
and `POST (/vX.Y)?/networks/create` (which gets the sandbox's MTU: `offload.agent.networks`).
`RequestScanner` follows the requests of one client connection (keep-alive connections carry
several) with h11 and hands every byte on at once, except a container create, which it holds
until its body is complete. The scan stops for good at the first upgrade or hijack (attach, exec
start, BuildKit's session), after which the connection is a raw stream; a body of known length
is skipped by counting, so large uploads cost no parsing.

It also marks the requests whose answers name bind sources (`GET /containers/json`,
`GET /containers/{id}/json`: `Scan.responses`), so that the proxy shows those answers with the
laptop's paths (`offload.agent.bind_sources`, `offload.agent.responses`).

`CreateBinds.prepare` then syncs each laptop directory the body binds into the session's mount
area (the initial sync completes first, and a running sync is flushed, so the container sees the
laptop's files as they are now) and rewrites the bind sources to point there
(`offload.agent.binds`). Creates without laptop binds go on unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from enum import Enum

import h11

from offload.agent.bind_sources import BindSources, ResponseKind
from offload.agent.binds import BindSync, has_laptop_binds, rewrite_create_body
from offload.agent.networks import NETWORK_CREATE
from offload.sync.laptop import SyncManager

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024
# A create body larger than this is passed on as it is (the runner's policy refuses bodies over
# 1 MiB anyway): holding it would only cost memory.
MAX_CREATE_BODY = 4 * 1024 * 1024
SYNC_RECONNECT_TIMEOUT_S = 30.0

_VERSIONED = rb"(?:/v[0-9][0-9.]*)?"
_CREATE = re.compile(_VERSIONED + rb"/containers/create(?:\?.*)?")
# Requests after which the connection carries raw streams, not HTTP: attach, exec start,
# BuildKit's session and gRPC (with or without Upgrade headers, depending on the client).
_HIJACK = re.compile(
    _VERSIONED + rb"/(?:containers/[^/?]+/attach|exec/[^/?]+/start|session|grpc)(?:\?.*)?"
)
_DROPPED_HEADERS = (b"content-length", b"transfer-encoding")
# Requests for the organisation's builder (the builder channel): builds and BuildKit's session
# with the laptop. `/_ping` goes wherever the connection is; the rest goes to the engine.
_BUILDER = re.compile(_VERSIONED + rb"/(?:build|build/cancel|build/prune|session)(?:\?.*)?")
_PING = re.compile(_VERSIONED + rb"/_ping(?:\?.*)?")
# GET requests whose answers name bind sources.
_LIST = re.compile(_VERSIONED + rb"/containers/json(?:\?.*)?")
_INSPECT = re.compile(_VERSIONED + rb"/containers/[^/?]+/json(?:\?.*)?")


@dataclass(frozen=True)
class CreateRequest:
    """A complete container-create request, held back from the engine."""

    request: h11.Request
    body: bytes  # decoded (de-chunked)
    raw: bytes  # exactly the bytes the client sent for it

    @property
    def network(self) -> bool:
        """A network create (`offload.agent.networks`), not a container create."""
        return NETWORK_CREATE.fullmatch(self.request.target) is not None

    def encode(self, body: bytes) -> bytes:
        """The request as bytes with `body` in place of its own (Content-Length fixed)."""
        if body == self.body:
            return self.raw
        request = self.request
        lines = [b"%s %s HTTP/%s" % (request.method, request.target, request.http_version)]
        for name, value in request.headers.raw_items():
            if name.lower() not in _DROPPED_HEADERS:
                lines.append(name + b": " + value)
        lines.append(b"Content-Length: %d" % len(body))
        return b"\r\n".join(lines) + b"\r\n\r\n" + body


class Route(Enum):
    ENGINE = "engine"  # the session's engine
    BUILDER = "builder"  # the organisation's builder


@dataclass
class Scan:
    forward: bytes = b""  # send on now (comes before `create`, or before the switch)
    create: CreateRequest | None = None  # held: prepare it, send it, then feed `rest`
    rest: bytes = b""  # what followed the create (or the switch), not scanned yet
    # Requests in `forward` (in order) whose answers name bind sources.
    responses: tuple[ResponseKind, ...] = ()
    # The next request goes elsewhere: switch to this route, then feed `rest` (its head first).
    switch: Route | None = None


class _Mode(Enum):
    HEAD = "head"  # reading a request head
    LENGTH = "length"  # skipping a body of known length
    CHUNKED = "chunked"  # following a chunked body with h11
    CREATE = "create"  # holding a create until its body is complete
    RAW = "raw"  # upgraded, hijacked or not HTTP: no more scanning


_NOTHING = memoryview(b"")


class RequestScanner:
    """Finds container-create requests in one client connection's byte stream."""

    def __init__(self) -> None:
        self._mode = _Mode.HEAD
        self._head = bytearray()
        self._sent = 0  # bytes of `_head` already handed on
        self._holding: bool | None = None  # None: the request line is not complete yet
        self._switch: Route | None = None
        self._left = 0
        self._conn: h11.Connection | None = None
        self._create: h11.Request | None = None
        self._raw = bytearray()  # a held create as it came
        self._body = bytearray()  # its body, decoded
        self._marked: list[ResponseKind] = []
        self.route = Route.ENGINE  # where the requests handed on go
        self.routes = False  # True: tell build requests apart (the builder channel exists)

    @property
    def raw(self) -> bool:
        """True once nothing more will be scanned (the caller may stop feeding)."""
        return self._mode is _Mode.RAW

    def feed(self, data: bytes) -> Scan:
        out = bytearray()
        view = memoryview(data)
        while view:
            mode = self._mode
            if mode is _Mode.RAW:
                out += view
                break
            create = None
            if mode is _Mode.LENGTH:
                view = self._skip(view, out)
            elif mode is _Mode.CHUNKED:
                view = self._chunked(view, out)
            elif mode is _Mode.CREATE:
                view, create = self._create_body(view, out)
            else:
                view, create = self._head_bytes(view, out)
            if create is not None:
                return Scan(bytes(out), create, bytes(view), self._take_marks())
            if self._switch is not None:
                switch, self._switch = self._switch, None
                rest = bytes(view)
                return Scan(bytes(out), rest=rest, responses=self._take_marks(), switch=switch)
        return Scan(bytes(out), responses=self._take_marks())

    def _take_marks(self) -> tuple[ResponseKind, ...]:
        if not self._marked:
            return ()
        marked, self._marked = tuple(self._marked), []
        return marked

    # ---- request heads ----------------------------------------------------------------------

    def _head_bytes(
        self, view: memoryview, out: bytearray
    ) -> tuple[memoryview, CreateRequest | None]:
        start = len(self._head)
        self._head += view
        if self._holding is None and (eol := self._head.find(b"\r\n")) >= 0:
            line = bytes(self._head[:eol])
            route = _route_of_line(line, self.route) if self.routes else self.route
            if route is not self.route:
                # Nothing of this head was handed on: give it back whole, after the switch.
                self.route, self._switch = route, route
                held = memoryview(bytes(self._head))
                self._reset_head()
                return held, None
            self._holding = _is_create_line(line)
        end = self._head.find(b"\r\n\r\n", max(0, start - 3))
        if end < 0:
            if len(self._head) > MAX_HEAD:
                return self._give_up(out), None
            self._pass_head(out)
            return _NOTHING, None
        rest = memoryview(bytes(self._head[end + 4 :]))
        del self._head[end + 4 :]
        return self._start_request(rest, out)

    def _start_request(
        self, rest: memoryview, out: bytearray
    ) -> tuple[memoryview, CreateRequest | None]:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            conn.receive_data(bytes(self._head))
            request = conn.next_event()
        except h11.RemoteProtocolError:
            request = None
        if not isinstance(request, h11.Request):
            self._head += rest  # not a request we understand: hand everything on from here
            return self._give_up(out), None
        if self._holding and not _unusual(request):
            self._mode, self._conn, self._create = _Mode.CREATE, conn, request
            self._raw, self._body = bytearray(self._head), bytearray()
            self._reset_head()
            return self._create_body(rest, out)
        self._holding = False
        self._pass_head(out)
        self._reset_head()
        if (kind := _names_bind_sources(request)) is not None:
            self._marked.append(kind)
        self._mode = _framing(request)
        if self._mode is _Mode.CHUNKED:
            self._conn = conn
        elif self._mode is _Mode.LENGTH:
            self._left = _content_length(request)
            if self._left == 0:
                self._mode = _Mode.HEAD
        return rest, None

    def _pass_head(self, out: bytearray) -> None:
        if self._holding is False:
            out += self._head[self._sent :]
            self._sent = len(self._head)

    def _reset_head(self) -> None:
        self._head, self._sent, self._holding = bytearray(), 0, None

    def _give_up(self, out: bytearray) -> memoryview:
        """Hand on everything held and stop scanning this connection."""
        out += self._raw
        out += self._head[self._sent :]
        self._reset_head()
        self._mode, self._conn, self._create = _Mode.RAW, None, None
        self._raw, self._body = bytearray(), bytearray()
        return _NOTHING

    # ---- bodies -----------------------------------------------------------------------------

    def _skip(self, view: memoryview, out: bytearray) -> memoryview:
        count = min(self._left, len(view))
        out += view[:count]
        self._left -= count
        if self._left == 0:
            self._mode = _Mode.HEAD
        return view[count:]

    def _chunked(self, view: memoryview, out: bytearray) -> memoryview:
        """Hand a chunked body on as it comes; h11 tells where it ends."""
        assert self._conn is not None
        try:
            used = self._until_end(view, None)
        except h11.RemoteProtocolError:
            self._mode, self._conn = _Mode.RAW, None
            out += view
            return _NOTHING
        out += view[:used]
        if used < len(view) or self._conn is None:
            return view[used:]
        return _NOTHING

    def _create_body(
        self, view: memoryview, out: bytearray
    ) -> tuple[memoryview, CreateRequest | None]:
        assert self._create is not None
        request = self._create
        try:
            used = self._until_end(view, self._body)
        except h11.RemoteProtocolError:
            self._raw += view
            return self._give_up(out), None
        self._raw += view[:used]
        if self._conn is not None:  # the body goes on
            if len(self._raw) > MAX_CREATE_BODY + MAX_HEAD:
                log.info("a container create over %d bytes: passed on as it is", MAX_CREATE_BODY)
                return self._give_up(out), None
            return _NOTHING, None
        create = CreateRequest(request, bytes(self._body), bytes(self._raw))
        self._mode, self._create = _Mode.HEAD, None
        self._raw, self._body = bytearray(), bytearray()
        return view[used:], create

    def _until_end(self, view: memoryview, body: bytearray | None) -> int:
        """Feed `view` to the message's h11 parser; how many of its bytes belong to the message.

        At the end of the message the parser is dropped (`_conn` None) and the scan goes back
        to reading heads; `body` (if given) collects the decoded body."""
        conn = self._conn
        assert conn is not None
        if view:  # h11 reads empty data as the end of the connection
            conn.receive_data(bytes(view))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return len(view)
            if isinstance(event, h11.Data) and body is not None:
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._conn = None
                if self._mode is _Mode.CHUNKED:
                    self._mode = _Mode.HEAD
                return len(view) - len(conn.trailing_data[0])


def _route_of_line(line: bytes, current: Route) -> Route:
    parts = line.split(b" ")
    if len(parts) != 3:
        return current
    target = parts[1]
    if _PING.fullmatch(target):
        return current
    if parts[0] == b"GET" and target == b"/offload/builder":  # `offload builder status`
        return Route.BUILDER
    if parts[0] == b"POST" and _BUILDER.fullmatch(target):
        return Route.BUILDER
    return Route.ENGINE


def _is_create_line(line: bytes) -> bool:
    """A container create, or a network create (held for `offload.agent.networks`)."""
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"POST":
        return False
    return _CREATE.fullmatch(parts[1]) is not None or NETWORK_CREATE.fullmatch(parts[1]) is not None


def _names_bind_sources(request: h11.Request) -> ResponseKind | None:
    if request.method != b"GET":
        return None
    if _LIST.fullmatch(request.target):
        return ResponseKind.LIST
    if _INSPECT.fullmatch(request.target):
        return ResponseKind.INSPECT
    return None


def _unusual(request: h11.Request) -> bool:
    """A create not worth holding: the client waits for `100 Continue` before its body, or
    says the body is larger than any create the runner accepts."""
    if any(name == b"expect" for name, _ in request.headers):
        return True
    return _content_length(request) > MAX_CREATE_BODY


def _framing(request: h11.Request) -> _Mode:
    """How the body of a request that is handed on is delimited, or RAW after it."""
    names = {name for name, _ in request.headers}
    connection = b",".join(v for n, v in request.headers if n == b"connection").lower()
    if (
        request.method == b"CONNECT"
        or b"upgrade" in names
        or b"upgrade" in connection
        or _HIJACK.fullmatch(request.target) is not None
    ):
        return _Mode.RAW
    if any(n == b"transfer-encoding" for n, _ in request.headers):
        return _Mode.CHUNKED
    return _Mode.LENGTH


def _content_length(request: h11.Request) -> int:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return 0


# ---- preparing a create ---------------------------------------------------------------------


class CreateBinds:
    """Syncs the laptop directories a create binds, then points its bind sources at them."""

    def __init__(
        self,
        manager: SyncManager,
        *,
        sources: BindSources | None = None,
        reconnect_timeout_s: float = SYNC_RECONNECT_TIMEOUT_S,
    ) -> None:
        self.manager = manager
        # What each rewritten source stands for, for the engine's answers that name it.
        self.sources = sources if sources is not None else BindSources()
        self.reconnect_timeout_s = reconnect_timeout_s

    async def prepare(self, body: bytes) -> bytes:
        """The body to send instead; raises InvalidInput (a bad bind) or an OffloadError."""
        if not has_laptop_binds(body):
            return body
        mount_area = await self.manager.mount_area()
        rewrite = await asyncio.to_thread(rewrite_create_body, body, mount_area)
        if not rewrite.changed:
            return body
        await asyncio.gather(*(self._synced(bind) for bind in rewrite.syncs))
        self.sources.learn(mount_area, rewrite.sources)
        return rewrite.body

    async def _synced(self, bind: BindSync) -> None:
        """Until the runner has `bind`'s directory as the laptop has it now."""
        sync = await self.manager.ensure(
            bind.laptop_path, bind.subdir, read_only=bind.read_only, only=bind.only
        )
        await sync.ready(self.reconnect_timeout_s)
        await sync.flush()
