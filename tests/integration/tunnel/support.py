"""Real parts for the tunnel tests: a dockerd in its own netns, an SSH CA, an asyncio loop thread.

The endpoint and the agent run on a loop in a background thread, so that tests can drive them
with blocking clients (the docker CLI, docker-py) exactly as a user would.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncssh

from offload.agent.proxy import AgentProxy
from offload.agent.tunnel import Tunnel, TunnelTarget
from offload.core.errors import NotFound
from offload.core.schemas import InstanceSpec
from offload.core.waiting import wait_until
from offload.runner.driver import Environment, EnvState
from offload.runner.ssh_endpoint import SSHEndpoint

T = TypeVar("T")
CGROUP_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "freezer", "blkio", "devices", "cpuset")


class LoopThread:
    """An event loop running in a daemon thread; `run()` waits for a coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def _cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(_cancel_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


# ---- a dockerd of our own ---------------------------------------------------------------------


@dataclass
class Dockerd:
    root: Path
    netns: str
    cgroup: str
    socket: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"


def start_dockerd() -> Dockerd:
    root = Path(tempfile.mkdtemp(prefix="ot-", dir="/tmp"))
    name = root.name
    d = Dockerd(root=root, netns=name, cgroup=name, socket=root / "e.sock")
    try:
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        (root / "daemon.json").write_text("{}")
        log = open(root / "dockerd.log", "wb")  # noqa: SIM115 - lives as long as dockerd
        d.process = subprocess.Popen(
            [
                "nsenter", f"--net=/var/run/netns/{name}",
                "dockerd",
                "--config-file", str(root / "daemon.json"),
                "--data-root", str(root / "d"),
                "--exec-root", str(root / "x"),
                "--pidfile", str(root / "p"),
                "-H", d.host,
                "--cgroup-parent", f"/{name}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        wait_until(lambda: _pings(d), 30, "the test dockerd to answer")
    except BaseException:
        stop_dockerd(d)
        raise
    return d


def _pings(d: Dockerd) -> bool:
    if d.process is not None and d.process.poll() is not None:
        raise RuntimeError(f"dockerd exited: {(d.root / 'dockerd.log').read_text()[-2000:]}")
    result = subprocess.run(
        ["docker", "-H", d.host, "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        env=docker_env(d.root),
    )
    return result.returncode == 0


def stop_dockerd(d: Dockerd) -> None:
    """Leave nothing behind: processes, mounts, netns, cgroups, files."""
    if d.process is not None and d.process.poll() is None:
        d.process.send_signal(signal.SIGTERM)
        try:
            d.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(d.process.pid, signal.SIGKILL)
            d.process.wait(10)
    _kill_leftovers(d.root)
    _unmount_under(d.root)
    subprocess.run(["ip", "netns", "del", d.netns], capture_output=True)
    for controller in CGROUP_CONTROLLERS:
        _remove_cgroup_tree(Path("/sys/fs/cgroup") / controller / d.cgroup)
    shutil.rmtree(d.root, ignore_errors=True)


def _kill_leftovers(root: Path) -> None:
    """containerd and shims of this dockerd, if a hard stop left any (they name its paths)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"{root}/" in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _unmount_under(root: Path) -> None:
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True)


def _remove_cgroup_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
        child.rmdir()
    path.rmdir()


def docker_env(config_dir: Path) -> dict[str, str]:
    """Environment for the docker CLI: no user config, contexts or DOCKER_HOST leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    docker_config = config_dir / "docker-config"
    docker_config.mkdir(exist_ok=True)
    (docker_config / "config.json").write_text(json.dumps({}))
    env["DOCKER_CONFIG"] = str(docker_config)
    return env


# ---- certificates ---------------------------------------------------------------------------


class CertificateAuthority:
    def __init__(self) -> None:
        self.key = asyncssh.generate_private_key("ssh-ed25519")

    @property
    def public_key(self) -> str:
        return self.key.export_public_key().decode().strip()

    def sign(
        self,
        user_key: asyncssh.SSHKey,
        principals: list[str],
        valid_after: float | None = None,
        valid_before: float | None = None,
    ) -> str:
        now = time.time()
        cert = self.key.generate_user_certificate(
            user_key,
            key_id="test",
            principals=principals,
            valid_after=int(now - 60 if valid_after is None else valid_after),
            valid_before=int(now + 3600 if valid_before is None else valid_before),
        )
        return cert.export_certificate().decode()


# ---- the runner side: an endpoint with sessions -----------------------------------------------


@dataclass
class Runner:
    """An SSH endpoint whose sessions map to environments of the test dockerd(s)."""

    host_key: asyncssh.SSHKey
    ca: CertificateAuthority
    sessions: dict[str, Environment] = field(default_factory=dict)
    endpoint: SSHEndpoint | None = None
    resolved: list[str] = field(default_factory=list)

    def add_session(self, engine_socket: Path, session_id: str | None = None) -> str:
        session_id = session_id or f"ses-{secrets.token_hex(6)}"
        self.sessions[session_id] = Environment(
            id=f"env-{secrets.token_hex(4)}",
            engine_socket=engine_socket,
            mount_area=Path("/nonexistent"),
            netns="none",
            spec=InstanceSpec(),
            state=EnvState.BOUND,
            session_id=session_id,
        )
        return session_id

    async def resolve(self, session_id: str) -> Environment:
        self.resolved.append(session_id)
        try:
            return self.sessions[session_id]
        except KeyError:
            raise NotFound(f"Session {session_id} is not assigned to this runner.") from None

    async def start(self, port: int = 0, **options: Any) -> SSHEndpoint:
        self.endpoint = SSHEndpoint(
            "127.0.0.1", port, self.host_key, lambda: self.ca.public_key, self.resolve, **options
        )
        await self.endpoint.start()
        return self.endpoint

    @property
    def host_public_key(self) -> str:
        return self.host_key.export_public_key().decode().strip()


# ---- the laptop side -----------------------------------------------------------------------


@dataclass
class Laptop:
    """A session key on disk plus the agent's tunnel and proxy."""

    home: Path
    key: asyncssh.SSHKey
    tunnel: Tunnel | None = None
    proxy: AgentProxy | None = None

    @property
    def key_path(self) -> Path:
        return self.home / "key"

    @property
    def socket(self) -> Path:
        return self.home / "run" / "docker.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"


def make_laptop() -> Laptop:
    home = Path(tempfile.mkdtemp(prefix="ot-", dir="/tmp"))
    key = asyncssh.generate_private_key("ssh-ed25519")
    laptop = Laptop(home=home, key=key)
    key.write_private_key(laptop.key_path)
    os.chmod(laptop.key_path, 0o600)
    return laptop


def target_for(runner: Runner, laptop: Laptop, session_id: str, certificate: str) -> TunnelTarget:
    assert runner.endpoint is not None
    return TunnelTarget(
        host="127.0.0.1",
        port=runner.endpoint.port,
        host_key=runner.host_public_key,
        username=session_id,
        private_key_path=laptop.key_path,
        certificate=certificate,
    )


def start_agent(loop_thread: LoopThread, runner: Runner, laptop: Laptop, session_id: str) -> None:
    """A tunnel and a proxy for `session_id`, connected (fast backoff: tests wait on it)."""
    cert = runner.ca.sign(laptop.key, [session_id])
    target = target_for(runner, laptop, session_id, cert)

    async def start() -> None:
        laptop.tunnel = Tunnel(target, backoff_initial_s=0.05, backoff_max_s=0.3)
        laptop.proxy = AgentProxy(laptop.socket, laptop.tunnel)
        await laptop.proxy.start()
        await laptop.tunnel.start()

    loop_thread.run(start())
    wait_until(lambda: laptop.tunnel and laptop.tunnel.connected, 20, "the tunnel to connect")


def stop_agent(loop_thread: LoopThread, laptop: Laptop) -> None:
    async def stop() -> None:
        if laptop.proxy is not None:
            await laptop.proxy.stop()
        if laptop.tunnel is not None:
            await laptop.tunnel.close()

    loop_thread.run(stop())
    shutil.rmtree(laptop.home, ignore_errors=True)


def docker(
    laptop: Laptop, *args: str, input: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """The real docker CLI, pointed at the agent's socket."""
    return subprocess.run(
        ["docker", "-H", laptop.docker_host, *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        env=docker_env(laptop.home),
    )


def docker_ok(laptop: Laptop, *args: str, input: bytes | None = None) -> str:
    result = docker(laptop, *args, input=input)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def ssh_connect(
    runner: Runner,
    username: str,
    key: asyncssh.SSHKey,
    certificate: str | None = None,
    **options: Any,
) -> asyncssh.SSHClientConnection:
    """A bare asyncssh client to the runner's endpoint, trusting its real host key."""
    assert runner.endpoint is not None
    client_key: Any = (key, asyncssh.import_certificate(certificate)) if certificate else key
    return await asyncssh.connect(
        "127.0.0.1",
        runner.endpoint.port,
        username=username,
        known_hosts=([asyncssh.import_public_key(runner.host_public_key)], [], []),
        client_keys=[client_key],
        agent_path=None,
        config=[],
        **options,
    )


class Relay:
    """A TCP relay that can go silent without closing anything: a dead network path."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.frozen:  # the path is dead: new connections go nowhere either
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if not self.frozen:  # frozen: swallow everything, close nothing
                writer.write(data)
                await writer.drain()

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
