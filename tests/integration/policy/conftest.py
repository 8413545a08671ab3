"""A real dockerd in its own network namespace whose every request goes through a real PolicyPlugin.

The plugin runs in an event loop on a background thread (as it would inside the runner), the engine
is started after it (dockerd checks its authorization plugins at start-up), and the tests drive
the engine with the real docker CLI and with raw HTTP.  A second engine without any plugin
(`plain_engine`) is the reference: what the policy lets through must get that engine's own answer,
byte for byte.  Teardown leaves nothing: no process, mount, netns, cgroup, directory or plugin
socket, even when a test fails.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from offload.core.waiting import WaitTimeout, wait_until
from offload.runner.policy import PolicyPlugin
from tests.support.images import build_test_image

T = TypeVar("T")

pytestmark = pytest.mark.slow


class LoopThread:
    """An asyncio event loop on a daemon thread, so that sync tests can call the docker CLI."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class Engine:
    base: Path
    netns: str
    cgroup: str
    socket: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def docker(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 90
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", "-H", self.host, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )

    def http(self) -> httpx.Client:
        """A raw HTTP client on the engine's socket (paths are sent as written)."""
        transport = httpx.HTTPTransport(uds=str(self.socket))
        return httpx.Client(transport=transport, base_url="http://docker", timeout=60)

    def answers(self) -> bool:
        return self.docker("version", "--format", "{{.Server.Version}}", timeout=30).returncode == 0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def make_engine(base: Path) -> Engine:
    token = base.name.rsplit("-", 1)[-1]
    return Engine(
        base=base,
        netns=f"otpol-{token}",
        cgroup=f"otpol-{token}",
        socket=base / "d.sock",
        log=base / "dockerd.log",
    )


def start_engine(engine: Engine, plugin_name: str | None) -> None:
    base = engine.base
    _ip("netns", "add", engine.netns)
    _ip("-n", engine.netns, "link", "set", "lo", "up")
    command = [
        "nsenter",
        f"--net=/var/run/netns/{engine.netns}",
        "dockerd",
        "--data-root", str(base / "d"),
        "--exec-root", str(base / "e"),
        "--pidfile", str(base / "dockerd.pid"),
        "-H", engine.host,
        "--cgroup-parent", f"/{engine.cgroup}",
    ]  # fmt: skip
    if plugin_name is not None:
        command += ["--authorization-plugin", plugin_name]
    with engine.log.open("wb") as log:
        proc = engine.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: proc.poll() is not None or engine.answers(), 30, "dockerd")
    except WaitTimeout:
        pass
    if proc.poll() is not None or not engine.answers():
        tail = engine.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"dockerd did not come up:\n{tail}")


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _kill_pidfile(pidfile: Path) -> None:
    """A process dockerd started (its containerd) that outlived it: kill it and wait for it."""
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        return
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, f"process {pid} to end")


def _mounts_under(base: Path) -> list[str]:
    prefix = str(base) + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")  # \040 and friends
        if point.startswith(prefix):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def _remove_cgroups(name: str) -> None:
    for controller in Path("/sys/fs/cgroup").iterdir():
        top = controller / name
        if not top.is_dir():
            continue
        for directory in sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True):
            directory.rmdir()
        top.rmdir()


def _unmount_under(base: Path) -> None:
    for point in _mounts_under(base):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def _delete_netns(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def stop_engine(engine: Engine) -> None:
    """Leave nothing behind, step by step, each step tried even if an earlier one failed."""
    proc = engine.proc
    steps: list[Callable[[], None]] = [
        lambda: _stop_process(proc) if proc is not None else None,
        lambda: _kill_pidfile(engine.base / "e" / "containerd" / "containerd.pid"),
        lambda: _unmount_under(engine.base),
        lambda: _delete_netns(engine.netns),
        lambda: _remove_cgroups(engine.cgroup),
    ]
    errors: list[Exception] = []
    for step in steps:
        try:
            step()
        except Exception as exc:  # keep cleaning; report the first failure at the end
            errors.append(exc)
    if errors:
        raise errors[0]


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    base = Path(f"/tmp/otp-{secrets.token_hex(3)}")  # short: sockets live here
    (base / "area" / "sub").mkdir(parents=True)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def mount_area(workdir: Path) -> Path:
    return workdir / "area"


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def plugin(loop_thread: LoopThread, workdir: Path, mount_area: Path) -> Iterator[PolicyPlugin]:
    token = workdir.name.rsplit("-", 1)[-1]
    policy = PolicyPlugin(f"offload-policy-t{token}", mount_area)
    loop_thread.run(policy.start())
    try:
        yield policy
    finally:
        loop_thread.run(policy.stop())
        policy.socket_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def engine(workdir: Path, plugin: PolicyPlugin) -> Iterator[Engine]:
    # The plugin fixture runs first: dockerd refuses to start without its authorization plugin.
    engine = make_engine(workdir)
    try:
        start_engine(engine, plugin.name)
        yield engine
    finally:
        stop_engine(engine)


@pytest.fixture(scope="module")
def image(engine: Engine) -> str:
    return build_test_image(engine.host)


@pytest.fixture(scope="module")
def plain_engine() -> Iterator[Engine]:
    """The same dockerd, started the same way, without any authorization plugin."""
    base = Path(f"/tmp/otq-{secrets.token_hex(3)}")
    base.mkdir()
    engine = make_engine(base)
    try:
        start_engine(engine, None)
        yield engine
    finally:
        try:
            stop_engine(engine)
        finally:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def plain_image(plain_engine: Engine) -> str:
    return build_test_image(plain_engine.host)
