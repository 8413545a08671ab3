"""Helpers for the port-forwarding tests: free ports, a UDP echo image, the docker CLI, clients,
and the runner's real SSH endpoint.

The session engine comes from the tunnel tests' support (`start_environment`: an environment of
the runner's `RootlessDriver`, wiped without a trace at the end).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import asyncssh

from offload.agent.standby import STANDBY_CHANNEL_PATH, StandbyChannels
from offload.agent.udp_relay import udp_channel_path
from offload.core import ssh_fastpath
from offload.core.schemas import ENGINE_CHANNEL_PATH
from offload.runner.port_gate import PortGate
from offload.runner.ssh_endpoint import CHANNEL_MAX_PKTSIZE, CHANNEL_WINDOW, ENCRYPTION_ALGS
from tests.integration.tunnel.support import CertificateAuthority, Dockerd, Runner, ssh_connect
from tests.support.images import TEST_IMAGE

UDP_ECHO_IMAGE = "offload-test/udp-echo:latest"
# A UDP echo server with only Perl builtins (Debian's perl-base is essential, so always here):
# busybox-static has no UDP server applet.
UDP_ECHO = (
    'socket(S,2,2,17)||die"socket: $!";'
    'bind(S,pack("Sna4x8",2,$ARGV[0],"\\0"x4))||die"bind: $!";'
    "while(defined($a=recv(S,$b,65535,0))){send(S,$b,0,$a)}"
)
PERL = Path("/usr/bin/perl")


def build_udp_echo_image(docker_host: str) -> str:
    """The busybox test image plus /usr/bin/perl and the libraries it links (same paths)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "rootfs"
        for path in [PERL, *_linked_libraries(PERL)]:
            target = root / path.relative_to("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)  # follows symlinks: the file itself lands at that path
        (Path(tmp) / "Dockerfile").write_text(f"FROM {TEST_IMAGE}\nCOPY rootfs/ /\n")
        subprocess.run(
            ["docker", "-H", docker_host, "build", "-q", "-t", UDP_ECHO_IMAGE, tmp],
            check=True,
            capture_output=True,
        )
    return UDP_ECHO_IMAGE


def _linked_libraries(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], check=True, capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        for word in line.split():
            if word.startswith("/"):
                found.append(Path(word))
                break
    return found


def udp_echo_command(port: int) -> list[str]:
    return ["perl", "-e", UDP_ECHO, str(port)]


def free_ports(count: int, low: int = 20000, high: int = 30000) -> list[int]:
    """`count` consecutive ports free for TCP and UDP on 0.0.0.0 here, from a random base."""
    for _ in range(200):
        base = random.randrange(low, high - count)
        if all(_free(p) for p in range(base, base + count)):
            return list(range(base, base + count))
    raise RuntimeError(f"no {count} consecutive free ports between {low} and {high}")


def _free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


@dataclass
class Result:
    rc: int
    out: str
    err: str


async def docker(host: str, *args: str, check: bool = True) -> Result:
    """The real docker CLI against the test engine, without blocking the event loop."""
    proc = await asyncio.create_subprocess_exec(
        "docker", "-H", host, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    result = Result(proc.returncode or 0, out.decode().strip(), err.decode().strip())
    if check and result.rc != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.rc}: {result.err}")
    return result


async def http_get(host: str, port: int, path: str = "/index.html") -> tuple[int, bytes]:
    """One HTTP/1.0 request (busybox httpd closes after each answer): (status, body)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body


async def serves(host: str, port: int, expected: bytes) -> bool:
    """True once host:port answers the test page; False while nothing (or not yet) serves it."""
    try:
        status, body = await http_get(host, port)
    except (OSError, TimeoutError):
        return False
    return status == 200 and body == expected


async def refused(host: str, port: int) -> bool:
    """True once nothing listens there.  A reset while connecting (the listener closing under
    the probe) is not an answer yet: the caller's bounded wait probes again."""
    try:
        _, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False
    writer.close()
    return False


class UdpClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.received.put_nowait(data)


async def udp_client(host: str, port: int) -> UdpClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_datagram_endpoint(UdpClient, remote_addr=(host, port))
    return client


async def udp_echoes(client: UdpClient, payload: bytes, timeout: float = 0.5) -> bool:
    """Send `payload`; True if it comes back within `timeout` (UDP may drop: callers retry)."""
    assert client.transport is not None
    client.transport.sendto(payload)
    try:
        return await asyncio.wait_for(client.received.get(), timeout) == payload
    except TimeoutError:
        return False


# ---- transports -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---- the real runner endpoint and a client tuned as the agent's tunnel ----------------------


@dataclass
class SSHPair:
    """The runner's SSH endpoint serving one session of the test environment, and an asyncssh
    client signed in to it with that session's certificate."""

    runner: Runner
    client: asyncssh.SSHClientConnection
    standby: StandbyChannels | None = None

    def take_tcp(self, port: int, session_factory: Callable[[], Any]) -> Any | None:
        """What the agent does first for a forwarded connection: a channel opened ahead."""
        if self.standby is None:
            self.standby = StandbyChannels(self._open_standby)
        return self.standby.take(port, session_factory)

    async def _open_standby(self, session_factory: Callable[[], Any]) -> Any:
        chan, _ = await self.client.create_unix_connection(
            session_factory,
            STANDBY_CHANNEL_PATH,
            encoding=None,
            window=CHANNEL_WINDOW,
            max_pktsize=CHANNEL_MAX_PKTSIZE,
        )
        return chan

    async def open_tcp(self, port: int, session_factory: Callable[[], Any]) -> None:
        """What the agent's tunnel does for a forwarded connection: a `direct-tcpip` channel."""
        await self.client.create_connection(
            session_factory,
            "127.0.0.1",
            port,
            window=CHANNEL_WINDOW,
            max_pktsize=CHANNEL_MAX_PKTSIZE,
        )

    async def open_tcp_streams(self, port: int) -> tuple[Any, Any]:
        return await self.client.open_connection(
            "127.0.0.1", port, window=CHANNEL_WINDOW, max_pktsize=CHANNEL_MAX_PKTSIZE
        )

    async def open_udp(self, port: int) -> tuple[Any, Any]:
        return await self.client.open_unix_connection(udp_channel_path(port))

    async def open_engine(self) -> tuple[Any, Any]:
        return await self.client.open_unix_connection(ENGINE_CHANNEL_PATH)

    async def close(self) -> None:
        if self.standby is not None:
            self.standby.close()
        self.client.close()
        await self.client.wait_closed()
        assert self.runner.endpoint is not None
        await self.runner.endpoint.stop()


async def ssh_pair(dockerd: Dockerd, gate: PortGate) -> SSHPair:
    """The real `SSHEndpoint` (session certificates only, `gate` for the ports) on a free loopback
    port, and a client for a session bound to `dockerd`'s environment."""
    runner = Runner(
        host_key=asyncssh.generate_private_key("ssh-ed25519"), ca=CertificateAuthority()
    )
    await runner.start(port_gate=gate)
    try:
        session_id = runner.add_session(dockerd)
        key = asyncssh.generate_private_key("ssh-ed25519")
        ssh_fastpath.install()  # as the agent does
        client = await ssh_connect(
            runner,
            session_id,
            key,
            runner.ca.sign(key, [session_id]),
            encryption_algs=ENCRYPTION_ALGS,
            compression_algs=None,
            window=CHANNEL_WINDOW,
            max_pktsize=CHANNEL_MAX_PKTSIZE,
        )
    except BaseException:
        assert runner.endpoint is not None
        await runner.endpoint.stop()
        raise
    return SSHPair(runner=runner, client=client)
