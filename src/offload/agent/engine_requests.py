"""The agent's own requests to the session's engine (not the user's): small GETs over an engine
channel of the tunnel, answered as JSON or as a stream of JSON lines.

Used by the port forwarder (`/containers/json`, `/events`) and to learn which isolation the
session's engine has (`/info`).  Channels opened for these are Offload's traffic, not activity.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import h11

from offload.core.schemas import ENGINE_ISOLATION_LABEL

Streams = tuple[Any, Any]  # (reader, writer): asyncio or asyncssh streams
OpenEngine = Callable[[], Awaitable[Streams]]


async def engine_get_json(open_engine: OpenEngine, path: str) -> Any:
    body = bytearray()
    async for chunk in engine_body(open_engine, path):
        body += chunk
    return json.loads(body)


async def engine_stream(open_engine: OpenEngine, path: str) -> AsyncIterator[dict[str, Any] | None]:
    """Yields None once the response has started, then each JSON line as it comes."""
    pending = b""
    yielded_start = False
    async for chunk in engine_body(open_engine, path, stream=True):
        if not yielded_start:
            yielded_start = True
            yield None
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)


async def engine_body(
    open_engine: OpenEngine, path: str, stream: bool = False
) -> AsyncIterator[bytes]:
    reader, writer = await open_engine()
    try:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target=path, headers=[("Host", "docker")])
        writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
        await writer.drain()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                if event.status_code != 200:
                    raise ConnectionError(f"the engine answered {event.status_code} to {path}")
                if stream:
                    yield b""  # the stream is open: the caller may list now
            elif isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return
    finally:
        writer.close()


async def engine_isolation(open_engine: OpenEngine) -> str | None:
    """The session engine's isolation (`rootless`), from its labels; None if it names none."""
    info = await engine_get_json(open_engine, "/info")
    for label in info.get("Labels") or []:
        key, _, value = str(label).partition("=")
        if key == ENGINE_ISOLATION_LABEL:
            return value
    return None
