"""The real docker CLI and docker-py through agent socket → tunnel → SSH endpoint → the
session's sandboxed dockerd."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import docker as docker_py
import pytest

from offload.core.waiting import wait_until
from offload.runner.environment import ISOLATION_LABEL
from tests.support.engines import LABELS_FORMAT, environment_id
from tests.support.images import write_build_context

from .support import Dockerd, Laptop, LoopThread, docker, docker_env, docker_ok

pytestmark = pytest.mark.slow


@pytest.fixture
def container(agent: Laptop, test_image: str) -> Iterator[str]:
    """A running container printing a numbered line every 0.1 s."""
    script = "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.1; done"
    cid = docker_ok(agent, "run", "-d", test_image, "sh", "-c", script).strip()
    yield cid
    docker(agent, "rm", "-f", cid)


def streaming(agent: Laptop, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["docker", "-H", agent.docker_host, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=docker_env(agent.home),
    )


def read_lines(proc: subprocess.Popen[bytes], count: int, timeout: float = 30) -> list[str]:
    """`count` lines from a streaming CLI, then stop it."""
    try:
        return read_lines_keep_running(proc, count, timeout)
    finally:
        proc.terminate()
        proc.wait(10)


def read_lines_keep_running(
    proc: subprocess.Popen[bytes], count: int, timeout: float = 30
) -> list[str]:
    """`count` lines from a streaming CLI; a watchdog kills it if it stalls."""
    assert proc.stdout is not None
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        return [proc.stdout.readline().decode() for _ in range(count)]
    finally:
        watchdog.cancel()


def test_version_and_ps(agent: Laptop, dockerd: Dockerd) -> None:
    assert docker_ok(agent, "version", "--format", "{{.Server.Version}}").startswith("20.10")
    assert "CONTAINER ID" in docker_ok(agent, "ps")
    # The engine behind the tunnel is the session's sandboxed one.
    labels = docker_ok(agent, "info", "--format", LABELS_FORMAT)
    assert environment_id(labels) == dockerd.env.id
    assert f"{ISOLATION_LABEL}=rootless" in json.loads(labels)


def test_build_then_run(agent: Laptop) -> None:
    context = write_build_context(agent.home / "ctx")
    docker_ok(agent, "build", "-q", "-t", "offload-test/built:tunnel", str(context))
    out = docker_ok(agent, "run", "--rm", "offload-test/built:tunnel")
    assert out == "hello from offload\n"
    docker_ok(agent, "rmi", "offload-test/built:tunnel")


def test_run_rm_output(agent: Laptop, test_image: str) -> None:
    out = docker_ok(agent, "run", "--rm", test_image, "sh", "-c", "echo out; echo err >&2")
    assert out == "out\n"


def test_run_interactive_stdin_half_close(agent: Laptop, test_image: str) -> None:
    # `cat` ends only when the CLI's CloseWrite reaches the container as EOF on its stdin.
    out = docker_ok(agent, "run", "-i", "--rm", test_image, "cat", input=b"hi\n")
    assert out == "hi\n"


def test_run_interactive_large_stdin(agent: Laptop, test_image: str) -> None:
    data = os.urandom(3 * 1024 * 1024)
    result = docker(agent, "run", "-i", "--rm", test_image, "md5sum", input=data)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().split()[0] == hashlib.md5(data).hexdigest()


def test_run_tty_under_pty(agent: Laptop, test_image: str) -> None:
    command = shlex.join(
        ["docker", "-H", agent.docker_host, "run", "-t", "--rm", test_image, "sh", "-c",
         "test -t 0 && echo tty-ok"]
    )  # fmt: skip
    result = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        capture_output=True,
        timeout=60,
        env=docker_env(agent.home),
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert "tty-ok" in result.stdout.decode()


def test_exec(agent: Laptop, container: str) -> None:
    assert docker_ok(agent, "exec", container, "echo", "from-exec") == "from-exec\n"
    assert docker_ok(agent, "exec", "-i", container, "cat", input=b"piped\n") == "piped\n"


def test_logs_follow_streams(agent: Laptop, container: str) -> None:
    lines = read_lines(streaming(agent, "logs", "-f", container), 5)
    assert lines[:2] == ["line0\n", "line1\n"]
    assert all(line.startswith("line") for line in lines)


def test_copy_both_ways(agent: Laptop, container: str) -> None:
    src = agent.home / "payload.bin"
    payload = os.urandom(2 * 1024 * 1024)
    src.write_bytes(payload)
    docker_ok(agent, "cp", str(src), f"{container}:/payload.bin")
    back = agent.home / "back"
    back.mkdir(exist_ok=True)
    docker_ok(agent, "cp", f"{container}:/payload.bin", str(back))
    assert (back / "payload.bin").read_bytes() == payload


def test_events_stream(agent: Laptop, test_image: str) -> None:
    proc = streaming(agent, "events", "--format", "{{.Type}} {{.Action}}")
    try:
        # The subscription is live once the CLI has its connection open: make an event after.
        wait_until(lambda: agent.proxy and agent.proxy.activity_snapshot().open_connections,
                   10, "the events stream to open")  # fmt: skip
        docker_ok(agent, "create", "--name", "ot-events", test_image)
        lines = read_lines(proc, 1)
    finally:
        docker(agent, "rm", "-f", "ot-events")
    assert lines == ["container create\n"]


def test_docker_py(agent: Laptop, test_image: str) -> None:
    client = docker_py.DockerClient(base_url=agent.docker_host, timeout=60)
    try:
        assert client.ping()
        assert client.containers.run(test_image, ["echo", "py"], remove=True) == b"py\n"
        assert any(test_image in image.tags for image in client.images.list())
    finally:
        client.close()


def test_streams_count_as_open_connections(agent: Laptop, container: str) -> None:
    assert agent.proxy is not None
    before = agent.proxy.activity_snapshot()
    proc = streaming(agent, "logs", "-f", container)
    try:
        read_lines_keep_running(proc, 1)

        def streaming_counted() -> bool:
            snap = agent.proxy.activity_snapshot()  # type: ignore[union-attr]
            return snap.total_connections > before.total_connections and snap.open_connections > 0

        wait_until(streaming_counted, 10, "the logs stream to count as an open connection")
    finally:
        proc.terminate()
        proc.wait(10)


def test_socket_permissions(agent: Laptop) -> None:
    assert Path(agent.socket).stat().st_mode & 0o777 == 0o600
    assert Path(agent.socket).parent.stat().st_mode & 0o777 == 0o700


def test_tunnel_engine_channel_streams(agent: Laptop, loop_thread: LoopThread) -> None:
    async def ping() -> bytes:
        assert agent.tunnel is not None
        reader, writer = await agent.tunnel.open_engine_channel()
        writer.write(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
        data = await reader.read()
        writer.close()
        return data

    assert loop_thread.run(ping()).endswith(b"\r\n\r\nOK")
