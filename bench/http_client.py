"""The load generator's HTTP/1.1 client: keep-alive connections of each simulated agent or runner.

httpx looks for an idle connection by scanning its pool on every request, and with 1,000 agents
in one pool that cost bench/load.py about 12 ms of CPU a request (load-20261202T143540Z). That
was more than the server spent answering, on the same two cores. Here each caller, keyed by its
token, holds connections of its own, as each laptop and runner does. It speaks only what the
control plane and nginx send: a status line, headers, and a Content-Length or chunked body.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

MAX_HEADER_BYTES = 64 * 1024


class ProtocolError(Exception):
    """The peer's answer was not the HTTP/1.1 this client reads."""


@dataclass(frozen=True)
class Response:
    status_code: int
    content: bytes

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def exchange(self, request: bytes) -> tuple[Response, bool]:
        """Send one request; the response and whether the connection may be kept."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEADER_BYTES:
            raise ProtocolError("response headers too long")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(f"not an HTTP/1.1 status line: {lines[0]!r}")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._chunked()
        else:
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        keep = headers.get("connection", "").lower() != "close"
        return Response(int(parts[1]), body), keep

    async def _chunked(self) -> bytes:
        chunks = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")  # no trailers are sent
                return b"".join(chunks)
            chunks.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    def close(self) -> None:
        self.writer.close()


class Pool:
    """The connections of one caller: a request takes an idle one or opens another."""

    def __init__(self, base_url: str) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or url.hostname is None:
            raise ValueError(f"only http://HOST:PORT/PREFIX is supported, not {base_url!r}")
        self.host, self.port, self.prefix = url.hostname, url.port or 80, url.path.rstrip("/")
        self._idle: list[_Connection] = []

    async def post(
        self,
        path: str,
        token: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> Response:
        target = self.prefix + path + (f"?{urlencode(params)}" if params else "")
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        request = (
            f"POST {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        async with asyncio.timeout(timeout):
            while self._idle:  # a kept connection the server closed meanwhile: take the next
                connection = self._idle.pop()
                try:
                    return await self._send(connection, request)
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                        raise  # it had begun to answer: the request was seen
            connection = _Connection(*await asyncio.open_connection(self.host, self.port))
            return await self._send(connection, request)

    async def _send(self, connection: _Connection, request: bytes) -> Response:
        try:
            response, keep = await connection.exchange(request)
        except BaseException:
            connection.close()
            raise
        if keep:
            self._idle.append(connection)
        else:
            connection.close()
        return response

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
