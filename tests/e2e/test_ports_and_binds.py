"""Issue 4 end to end: published ports and bind mounts behave as if the engine were local.

Real clients only: the docker CLI, docker-py and docker-compose 1.29 (its own venv,
`.venv-compose`, installed by scripts/test.sh), each talking to the user's agent. The laptop
side is this machine's loopback and a laptop directory under the test's tmp_path; the runner
side is the session's own engine in its own network namespace, so a port answering here can
only have come through the agent's forwarder, and a file can only reach the container through
the sync.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from offload.core.waiting import wait_until
from tests.e2e.conftest import User, started
from tests.integration.ports.support import build_udp_echo_image, free_ports, udp_echo_command
from tests.support.images import TEST_IMAGE

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
COMPOSE_APP = Path(__file__).parent / "compose"
COMPOSE = REPO / ".venv-compose" / "bin" / "docker-compose"
WAIT = 30.0  # bound of every wait on a condition here
HTTPD = ["httpd", "-f", "-p", "80", "-h", "/www"]
WEB = ["hello", *HTTPD]  # busybox httpd in the FROM scratch test image, serving /www


# ---- laptop-side probes ---------------------------------------------------------------------


def fetch(port: int, path: str = "/index.html") -> str | None:
    """The page at 127.0.0.1:port on the laptop, or None while nothing (or an error) answers."""
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
    except httpx.HTTPError:
        return None
    return answer.text if answer.status_code == 200 else None


def wait_serves(port: int, expected: str, what: str) -> None:
    wait_until(lambda: fetch(port) == expected, WAIT, f"{what} (127.0.0.1:{port})", 0.1)


def refused(port: int) -> bool:
    """True once nothing listens on the laptop port any more."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def wait_refused(port: int, what: str) -> None:
    wait_until(lambda: refused(port), WAIT, f"{what}: 127.0.0.1:{port} to stop listening", 0.1)


def udp_echoes(port: int, payload: bytes) -> bool:
    """One datagram to the laptop port; True if the echo comes back (UDP may drop: retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.sendto(payload, ("127.0.0.1", port))
        try:
            return sock.recv(65535) == payload
        except OSError:
            return False


def wait_file(path: Path, content: str, what: str) -> None:
    def holds() -> bool:
        try:
            return path.read_text() == content
        except OSError:
            return False

    wait_until(holds, WAIT, f"{what} ({path})", 0.1)


def site(directory: Path, page: str) -> Path:
    """A laptop directory holding index.html."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "index.html").write_text(page)
    return directory


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


# ---- what `offload status -f json` says -----------------------------------------------------


def status(user: User) -> dict[str, Any]:
    return json.loads(user.offload("status", "-f", "json").stdout)


