"""What counts as activity on the agent's Docker socket, and when the control plane hears of it.

The rules are in docs/activity.md. The proxy hands every chunk of bytes to a `ConnectionWatch`,
which peeks at request lines and response heads without copying or parsing bodies:

- each request is classified by its request line: `/_ping` alone is not activity, a build
  (`POST /build`, BuildKit's `/session` and `/grpc`) is, and so is any other call;
- a request stays *in flight* until its response is complete (a `Content-Length` body fully
  read, a chunked body's last chunk, or no body at all); hijacked connections (attach, exec,
  BuildKit) and raw streams stay in flight until they close. A connection in flight for
  `STREAM_AFTER_S` is an open stream (logs -f, events, attach...). Idle keep-alive connections
  of SDK connection pools are therefore not streams and do not keep a session awake.

Anything unclear counts as in flight: a session kept active a little longer costs less than a
stream cut by a pause.

`ActivityReporter` sends `ActivityReport`s with the documented cadence: as soon as something
happens, then at most every `min_interval_s` while it goes on (counts summed), at least every
`keepalive_s` while a request stays in flight, and nothing while everything is quiet.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from enum import Enum

from offload.core.errors import OffloadError
from offload.core.schemas import ActivityReport
from offload.core.waiting import wait_event

log = logging.getLogger(__name__)

STREAM_AFTER_S = 2.0
MIN_REPORT_INTERVAL_S = 2.0
KEEPALIVE_REPORT_S = 5.0
MAX_REQUEST_LINE = 8 * 1024
MAX_RESPONSE_HEAD = 64 * 1024

_METHODS = frozenset({b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"PATCH", b"OPTIONS"})
_VERSIONED = rb"(?:/v[0-9][0-9.]*)?"
_PING = re.compile(_VERSIONED + rb"/_ping(?:\?.*)?")
_BUILD = re.compile(_VERSIONED + rb"/(?:build|session|grpc)(?:\?.*)?")
_STREAM_TYPES = (b"application/vnd.docker.raw-stream", b"application/vnd.docker.multiplexed")
_LAST_CHUNK = b"\r\n0\r\n\r\n"


class RequestKind(Enum):
    PING = "ping"  # `/_ping` alone: readiness checks, never activity
    BUILD = "build"
    CALL = "call"


def classify(request_line: bytes) -> RequestKind | None:
    """The kind of an HTTP request line (`GET /path HTTP/1.1`); None if it is not one."""
    parts = request_line.strip().split(b" ")
    if len(parts) != 3 or parts[0] not in _METHODS or not parts[2].startswith(b"HTTP/"):
        return None
    if _PING.fullmatch(parts[1]):
        return RequestKind.PING
    if parts[0] == b"POST" and _BUILD.fullmatch(parts[1]):
        return RequestKind.BUILD
    return RequestKind.CALL


class _Body(Enum):
    NONE = "none"  # no request in flight
    HEAD = "head"  # waiting for (the rest of) the response head
    LENGTH = "length"  # a Content-Length body
    CHUNKED = "chunked"
    STREAM = "stream"  # hijacked, raw stream or read-until-close: in flight until closed


class ConnectionWatch:
    """Activity on one client connection: fed every byte chunk, both directions."""

    def __init__(self, tracker: ActivityTracker, now: float) -> None:
        self._tracker = tracker
        self.opened_at = now
        self.kind: RequestKind | None = None  # the request in flight (or the last one)
        self.in_flight_since: float | None = None  # a non-ping request not yet answered
        self._line = bytearray()  # a request line being assembled
        self._expect_request = True
        self._method = b""
        self._body = _Body.NONE
        self._head = bytearray()
        self._left = 0
        self._tail = b""

    @property
    def busy(self) -> bool:
        return self.in_flight_since is not None

    # ---- client bytes -------------------------------------------------------------------------

    def client_bytes(self, data: bytes) -> None:
        if self._expect_request or self.kind is RequestKind.PING:
            self._request_bytes(data)
        elif self.kind is not None:
            self._tracker.note_traffic()  # a body upload or a stream's input: the user at work

    def _request_bytes(self, data: bytes) -> None:
        if not self._expect_request:  # after a ping: the next request on a keep-alive connection
            self._expect_request, self._line = True, bytearray()
        self._line += data[: MAX_REQUEST_LINE - len(self._line)]
        end = self._line.find(b"\r\n")
        if end < 0 and len(self._line) < MAX_REQUEST_LINE:
            return
        line = bytes(self._line[: end if end >= 0 else len(self._line)])
        self._expect_request, self._line = False, bytearray()
        self._start_request(line, classify(line))

    def _start_request(self, line: bytes, kind: RequestKind | None) -> None:
        # Not a request line we know: count it as a call (never miss activity).
        self.kind = kind or RequestKind.CALL
        self._method = line.split(b" ", 1)[0]
        self._body, self._head = _Body.HEAD, bytearray()
        if self.kind is RequestKind.PING:
            self.in_flight_since = None
            return
        self.in_flight_since = self._tracker.now()
        self._tracker.note_call()

    # ---- engine bytes -------------------------------------------------------------------------

    def engine_bytes(self, data: bytes) -> None:
        if self._body is _Body.HEAD:
            self._head_bytes(data)
        elif self._body is _Body.LENGTH:
            self._length_bytes(len(data))
        elif self._body is _Body.CHUNKED:
            self._chunked_bytes(data)

    def _head_bytes(self, data: bytes) -> None:
        start = len(self._head)
        self._head += data
        end = self._head.find(b"\r\n\r\n", max(0, start - 3))
        if end < 0:
            if len(self._head) > MAX_RESPONSE_HEAD:
                self._body, self._head = _Body.STREAM, bytearray()
            return
        head, rest = bytes(self._head[:end]), bytes(self._head[end + 4 :])
        self._head = bytearray()
        self._begin_body(head, rest)

    def _begin_body(self, head: bytes, rest: bytes) -> None:
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ")
        code = int(status[1]) if len(status) > 1 and status[1].isdigit() else 0
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if code == 101 or headers.get(b"content-type", b"").startswith(_STREAM_TYPES):
            self._body = _Body.STREAM
        elif self._method == b"HEAD" or code in (204, 304) or 100 <= code < 200:
            self._complete()
        elif b"chunked" in headers.get(b"transfer-encoding", b""):
            self._body, self._tail = _Body.CHUNKED, b"\r\n"
            self._chunked_bytes(rest)
        elif headers.get(b"content-length", b"").isdigit():
            self._body, self._left = _Body.LENGTH, int(headers[b"content-length"])
            self._length_bytes(len(rest))
        else:
            self._body = _Body.STREAM  # a body read until the connection closes

    def _length_bytes(self, count: int) -> None:
        self._left -= count
        if self._left <= 0:
            self._complete()

    def _chunked_bytes(self, data: bytes) -> None:
        if not data:
            return
        # The last chunk of a chunked body is `0\r\n\r\n` right after the previous chunk's CRLF
        # (or at the very start of the body); checked on the tail only, never on the whole body.
        window = (self._tail + data)[-len(_LAST_CHUNK) :]
        if window.endswith(_LAST_CHUNK):
            self._complete()
        else:
            self._tail = window

    def _complete(self) -> None:
        self._body = _Body.NONE
        self._expect_request = True
        if self.in_flight_since is not None:
            self.in_flight_since = None
            self._tracker.note_change()

    def closed(self) -> None:
        self._tracker.forget(self)


class ActivityTracker:
    """Activity over every connection of the proxy, since the last report."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, stream_after_s: float = STREAM_AFTER_S
    ) -> None:
        self._clock = clock
        self.stream_after_s = stream_after_s
        self._watches: set[ConnectionWatch] = set()
        self._calls = 0
        self._traffic = False
        # Told of every change (the reporter wakes up on it).
        self.on_activity: Callable[[], None] | None = None

    def now(self) -> float:
        return self._clock()

    def opened(self) -> ConnectionWatch:
        watch = ConnectionWatch(self, self._clock())
        self._watches.add(watch)
        return watch

    def opened_stream(self) -> ConnectionWatch:
        """A connection that is activity for as long as it is open (a port-forwarded one):
        counted as a call now, an open stream after `stream_after_s`; `closed()` ends it."""
        watch = self.opened()
        watch.kind, watch.in_flight_since = RequestKind.CALL, self._clock()
        watch.client_bytes = watch.engine_bytes = lambda data: None  # type: ignore[method-assign]
        self.note_call()
        return watch

    def forget(self, watch: ConnectionWatch) -> None:
        if watch in self._watches:
            self._watches.discard(watch)
            if watch.busy:
                self.note_change()

    def note_call(self) -> None:
        self._calls += 1
        self.note_change()

    def note_traffic(self) -> None:
        if not self._traffic:
            self._traffic = True
            self.note_change()

    def note_change(self) -> None:
        if self.on_activity is not None:
            self.on_activity()

    # ---- what there is to report ----------------------------------------------------------

    def pending(self) -> bool:
        """Something happened that the control plane has not been told yet."""
        return self._calls > 0 or self._traffic

    def busy(self) -> bool:
        """A request is in flight (it may become an open stream)."""
        return any(watch.busy for watch in self._watches)

    def open_streams(self) -> int:
        now = self._clock()
        return sum(
            1
            for w in self._watches
            if w.in_flight_since is not None and now - w.in_flight_since >= self.stream_after_s
        )

    def building(self) -> bool:
        return any(w.busy and w.kind is RequestKind.BUILD for w in self._watches)

    def take(self) -> ActivityReport | None:
        """The report of everything since the last one (None: nothing to say); resets counts."""
        calls = self._calls or (1 if self._traffic else 0)
        self._calls, self._traffic = 0, False
        streams, building = self.open_streams(), self.building()
        if not (calls or streams or building):
            return None
        return ActivityReport(api_calls=calls, open_streams=streams, building=building)


