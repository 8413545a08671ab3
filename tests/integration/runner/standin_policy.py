"""A permissive stand-in for the runner's policy plugin: allows every request.

Only for driver tests that are about environments, not policy: dockerd refuses to start without
its authorization plugin, so the tests need one that answers.  The real plugin is
`offload.runner.policy.PolicyPlugin`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

PLUGIN_DIR = Path("/run/docker/plugins")

_ANSWERS = {
    "/Plugin.Activate": {"Implements": ["authz"]},
    "/AuthZPlugin.AuthZReq": {"Allow": True},
    "/AuthZPlugin.AuthZRes": {"Allow": True},
}


class PermissiveStandInPolicy:
    def __init__(self, name: str, mount_area: Path) -> None:
        self.name = name
        self.mount_area = mount_area
        self.socket = PLUGIN_DIR / f"{name}.sock"
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        PLUGIN_DIR.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.socket.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: dockerd reuses the connection
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                await reader.readexactly(length)
                body = json.dumps(_ANSWERS.get(path, {"Allow": True})).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