def status_list(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """One of the lists `offload status -f json` shows about issue 4: `forwards` and
    `port_conflicts` (the agent's PortsSnapshot), `synced_paths` (SyncedPathStatus each)."""
    assert key in data, f"`offload status -f json` has no {key!r}: {sorted(data)}"
    return list(data[key])


def sync_state(user: User, laptop_dir: Path) -> dict[str, Any] | None:
    entries = status_list(status(user), "synced_paths")
    entries = [e for e in entries if e["laptop_path"] == str(laptop_dir)]
    return entries[0] if entries else None


def wait_synced(user: User, laptop_dir: Path) -> dict[str, Any]:
    def synced() -> dict[str, Any] | None:
        entry = sync_state(user, laptop_dir)
        return entry if entry and entry.get("state") == "synced" else None

    return wait_until(synced, WAIT, f"`offload status` to show {laptop_dir} synced", 0.2)


# ---- docker CLI: published ports ------------------------------------------------------------


def test_published_ports_several_range_random_and_stop_start(
    make_user, hello_context: Path
) -> None:
    user = started(make_user(), hello_context)
    single, low, high = free_ports(3)
    name = unique("web")
    # One httpd per container port, each serving a page that names it.
    script = (
        "for p in 80 81 82 83; do mkdir -p /www$p && echo port$p > /www$p/index.html; done;"
        " for p in 81 82 83; do httpd -p $p -h /www$p; done; exec httpd -f -p 80 -h /www80"
    )
    user.docker(
        "run", "-d", "--name", name, "-p", f"{single}:80", "-p", f"{low}-{high}:81-82",
        "--expose", "83", "-P", "hello", "sh", "-c", script,
    )  # fmt: skip
    wait_serves(single, "port80\n", "-p HOST:80")
    wait_serves(low, "port81\n", "first port of a range")
    wait_serves(high, "port82\n", "last port of a range")
    # curl as a developer would, besides httpx.
    url = f"http://127.0.0.1:{single}/index.html"
    curl = subprocess.run(["curl", "-sf", url], capture_output=True, text=True, timeout=30)
    assert curl.stdout == "port80\n", curl.stderr
    expected = {("tcp", single, 80), ("tcp", low, 81), ("tcp", high, 82)}

    def shown() -> bool:  # the agent writes its state file on its own beat
        forwards = status_list(status(user), "forwards")
        return expected <= {(f["proto"], f["port"], f["private_port"]) for f in forwards}

    wait_until(shown, WAIT, f"`offload status` to list the forwards {expected}", 0.2)

    random_port = _random_port(user, name)
    assert random_port not in (single, low, high)
    wait_serves(random_port, "port83\n", "-P random port read from `docker port`")

    user.docker("stop", "-t", "1", name)
    for port in (single, low, high, random_port):
        wait_refused(port, "after docker stop")
    user.docker("start", name)
    wait_serves(single, "port80\n", "forward back after docker start")
    wait_serves(high, "port82\n", "range back after docker start")


def _random_port(user: User, name: str) -> int:
    """The host port `-P` picked for the exposed 83/tcp, as `docker port` prints it
    (`0.0.0.0:49153`, and `[::]:49153` where the engine has IPv6)."""
    lines = user.docker("port", name, "83/tcp").stdout.split()
    ports = {int(line.rsplit(":", 1)[1]) for line in lines}
    assert len(ports) == 1, lines
    return ports.pop()


def test_udp_published_port_echoes(make_user, hello_context: Path) -> None:
    user = started(make_user(), hello_context)
    user.docker("tag", "hello", TEST_IMAGE)  # the UDP echo image builds FROM it
    image = build_udp_echo_image(f"unix://{user.agent_socket}")
    (port,) = free_ports(1)
    user.docker(
        "run", "-d", "--name", unique("echo"), "-p", f"{port}:7/udp", image, *udp_echo_command(7)
    )
    wait_until(lambda: udp_echoes(port, b"ping-1"), WAIT, f"a UDP echo on 127.0.0.1:{port}", 0.1)
    assert wait_until(lambda: udp_echoes(port, b"x" * 1400), WAIT, "a 1400-byte datagram", 0.1)


def test_taken_laptop_port_is_reported_and_nothing_else_breaks(
    make_user, hello_context: Path
) -> None:
    user = started(make_user(), hello_context)
    taken, free = free_ports(2)
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("0.0.0.0", taken))
    blocker.listen()
    try:
        wanted = unique("wants-taken")
        # The engine is remote: it binds the port in the session, so docker run succeeds.
        user.docker("run", "-d", "--name", wanted, "-p", f"{taken}:80", "hello", *_serve("a"))
        other = unique("other")
        user.docker("run", "-d", "--name", other, "-p", f"{free}:80", "hello", *_serve("b"))
        wait_serves(free, "b\n", "the other container's port")

        def conflict() -> dict[str, Any] | None:
            conflicts = status_list(status(user), "port_conflicts")
            return next((c for c in conflicts if c["port"] == taken), None)

        reported = wait_until(conflict, WAIT, f"`offload status` to report port {taken} taken")
        assert reported["container_name"].lstrip("/") == wanted
        assert reported.get("reason")
        assert status(user)["agent"]["connected"]
        assert user.docker("run", "--rm", "hello").stdout.strip() == "hello from offload"
    finally:
        blocker.close()
    # Once the laptop port is free, the next change the agent hears of retries it.
    user.docker("run", "--rm", "hello", "true")
    wait_serves(taken, "a\n", "the once-taken port after it was freed")


def _serve(page: str) -> list[str]:
    return ["sh", "-c", f"mkdir -p /www && echo {page} > /www/index.html && exec {' '.join(HTTPD)}"]


# ---- docker CLI: bind mounts ----------------------------------------------------------------


def test_bind_mount_serves_laptop_files_both_ways(
    make_user, hello_context: Path, tmp_path: Path
) -> None:
    user = started(make_user(), hello_context)
    laptop = site(tmp_path / "site", "from the laptop v1\n")
    (port,) = free_ports(1)
    name = unique("bind")
    user.docker("run", "-d", "--name", name, "-v", f"{laptop}:/www", "-p", f"{port}:80", *WEB)
    wait_serves(port, "from the laptop v1\n", "the laptop's file through the forwarded port")

    (laptop / "index.html").write_text("edited on the laptop v2\n")
    wait_serves(port, "edited on the laptop v2\n", "the laptop edit inside the container")

    user.docker("exec", name, "sh", "-c", "echo from-container > /www/new.txt")
    wait_file(laptop / "new.txt", "from-container\n", "a container write back on the laptop")

    entry = wait_synced(user, laptop)
    assert entry["read_only"] is False


