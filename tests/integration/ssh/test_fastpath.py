"""The SSH fast path speaks the same protocol as asyncssh's own code and as OpenSSH.

Random bytes go through an echo (`cat`) session in both directions, in writes of random sizes
(below, at and above the channel's packet size, so both the direct and the queued channel write
are taken), and must come back bit for bit. The peers: asyncssh without the fast path in another
process (`plain_peer.py`), OpenSSH's `ssh` and `sshd`, and the fast path itself with a rekey
every few hundred kilobytes (the fast path must step aside for each key exchange).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from offload.core import ssh_fastpath
from offload.core.tunnel_tuning import CHANNEL_MAX_PKTSIZE, CHANNEL_WINDOW
from offload.core.waiting import wait_until
from tests.support.net import free_port

PEER = Path(__file__).with_name("plain_peer.py")
ALGS = ["aes128-gcm@openssh.com"]
PAYLOAD = random.Random(7).randbytes(3 * 1024 * 1024 + 12345)


@pytest.fixture(scope="module", autouse=True)
def fast_path() -> None:
    assert ssh_fastpath.install(), "the fast path must be active for these tests to mean anything"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    for name in ("host", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", directory / name], check=True
        )
    return directory


def chunks(data: bytes, seed: int) -> Iterator[bytes]:
    """`data` in pieces of 1 byte to a little over one channel packet."""
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        size = rng.choice([1, 100, 4096, CHANNEL_MAX_PKTSIZE, CHANNEL_MAX_PKTSIZE + 1, 300_000])
        yield data[pos : pos + size]
        pos += size


async def echo(process: asyncssh.SSHServerProcess[bytes]) -> None:
    while data := await process.stdin.read(CHANNEL_MAX_PKTSIZE):
        process.stdout.write(data)
        await process.stdout.drain()
    process.exit(0)


@pytest.fixture
async def fast_server(keys: Path) -> AsyncIterator[tuple[int, list[Any]]]:
    """An in-process echo server on the fast path; yields its port and its connections."""
    connections: list[Any] = []

    class Server(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            connections.append(conn)

    server = await asyncssh.create_server(
        Server,
        "127.0.0.1",
        0,
        server_host_keys=[str(keys / "host")],
        authorized_client_keys=str(keys / "client.pub"),
        process_factory=echo,
        encoding=None,
        encryption_algs=ALGS,
        config=[],
        window=CHANNEL_WINDOW,
        max_pktsize=CHANNEL_MAX_PKTSIZE,
        rekey_bytes=256 * 1024,
    )
    yield server.sockets[0].getsockname()[1], connections
    server.close()
    await server.wait_closed()


class RetainingTransport:
    """A transport that keeps what it is given, uncopied, until the next loop iteration, as
    Python 3.12+'s socket transport does with whatever it cannot send at once (3.11 copied)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._queue: list[Any] = []

    def write(self, data: Any) -> None:
        if not self._queue:
            asyncio.get_running_loop().call_soon(self._flush)
        self._queue.append(data if isinstance(data, bytes) else memoryview(data))

    def get_write_buffer_size(self) -> int:
        return sum(map(len, self._queue)) + int(self._inner.get_write_buffer_size())

    def _flush(self) -> None:
        queue, self._queue = self._queue, []
        for data in queue:
            self._inner.write(bytes(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def fast_echo(
    port: int, keys: Path, user: str = "peer", retaining: bool = False
) -> tuple[bytes, Any]:
    """PAYLOAD through `cat` over a fast-path client connection: (what came back, connection)."""
    conn = await asyncssh.connect(
        "127.0.0.1",
        port,
        username=user,
        client_keys=[str(keys / "client")],
        known_hosts=None,
        encryption_algs=ALGS,
        config=[],
        window=CHANNEL_WINDOW,
        max_pktsize=CHANNEL_MAX_PKTSIZE,
        rekey_bytes=256 * 1024,
    )
    if retaining:
        conn._transport = RetainingTransport(conn._transport)
    async with conn:
        process = await conn.create_process("cat", encoding=None)

        async def feed() -> None:
            for piece in chunks(PAYLOAD, 1):
                process.stdin.write(piece)
                await process.stdin.drain()
            process.stdin.write_eof()

        sending = asyncio.create_task(feed())
        received = await process.stdout.read()
        await sending
        await process.wait()
    return received, conn


def assert_same(received: bytes) -> None:
    assert len(received) == len(PAYLOAD)
    assert hashlib.sha256(received).digest() == hashlib.sha256(PAYLOAD).digest()


@pytest.fixture
def counted() -> Iterator[None]:
    """Fails the test unless this process sent and received the payload on the fast path."""
    sent, received = ssh_fastpath.Counters.sent, ssh_fastpath.Counters.received
    yield
    packets = len(PAYLOAD) // CHANNEL_MAX_PKTSIZE
    assert ssh_fastpath.Counters.sent - sent > packets
    assert ssh_fastpath.Counters.received - received > packets


@pytest.mark.usefixtures("counted")
async def test_fast_client_and_fast_server_through_rekeys(
    keys: Path, fast_server: tuple[int, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    kexinits = 0
    send_kexinit = asyncssh.connection.SSHConnection._send_kexinit

    def counting(self: Any) -> None:
        nonlocal kexinits
        kexinits += 1
        send_kexinit(self)

    monkeypatch.setattr(asyncssh.connection.SSHConnection, "_send_kexinit", counting)
    port, _ = fast_server
    received, _ = await fast_echo(port, keys)
    assert_same(received)
    assert kexinits > 10  # 3 MiB each way, a new key every 256 KiB


@pytest.mark.usefixtures("counted")
async def test_no_buffer_is_reused_while_the_transport_still_holds_it(
    keys: Path, fast_server: tuple[int, list[Any]]
) -> None:
    port, _ = fast_server
    received, _ = await fast_echo(port, keys, retaining=True)
    assert_same(received)


@pytest.mark.usefixtures("counted")
async def test_fast_client_with_asyncssh_own_server(keys: Path) -> None:
    peer = subprocess.Popen(
        [sys.executable, PEER, "server", keys], stdout=subprocess.PIPE, text=True
    )
    try:
        assert peer.stdout is not None
        port = int(peer.stdout.readline().split()[1])
        received, _ = await fast_echo(port, keys)
    finally:
        peer.kill()
        peer.wait()
    assert_same(received)


@pytest.mark.usefixtures("counted")
async def test_asyncssh_own_client_with_fast_server(
    keys: Path, fast_server: tuple[int, list[Any]]
) -> None:
    port, connections = fast_server
    peer = await asyncio.create_subprocess_exec(
        sys.executable, PEER, "client", str(port), str(keys),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    received, _ = await peer.communicate(PAYLOAD)
    assert peer.returncode == 0
    assert_same(received)


@pytest.mark.usefixtures("counted")
async def test_openssh_client_with_fast_server(
    keys: Path, fast_server: tuple[int, list[Any]]
) -> None:
    port, connections = fast_server
    ssh = await asyncio.create_subprocess_exec(
        "ssh", "-p", str(port), "-i", str(keys / "client"), "-F", "/dev/null",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR", "-o", "Ciphers=aes128-gcm@openssh.com",
        "-o", "RekeyLimit=300K", "peer@127.0.0.1", "cat",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    received, _ = await ssh.communicate(PAYLOAD)
    assert ssh.returncode == 0
    assert_same(received)


@pytest.fixture
def openssh_server(keys: Path, tmp_path: Path) -> Iterator[int]:
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    port = free_port()
    (tmp_path / "authorized_keys").write_text((keys / "client.pub").read_text())
    config = tmp_path / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host'}\n"
        f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        f"StrictModes no\nPidFile {tmp_path / 'sshd.pid'}\nCiphers aes128-gcm@openssh.com\n"
        "RekeyLimit 300K\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)
    process = subprocess.Popen([sshd, "-D", "-e", "-f", config], stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _listening(port), 10, "sshd listening")
        yield port
    finally:
        process.terminate()
        process.wait()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.usefixtures("counted")
async def test_fast_client_with_openssh_server(keys: Path, openssh_server: int) -> None:
    received, _ = await fast_echo(openssh_server, keys, user="root")
    assert_same(received)
