"""Helpers of the dashboard tests: a control plane served by uvicorn in a thread, a clock that
follows real time but can be moved forward, and `report_session`, which makes a session appear
the way a runner reports one, against any control plane URL."""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import asyncssh
import uvicorn
from fastapi import FastAPI

from offload.core import schemas as s
from offload.core.api_client import RunnerClient, UserClient
from offload.core.waiting import wait_until

T = TypeVar("T")


class LiveClock:
    """Real time plus an offset that tests move forward (a live server needs time to pass,
    e.g. between device-login polls; expiry tests jump ahead)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


class LiveServer:
    """`app` served on 127.0.0.1 on a free port, in a thread of the test process."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so, and without it
        # each answer on a kept-alive connection waits ~40 ms (Nagle against delayed ACKs).
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def start(self) -> LiveServer:
        self._thread.start()
        wait_until(lambda: self._server.started, 15, "the control plane to serve")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(15)
        self._socket.close()


def run(coro: Awaitable[T]) -> T:
    """Run async client code from a synchronous (browser) test.

    On a thread of its own: Playwright's sync API keeps an event loop in the test's thread."""

    async def _wrap() -> T:
        return await coro

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, _wrap()).result()


async def report_session(
    server_url: str,
    user_token: str,
    runner_token: str,
    images: tuple[str, ...] = ("busybox:latest",),
    containers: int = 1,
    gpu: s.GpuDevice | None = None,
) -> s.SessionInfo:
    """A session of the token's user, made active and reported the way a runner does it:
    start (`POST /sessions`), the runner binds an environment (`…/ready`), then its heartbeat
    reports the environment's containers and images.  Talks only HTTP, so it works against any
    control plane (the embedded one of the e2e suite too).  With `gpu`, the runner reports that
    (stand-in) GPU and the session is a GPU session on it."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    async with (
        RunnerClient(server_url, runner_token) as runner,
        UserClient(server_url, user_token) as user,
    ):
        host_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
        registered = await runner.register(
            s.RunnerRegister(
                name=f"web-test-{uuid.uuid4().hex[:8]}",
                ssh_host="127.0.0.1",
                ssh_port=8422,
                host_key=host_key.strip(),
                capacity=4,
                instance_types=[s.InstanceType.STANDARD, s.InstanceType.GPU],
                gpu_devices=[gpu] if gpu else [],
            )
        )
        created = await user.create_session(
            s.SessionCreate(
                client_public_key=key.export_public_key().decode().strip(),
                client_name="web-test-laptop",
                gpu=gpu is not None,
            )
        )
        runner_id = created.runner.id if created.runner else registered.id
        env_id = f"env-{created.id}"
        await runner.session_ready(runner_id, created.id, env_id)
        report = s.EnvironmentReport(
            env_id=env_id,
            session_id=created.id,
            state="bound",
            running_containers=containers,
            containers_total=containers,
            images=list(images),
        )
        await runner.heartbeat(
            runner_id, s.RunnerHeartbeat(capacity=4, warm=0, environments=[report])
        )
        return await user.get_session(created.id)