def test_read_only_bind_is_one_way(make_user, hello_context: Path, tmp_path: Path) -> None:
    user = started(make_user(), hello_context)
    laptop = site(tmp_path / "ro-site", "read only v1\n")
    (port,) = free_ports(1)
    name = unique("ro")
    user.docker("run", "-d", "--name", name, "-v", f"{laptop}:/www:ro", "-p", f"{port}:80", *WEB)
    wait_serves(port, "read only v1\n", "the laptop's file through a read-only bind")

    write = user.docker("exec", name, "sh", "-c", "echo x > /www/new.txt", check=False)
    assert write.returncode != 0
    assert "read-only" in write.stderr.lower(), write.stderr
    (laptop / "index.html").write_text("read only v2\n")
    wait_serves(port, "read only v2\n", "a laptop edit through a read-only bind")
    assert not (laptop / "new.txt").exists()
    assert wait_synced(user, laptop)["read_only"] is True


def test_the_docker_socket_mounted_into_a_container_is_the_session_engine(
    make_user, hello_context: Path
) -> None:
    """CI jobs and testcontainers mount /var/run/docker.sock to drive "the" engine: inside an
    Offload session that is the session's own engine (a socket), not a laptop file."""
    user = started(make_user(), hello_context)
    probe = ["test", "-S", "/var/run/docker.sock"]
    run = user.docker(
        "run", "--rm", "-v", "/var/run/docker.sock:/var/run/docker.sock", "hello", *probe
    )  # fmt: skip
    assert run.returncode == 0, run.stderr


# ---- docker-py ------------------------------------------------------------------------------


def test_docker_py_ports_and_bind(make_user, hello_context: Path, tmp_path: Path) -> None:
    import docker

    user = started(make_user(), hello_context)
    laptop = site(tmp_path / "py-site", "docker-py v1\n")
    (port,) = free_ports(1)
    client = docker.from_env(environment={"DOCKER_HOST": f"unix://{user.agent_socket}"})
    try:
        container = client.containers.run(
            "hello",
            HTTPD,
            detach=True,
            name=unique("py"),
            ports={"80/tcp": port},
            volumes={str(laptop): {"bind": "/www", "mode": "rw"}},
        )
        wait_serves(port, "docker-py v1\n", "docker-py's published port")
        (laptop / "index.html").write_text("docker-py v2\n")
        wait_serves(port, "docker-py v2\n", "a laptop edit under docker-py")
        code, _ = container.exec_run(["sh", "-c", "echo py > /www/py.txt"])
        assert code == 0
        wait_file(laptop / "py.txt", "py\n", "a docker-py exec write on the laptop")
        container.remove(force=True)
        wait_refused(port, "after docker-py removed the container")
    finally:
        client.close()


# ---- docker-compose 1.29 --------------------------------------------------------------------


def test_compose_two_services_ports_binds_and_network(
    make_user, hello_context: Path, tmp_path: Path
) -> None:
    if not COMPOSE.exists():
        pytest.fail(
            f"{COMPOSE} is missing: run scripts/test.sh, which installs docker-compose 1.29"
        )
    user = started(make_user(), hello_context)
    app = tmp_path / "app"
    shutil.copytree(COMPOSE_APP, app)
    (app / "out").mkdir()
    (port,) = free_ports(1)
    env = {"HELLO_CONTEXT": str(hello_context), "WEB_PORT": str(port)}

    def compose(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        argv = [str(COMPOSE), "-p", "e2eapp", "-f", str(app / "docker-compose.yml"), *args]
        return user.run(*argv, env_extra=env, timeout=180, **kwargs)

    compose("up", "-d")
    try:
        wait_serves(port, "compose v1\n", "compose web's published port")
        fetched = compose("exec", "-T", "client", "wget", "-q", "-O", "-", "http://web/index.html")
        assert fetched.stdout == "compose v1\n"
        wait_file(app / "out" / "seen.html", "compose v1\n", "the client's fetch on the laptop")

        (app / "site" / "index.html").write_text("compose v2\n")
        wait_serves(port, "compose v2\n", "a laptop edit served by compose web")
        wait_file(app / "out" / "seen.html", "compose v2\n", "the client seeing the edit")
    finally:
        compose("down", "-t", "1", check=False)
    wait_refused(port, "after docker-compose down")
