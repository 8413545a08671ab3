"""One engine response held whole, its JSON body rewritten, then back to the raw splice.

The proxy splices the engine's bytes unchanged. For the few requests whose answer must be
shown differently (the request scanner marks them, `offload.agent.intercept`), it hands the
engine's bytes to a `ResponseRewriter` instead, until that one response is complete: h11 finds
its end (Content-Length or chunked), a `200` JSON body is held and passed to `transform`, and a
changed body goes on with a new Content-Length (chunked framing dropped), an unchanged one as
the very bytes the engine sent. Anything else (an error status, a body that is not JSON, a body
read until the connection closes, one over `MAX_BODY`, bytes h11 cannot parse) is handed on as
it comes, unchanged.

Responses come in the order of the requests, and Docker's clients (the Go CLI, compose,
docker-py) send a request on a keep-alive connection only once the previous answer is complete,
so the response to a marked request is the next one the engine sends after it; what follows its
end on the connection (`Step.rest`) is not part of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import h11

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
_DROPPED_HEADERS = (b"content-length", b"transfer-encoding")


@dataclass(frozen=True)
class Step:
    out: bytes  # hand on to the client now
    done: bool = False  # the response is complete
    rest: bytes = b""  # once done: the bytes after it (not this response's)
    raw: bool = False  # the connection is no HTTP any more: splice the rest unchanged


class _Mode(Enum):
    HEAD = "head"  # the response head is not complete yet
    HOLD = "hold"  # holding a JSON body until its end
    PASS = "pass"  # handing the body on as it comes, following it to its end
    RAW = "raw"  # done, or gave up: not a response we can follow


class ResponseRewriter:
    """Follows the engine's answer to one `method` request; `feed` it the engine's bytes."""

    def __init__(self, transform: Callable[[bytes], bytes], *, method: bytes = b"GET") -> None:
        self._transform = transform
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        # h11 follows a response only after the request it answers.
        self._conn.send(h11.Request(method=method, target=b"/", headers=[(b"Host", b"engine")]))
        self._conn.send(h11.EndOfMessage())
        self._mode = _Mode.HEAD
        self._response: h11.Response | None = None
        self._raw = bytearray()  # what the engine sent of it, held
        self._out = bytearray()  # what to hand on from this feed
        self._body = bytearray()  # its body, decoded

    def feed(self, data: bytes) -> Step:
        if self._mode is _Mode.RAW:
            return Step(data, raw=True)
        if not data:  # h11 reads empty data as the end of the connection
            return Step(b"")
        if self._mode is _Mode.PASS:
            self._out += data
        else:
            self._raw += data
        try:
            self._conn.receive_data(data)
            return self._events()
        except h11.RemoteProtocolError:
            return self._give_up()

    def abandon(self) -> bytes:
        """The engine went away mid-response: what was held, to hand on as it is."""
        return self._give_up().out

    def _events(self) -> Step:
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                return self._step()
            if isinstance(event, h11.Response):
                self._response = event
                if _holdable(event):
                    self._mode = _Mode.HOLD
                elif _delimited(event):
                    self._pass()
                else:
                    return self._give_up()  # read until the connection closes
            elif isinstance(event, h11.Data):
                if self._mode is _Mode.HOLD:
                    self._body += event.data
                    if len(self._body) > MAX_BODY:
                        self._pass()  # too large to hold: handed on as it is
            elif isinstance(event, h11.EndOfMessage):
                return self._end(bytes(self._conn.trailing_data[0]))
            else:  # an informational response (never sent for a GET), or the connection closed
                return self._give_up()

    def _pass(self) -> None:
        self._mode = _Mode.PASS
        self._out += self._raw
        self._raw = bytearray()

    def _step(self) -> Step:
        out, self._out = bytes(self._out), bytearray()
        return Step(out)

    def _end(self, rest: bytes) -> Step:
        tail = self._out if self._mode is _Mode.PASS else self._raw
        if rest:  # bytes after this response's end: not its own
            del tail[len(tail) - len(rest) :]
        if self._mode is _Mode.HOLD:
            self._out += self._finish()
            self._raw = bytearray()
        self._mode = _Mode.RAW
        out, self._out = bytes(self._out), bytearray()
        return Step(out, done=True, rest=rest)

    def _finish(self) -> bytes:
        response, body = self._response, bytes(self._body)
        assert response is not None
        try:
            new_body = self._transform(body)
        except Exception:  # a bug must not cost the client its answer
            log.exception("rewriting an engine response failed; handed on as it came")
            new_body = body
        if new_body is body or new_body == body:
            return bytes(self._raw)
        lines = [b"HTTP/%s %d %s" % (response.http_version, response.status_code, response.reason)]
        for name, value in response.headers.raw_items():
            if name.lower() not in _DROPPED_HEADERS:
                lines.append(name + b": " + value)
        lines.append(b"Content-Length: %d" % len(new_body))
        return b"\r\n".join(lines) + b"\r\n\r\n" + new_body

    def _give_up(self) -> Step:
        """Hand on everything not handed on yet; the connection is spliced raw from now on."""
        out = bytes(self._out + self._raw)
        self._out, self._raw = bytearray(), bytearray()
        self._mode = _Mode.RAW
        return Step(out, raw=True)


def _holdable(response: h11.Response) -> bool:
    """A `200` with a JSON body of known framing: worth holding to rewrite."""
    if response.status_code != 200 or not _delimited(response):
        return False
    lengths = [v for n, v in response.headers if n == b"content-length"]
    if lengths and int(lengths[0]) > MAX_BODY:
        return False
    types = [v for n, v in response.headers if n == b"content-type"]
    return len(types) == 1 and types[0].split(b";")[0].strip().lower() == b"application/json"


def _delimited(response: h11.Response) -> bool:
    """Its end is in the bytes (Content-Length or chunked), not the connection's close."""
    if response.status_code in (204, 304):
        return True
    return any(n in _DROPPED_HEADERS for n, _ in response.headers)
