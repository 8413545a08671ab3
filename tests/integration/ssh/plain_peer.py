"""An SSH peer on asyncssh's own packet path, for interoperability tests of the fast path.

This process never imports `offload.core.ssh_fastpath`, so what it sends and how it parses what
it receives is asyncssh's unmodified code.

  python plain_peer.py server KEYDIR        echo server; prints "PORT <n>" once listening
  python plain_peer.py client PORT KEYDIR   sends stdin through `cat` on the server, writes the
                                            echo to stdout
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import asyncssh

ALGS = ["aes128-gcm@openssh.com"]


async def echo(process: asyncssh.SSHServerProcess[bytes]) -> None:
    while data := await process.stdin.read(65536):
        process.stdout.write(data)
        await process.stdout.drain()
    process.exit(0)


async def serve(keys: Path) -> None:
    server = await asyncssh.create_server(
        asyncssh.SSHServer,
        "127.0.0.1",
        0,
        server_host_keys=[str(keys / "host")],
        authorized_client_keys=str(keys / "client.pub"),
        process_factory=echo,
        encoding=None,
        encryption_algs=ALGS,
        config=[],
    )
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


async def send(port: int, keys: Path) -> None:
    data = sys.stdin.buffer.read()
    async with asyncssh.connect(
        "127.0.0.1",
        port,
        username="peer",
        client_keys=[str(keys / "client")],
        known_hosts=None,
        encryption_algs=ALGS,
        config=[],
    ) as conn:
        result = await conn.run("cat", input=data, encoding=None, check=True)
    sys.stdout.buffer.write(result.stdout)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        asyncio.run(serve(Path(sys.argv[2])))
    else:
        asyncio.run(send(int(sys.argv[2]), Path(sys.argv[3])))
