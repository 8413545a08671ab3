"""Published ports and laptop bind mounts through the real agent (`run_agent`) and the real
runner endpoint (`SSHEndpoint`), with a real control plane and a real session environment
(`RootlessDriver`: its network namespace, its mount area): the docker CLI on the "laptop" runs
`docker run -p …` and `docker run -v "$PWD":…` and sees them behave as if local."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from offload.agent.daemon import run_agent
from offload.agent.keeper import AgentSettings
from offload.agent.state import AgentState, SessionFile, read_model
from offload.cli import session_ops
from offload.core.api_client import UserClient
from offload.core.client_paths import ClientPaths
from offload.core.waiting import wait_until
from offload.sync.status import SyncState
from tests.integration.ports.support import build_udp_echo_image
from tests.support.engines import environment_id
from tests.support.net import free_port as _free_port

from .control_plane import LiveControlPlane as Deployment
from .control_plane import laptop_with_session, live_control_plane
from .support import Dockerd, Laptop, LoopThread, docker, docker_ok

pytestmark = pytest.mark.slow

PAGE = "hello through the forward"


@pytest.fixture(scope="module")
def deployment(loop_thread: LoopThread, dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:  # fmt: skip
    """A control plane and a runner endpoint whose sessions all get the test environment: its
    network namespace, its mount area (owned by the sandbox's root)."""
    with live_control_plane(
        loop_thread, dockerd, tmp_path_factory.mktemp("server"), "wired-test"
    ) as live:
        yield live


@dataclass
class Agent:
    laptop: Laptop
    paths: ClientPaths
    session: SessionFile

    def state(self) -> AgentState | None:
        return read_model(self.paths.agent_state_file, AgentState)


@pytest.fixture
def agent(loop_thread: LoopThread, deployment: Deployment) -> Iterator[Agent]:
    """What `docker offload start` leaves behind, and `run_agent` serving it (a fresh session)."""
    laptop, paths, session_file = laptop_with_session(loop_thread, deployment)
    stop = asyncio.Event()
    task = asyncio.run_coroutine_threadsafe(
        run_agent(
            paths,
            stop,
            tunnel_options={"backoff_initial_s": 0.05, "backoff_max_s": 0.3},
            # Polls often, so that an idle session is noticed (and suspended) quickly.
            settings=AgentSettings(poll_interval_s=0.3, unpause_wait_s=0),
        ),
        loop_thread.loop,
    )
    agent = Agent(laptop, paths, session_file)
    try:
        wait_until(lambda: (s := agent.state()) and s.connected, 30, "the agent to connect")
        yield agent
    finally:
        loop_thread.loop.call_soon_threadsafe(stop.set)
        task.result(30)

        async def end() -> None:
            async with UserClient(deployment.url, deployment.admin_token) as client:
                await client.stop_session(session_file.session.id)

        loop_thread.run(end())
        shutil.rmtree(laptop.home, ignore_errors=True)


@pytest.fixture
def names(agent: Agent) -> Iterator[list[str]]:
    """Container names to remove at the end, whatever happened."""
    made: list[str] = []
    yield made
    if made:
        docker(agent.laptop, "rm", "-f", *made)


def _serves(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /index.html HTTP/1.0\r\nHost: test\r\n\r\n")
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
    except OSError:
        return False
    return answer.startswith(b"HTTP/1.") and answer.endswith(PAGE.encode())


def _httpd(image: str, port: int) -> list[str]:
    page = f"mkdir -p /www && echo -n '{PAGE}' > /www/index.html"
    return [image, "sh", "-c", f"{page} && httpd -p {port} -h /www && exec sleep 3600"]


def _status(loop_thread: LoopThread, agent: Agent) -> dict:  # type: ignore[type-arg]
    return loop_thread.run(session_ops.status(agent.paths))


# ---- published ports --------------------------------------------------------------------------


def test_a_published_port_is_reachable_on_the_laptop(
    loop_thread: LoopThread, agent: Agent, test_image: str, names: list[str]
) -> None:
    port = _free_port()
    name = f"web-{uuid.uuid4().hex[:6]}"
    names.append(name)
    docker_ok(
        agent.laptop, "run", "-d", "--name", name, "-p", f"{port}:80", *_httpd(test_image, 80)
    )

    wait_until(lambda: _serves(port), 30, f"the page on the laptop's port {port}")
    wait_until(
        lambda: (s := agent.state()) is not None and s.ports is not None
        and any(f.port == port for f in s.ports.forwards),
        10, "the forward in the agent's state",
    )  # fmt: skip
    status = _status(loop_thread, agent)
    assert [f["port"] for f in status["forwards"]] == [port, port] or [
        f["port"] for f in status["forwards"]
    ] == [port]  # 0.0.0.0, and :: where the machine has IPv6
    assert status["forwards"][0]["container_name"] == name
    assert status["port_conflicts"] == []

    # The container goes away: so does the laptop's listener.
    docker_ok(agent.laptop, "rm", "-f", name)
    wait_until(lambda: not _listening(port), 30, "the forward to be removed")


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def test_a_port_taken_on_the_laptop_is_a_conflict_not_a_failure(
    loop_thread: LoopThread, agent: Agent, test_image: str, names: list[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        name = f"web-{uuid.uuid4().hex[:6]}"
        names.append(name)
        docker_ok(agent.laptop, "run", "-d", "--name", name, "-p", f"{port}:80", *_httpd(test_image, 80))  # fmt: skip
        wait_until(
            lambda: any(c["port"] == port for c in _status(loop_thread, agent)["port_conflicts"]),
            30, "the conflict in `offload status`",
        )  # fmt: skip
        conflict = _status(loop_thread, agent)["port_conflicts"][0]
        assert conflict["container_name"] == name and "in use" in conflict["reason"]
    # Freed: the next re-list (a container event) forwards it.
    names.append(f"nudge-{uuid.uuid4().hex[:6]}")
    docker_ok(agent.laptop, "run", "-d", "--name", names[-1], test_image, "sleep", "3600")
    wait_until(lambda: _serves(port), 30, "the port forwarded once free")


def test_the_endpoint_refuses_ports_the_session_does_not_publish(
    loop_thread: LoopThread, deployment: Deployment, agent: Agent, test_image: str,
    names: list[str],
) -> None:  # fmt: skip
    published, hidden = _free_port(), _free_port()
    web = f"web-{uuid.uuid4().hex[:6]}"
    # Listening in the session's namespace (host network) without publishing anything.
    quiet = f"quiet-{uuid.uuid4().hex[:6]}"
    names += [web, quiet]
    docker_ok(agent.laptop, "run", "-d", "--name", web, "-p", f"{published}:80", *_httpd(test_image, 80))  # fmt: skip
    docker_ok(agent.laptop, "run", "-d", "--name", quiet, "--network", "host", *_httpd(test_image, hidden))  # fmt: skip
    wait_until(lambda: _serves(published), 30, "the published port")
    assert agent.session.session.certificate is not None
    cert = asyncssh.import_certificate(agent.session.session.certificate)

    async def attempts() -> list[str]:
        conn = await asyncssh.connect(
            "127.0.0.1",
            deployment.endpoint.port,
            username=agent.session.session.id,
            known_hosts=([asyncssh.import_public_key(deployment.endpoint.host_public_key)], [], []),
            client_keys=[(agent.laptop.key, cert)],
            agent_path=None,
            config=[],
        )
        refusals = []
        try:
            for host, port in [
                ("127.0.0.1", hidden),  # listening there, but not published
                ("127.0.0.1", _free_port()),  # nothing at all
                ("10.1.2.3", published),  # published, but only loopback is a destination
            ]:
                try:
                    _, writer = await conn.open_connection(host, port)
                    writer.close()
                    refusals.append("opened")
                except asyncssh.ChannelOpenError as exc:
                    refusals.append(exc.reason)
            try:
                await conn.open_unix_connection(f"/udp/{published}")  # published for TCP only
                refusals.append("opened")
            except asyncssh.ChannelOpenError as exc:
                refusals.append(exc.reason)
            reader, writer = await conn.open_connection("127.0.0.1", published)
            writer.write(b"GET /index.html HTTP/1.0\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            refusals.append("page" if answer.endswith(PAGE.encode()) else "no page")
        finally:
            conn.close()
            await conn.wait_closed()
        return refusals

    hidden_reason, nothing_reason, remote_reason, udp_reason, page = loop_thread.run(attempts())
    assert "not published" in hidden_reason
    assert "not published" in nothing_reason
    assert "127.0.0.1 only" in remote_reason
    assert "not published" in udp_reason
    assert page == "page"


def test_a_forwarded_connection_resumes_an_idle_session(
    loop_thread: LoopThread, deployment: Deployment, agent: Agent, test_image: str,
    names: list[str],
) -> None:  # fmt: skip
    port = _free_port()
    names.append(f"web-{uuid.uuid4().hex[:6]}")
    docker_ok(agent.laptop, "run", "-d", "--name", names[-1], "-p", f"{port}:80", *_httpd(test_image, 80))  # fmt: skip
    wait_until(lambda: _serves(port), 30, "the page on the laptop")
    # Everything reported (an unreported request would resume the session at once), then idle.
    wait_until(lambda: (s := agent.state()) and s.activity_quiet, 30, "activity to be reported")

    async def go_idle() -> None:
        async with UserClient(deployment.url, deployment.admin_token) as client:
            await client.idle_session(agent.session.session.id)

    loop_thread.run(go_idle())
    wait_until(lambda: (s := agent.state()) and s.suspended, 30, "the tunnel to be suspended")
    assert _listening(port)  # the laptop keeps the forward while the session is idle

    # Someone opens the page: the session resumes and the page comes.
    assert _serves(port)
    state = agent.state()
    assert state is not None and not state.suspended and state.connected
    wait_until(
        lambda: _status(loop_thread, agent)["state"] == "Started (Active)", 30, "the session active"
    )


# ---- bind mounts --------------------------------------------------------------------------


def test_a_laptop_bind_mount_works_both_ways(
    loop_thread: LoopThread, deployment: Deployment, agent: Agent, test_image: str,
    dockerd: Dockerd,
) -> None:  # fmt: skip
    project = agent.laptop.home / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "hello.txt").write_text("hello from the laptop\n")

    out = docker_ok(agent.laptop, "run", "--rm", "-v", f"{project}:/app", test_image, "cat", "/app/src/hello.txt")  # fmt: skip
    assert out == "hello from the laptop\n"

    # A container's write comes back to the laptop.
    docker_ok(agent.laptop, "run", "--rm", "-v", f"{project}:/app", test_image, "sh", "-c", "echo made in the container > /app/out.txt")  # fmt: skip
    wait_until(
        lambda: (project / "out.txt").is_file()
        and (project / "out.txt").read_text() == "made in the container\n",
        30, "the container's file on the laptop",
    )  # fmt: skip

    # An edit on the laptop reaches the runner; the next run sees it (also through a second,
    # read-only bind of a subdirectory, synced on its own).
    (project / "src" / "hello.txt").write_text("edited\n")
    wait_until(
        lambda: [p.read_text() for p in deployment.mount_area.glob("*/src/hello.txt")]
        == ["edited\n"],
        30, "the edit in the mount area",
    )  # fmt: skip
    out = docker_ok(agent.laptop, "run", "--rm", "-v", f"{project}/src:/src:ro", "-v", f"{project}:/app", test_image, "cat", "/app/src/hello.txt", "/src/hello.txt")  # fmt: skip
    assert out == "edited\nedited\n"

    # The files live in the session's mount area on the runner, nowhere else.
    assert any(deployment.mount_area.glob("*/src/hello.txt"))
    wait_until(
        lambda: len(_status(loop_thread, agent)["synced_paths"]) == 2, 10,
        "both synced paths in `offload status`",
    )  # fmt: skip
    synced = {p["laptop_path"]: p for p in _status(loop_thread, agent)["synced_paths"]}
    assert synced[f"{project}/src"]["read_only"] is True
    assert synced[str(project)]["state"] in (SyncState.SYNCED, SyncState.PENDING)
    assert synced[str(project)]["remote_path"].startswith(str(deployment.mount_area))
    # What the sync made there belongs to the sandbox's root (so containers may change it).
    remote = Path(synced[str(project)]["remote_path"])
    owners = {(q.stat().st_uid, q.stat().st_gid) for q in [remote, *remote.rglob("*")]}
    assert owners == {dockerd.env.area_owner}


# Busybox has no client for a unix socket: Perl's builtins make the request.
GET_INFO_FROM_THE_DOCKER_SOCKET = (
    'socket(S,1,1,0)||die"socket: $!";'  # AF_UNIX, SOCK_STREAM
    'connect(S,pack("Sa108",1,"/var/run/docker.sock"))||die"connect: $!";'
    'syswrite(S,"GET /info HTTP/1.0\\r\\nHost: docker\\r\\n\\r\\n");'
    "print $b while sysread(S,$b,65536);"
)


def test_the_docker_socket_in_a_container_is_the_sessions_engine(
    agent: Agent, dockerd: Dockerd
) -> None:
    """`-v /var/run/docker.sock:/var/run/docker.sock` (CI jobs, testcontainers) reaches the
    session's own engine inside the sandbox, not a laptop file."""
    image = build_udp_echo_image(dockerd.host)  # the test image with perl
    out = docker_ok(
        agent.laptop, "run", "--rm", "-v", "/var/run/docker.sock:/var/run/docker.sock",
        image, "perl", "-e", GET_INFO_FROM_THE_DOCKER_SOCKET,
    )  # fmt: skip
    head, _, body = out.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.") and " 200 " in head.splitlines()[0], head
    assert environment_id(json.loads(body)["Labels"]) == dockerd.env.id


def test_a_bad_bind_is_the_docker_clis_error(agent: Agent, test_image: str) -> None:
    missing = agent.laptop.home / "no-such-dir"
    result = docker(agent.laptop, "run", "--rm", "--mount", f"type=bind,src={missing},dst=/x", test_image, "true")  # fmt: skip
    assert result.returncode != 0
    stderr = result.stderr.decode()
    assert "Error response from daemon: Offload:" in stderr
    assert "bind source path does not exist" in stderr
    # The connection is not broken for the next command.
    docker_ok(agent.laptop, "ps")


def test_a_failed_sync_is_the_docker_clis_error(
    deployment: Deployment, agent: Agent, test_image: str
) -> None:
    """The runner cannot write its mount area (here: it is not a directory any more)."""
    project = agent.laptop.home / "unsyncable"
    project.mkdir()
    aside = deployment.mount_area.with_name(deployment.mount_area.name + "-aside")
    deployment.mount_area.rename(aside)
    deployment.mount_area.write_text("not a directory")
    try:
        result = docker(agent.laptop, "run", "--rm", "-v", f"{project}:/app", test_image, "true")
    finally:
        deployment.mount_area.unlink()
        aside.rename(deployment.mount_area)
    assert result.returncode != 0
    stderr = result.stderr.decode()
    assert "Error response from daemon: Offload: could not sync" in stderr, stderr
    assert str(project) in stderr
