"""A real SSH link for sync tests and the benchmark: a tiny asyncssh server whose `/sync`
channel runs the runner's sync endpoint on a mount area, and a client connected to it."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from offload.core.waiting import async_wait_until
from offload.sync.laptop import LaptopSync, OpenStream
from offload.sync.protocol import SYNC_CHANNEL_PATH
from offload.sync.remote import RemoteEndpoint

log = logging.getLogger(__name__)

WAIT = 15.0  # bound of every wait on a condition in these tests


async def until(condition, what: str, timeout: float = WAIT) -> None:  # type: ignore[no-untyped-def]
    """Wait (bounded) until the plain callable `condition` holds."""

    async def check() -> bool:
        return bool(condition())

    await async_wait_until(check, timeout, what, interval=0.01)


WINDOW = 16 * 1024 * 1024
PKTSIZE = 256 * 1024
CIPHERS = ["aes128-gcm@openssh.com"]


class _Server(asyncssh.SSHServer):
    def __init__(self, endpoint: RemoteEndpoint, tasks: set[asyncio.Task[None]]) -> None:
        self._endpoint = endpoint
        self._tasks = tasks

    def begin_auth(self, username: str) -> bool:
        return False  # a test server on loopback: no authentication

    def unix_connection_requested(self, dest_path: str):  # type: ignore[no-untyped-def]
        if dest_path != SYNC_CHANNEL_PATH:
            return False

        async def handler(
            reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]
        ) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                await self._endpoint.serve(reader, writer)
            finally:
                self._tasks.discard(task)

        return handler


@dataclass
class SyncLink:
    mount_area: Path
    endpoint: RemoteEndpoint
    acceptor: asyncssh.SSHAcceptor
    conn: asyncssh.SSHClientConnection
    syncs: list[LaptopSync] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def open_stream(self) -> OpenStream:
        async def open_stream():  # type: ignore[no-untyped-def]
            return await self.conn.open_unix_connection(
                SYNC_CHANNEL_PATH, encoding=None, window=WINDOW, max_pktsize=PKTSIZE
            )

        return open_stream

    async def start_sync(self, laptop: Path, subdir: str = "b0test", **kw) -> LaptopSync:  # type: ignore[no-untyped-def]
        sync = LaptopSync(laptop, subdir, self.open_stream, **kw)
        self.syncs.append(sync)
        await sync.start()
        return sync

    def remote(self, subdir: str = "b0test") -> Path:
        return self.mount_area / subdir

    async def close(self) -> None:
        for sync in self.syncs:
            await sync.close()
        self.conn.close()
        await self.conn.wait_closed()
        self.acceptor.close()
        await self.acceptor.wait_closed()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=10)


async def open_link(mount_area: Path, **endpoint_options) -> SyncLink:  # type: ignore[no-untyped-def]
    endpoint = RemoteEndpoint(mount_area, **endpoint_options)
    tasks: set[asyncio.Task[None]] = set()
    acceptor = await asyncssh.create_server(
        lambda: _Server(endpoint, tasks),
        "127.0.0.1",
        0,
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        config=[],
        encryption_algs=CIPHERS,
        compression_algs=None,
        window=WINDOW,
        max_pktsize=PKTSIZE,
    )
    conn = await asyncssh.connect(
        "127.0.0.1",
        acceptor.get_port(),
        username="sync",
        known_hosts=None,
        config=[],
        client_keys=None,
        agent_path=None,
        encryption_algs=CIPHERS,
        compression_algs=None,
        window=WINDOW,
        max_pktsize=PKTSIZE,
    )
    return SyncLink(mount_area, endpoint, acceptor, conn, tasks=tasks)