SendReport = Callable[[ActivityReport], Awaitable[None]]


class ActivityReporter:
    """Sends the tracker's reports with the documented cadence until cancelled."""

    def __init__(
        self,
        tracker: ActivityTracker,
        send: SendReport,
        *,
        min_interval_s: float = MIN_REPORT_INTERVAL_S,
        keepalive_s: float = KEEPALIVE_REPORT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tracker = tracker
        self._send = send
        self.min_interval_s = min_interval_s
        self.keepalive_s = keepalive_s
        self._clock = clock
        self._wake = asyncio.Event()
        self.last_sent: float | None = None
        # Quiet: everything seen has been reported and nothing is in flight. Told to
        # `on_quiet` on every change (the agent state file shows it).
        self.quiet = True
        self.on_quiet: Callable[[bool], None] | None = None
        tracker.on_activity = self._poked

    def _poked(self) -> None:
        self._wake.set()
        if self.tracker.pending() or self.tracker.busy():
            self._set_quiet(False)

    def _set_quiet(self, quiet: bool) -> None:
        if quiet != self.quiet:
            self.quiet = quiet
            if self.on_quiet is not None:
                self.on_quiet(quiet)

    def due_in(self) -> float | None:
        """Seconds until the next report is due; None: nothing to report."""
        since = float("inf") if self.last_sent is None else self._clock() - self.last_sent
        if self.tracker.pending():
            return max(0.0, self.min_interval_s - since)
        if self.tracker.busy():
            return max(0.0, self.keepalive_s - since)
        return None

    async def run(self) -> None:
        while True:
            await self._until_due()
            report = self.tracker.take()
            if report is None:
                continue
            self.last_sent = self._clock()
            try:
                await self._send(report)
            except OffloadError as exc:
                log.warning("activity report not delivered: %s", exc.message)

    async def _until_due(self) -> None:
        while True:
            delay = self.due_in()
            if delay is not None and delay <= 0:
                return
            if delay is None:
                self._set_quiet(True)
            self._wake.clear()
            await wait_event(self._wake, delay)
