"""Sandboxed engines end to end: egress to "the internet", refusals, and local-Docker fidelity.

Everything goes through Offload as a developer uses it: `docker offload start`, then the real
docker CLI (and docker-py, docker-compose 1.29) talking to the user's agent, the session's
rootless engine on the runner, its containers' traffic through the network helper (pasta) and
the runner's egress rules.

"The internet" is a network namespace of this module's own at 198.51.100.10 (TEST-NET-2) with a
real registry (Debian's `docker-registry`, plain HTTP on :5000) and a web server standing for a
package mirror (:8080). A second namespace holds private addresses: 10.213.9.1 (refused to
sandboxes) and 10.213.10.1 (in `OFFLOAD_RUNNER_EGRESS_ALLOW`). Nothing leaves this machine.

This module runs its own deployment (`offload up`), overriding conftest's `deployment`: its
runner needs `OFFLOAD_RUNNER_DOCKERD_CONFIG` (the registry is insecure, as local Docker would
need too) and `OFFLOAD_RUNNER_EGRESS_ALLOW`, and an identity range of its own so that it can
run next to the shared deployment.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import docker
import pytest

from offload.core.waiting import wait_until
from tests.e2e.conftest import (
    Deployment,
    User,
    embedded_deployment,
    signed_in_user,
    started,
)
from tests.support.internet import (
    Netns,
    http_server,
    internet,
    private_lan,
    requests_logged,
    tcp_answers,
)
from tests.support.registry import Registry, start_registry

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / ".venv-compose" / "bin" / "docker-compose"
DEBIAN_DOCKER = Path("/usr/bin/docker")  # 20.10, BuildKit built in
REGISTRY_PORT = 5000
MIRROR_PORT = 8080
LAN_PORT = 8080
REFUSED_LAN = "10.213.9.1"  # private: refused to sandboxes
ALLOWED_LAN = "10.213.10.1"  # private, but listed in OFFLOAD_RUNNER_EGRESS_ALLOW
ALLOWED_RANGE = "10.213.10.0/24"
PKG = "pkg.txt"
PKG_CONTENT = "offload-mirror-package 1.2.3\n"
WAIT = 60.0  # bound of each wait on a condition
SANDBOX_DNS = "10.0.2.3"  # the network helper's DNS forwarder
CAP_AUDIT_READ = 37
# Every process's name; a process that ends between the glob and the read is skipped.
COMMS = "cat /proc/[0-9]*/comm 2>/dev/null || true"


# ---- the module's world: internet, private LAN, deployment -----------------------------------


@dataclass(frozen=True)
class World:
    internet: Netns
    lan: Netns
    registry: Registry
    mirror_log: Path
    lan_log: Path

    @property
    def address(self) -> str:
        """The internet's address (198.51.100.10)."""
        return self.internet.address

    @property
    def host_side(self) -> str:
        """The runner host's own address on the internet's veth (198.51.100.1)."""
        return self.internet.host_side

    @property
    def image(self) -> str:
        return f"{self.registry.host}/team/bb:1"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("internet")
    site = work / "site"
    site.mkdir()
    (site / PKG).write_text(PKG_CONTENT)
    with (
        internet() as net,
        private_lan(
            [(f"{REFUSED_LAN}/24", "10.213.9.2/24"), (f"{ALLOWED_LAN}/24", "10.213.10.2/24")]
        ) as lan,
    ):
        registry = start_registry(net, net.address, REGISTRY_PORT, work / "registry")
        mirror_log = work / "mirror.log"
        http_server(net, net.address, MIRROR_PORT, site, mirror_log)
        lan_log = work / "lan.log"
        http_server(lan, "0.0.0.0", LAN_PORT, site, lan_log)
        yield World(net, lan, registry, mirror_log, lan_log)


@pytest.fixture(scope="module")
def deployment(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """This module's deployment (overrides conftest's): the runner's daemon.json trusts the
    plain-HTTP registry, and one private range is allowed."""
    runner_env = {
        # Both spellings, as a local dockerd 20.10 needs them: with "host:port" alone, BuildKit's
        # FROM still speaks HTTPS to it (measured: `Head "https://…/v2/team/bb/manifests/1":
        # http: server gave HTTP response to HTTPS client`; moby's Daemon.RegistryHosts marks
        # an entry plain HTTP only from an http:// scheme); the classic pull/push path reads both.
        "OFFLOAD_RUNNER_DOCKERD_CONFIG": json.dumps(
            {"insecure-registries": [world.registry.host, f"http://{world.registry.host}"]}
        ),
        "OFFLOAD_RUNNER_EGRESS_ALLOW": ALLOWED_RANGE,
    }
    home = tmp_path_factory.mktemp("egress-admin")
    with embedded_deployment(home, "eg", runner_env) as deployment:
        yield deployment


def _new_user(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> User:
    return signed_in_user(deployment, tmp_path_factory, "pub")


@dataclass(frozen=True)
class Published:
    image: str
    push_output: str
    local_digest: str  # RepoDigests of the pushing engine


@pytest.fixture(scope="module")
def published(
    world: World,
    deployment: Deployment,
    hello_context: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Published]:
    """A publisher's session builds the busybox test image, tags it into the registry and
    pushes it; then the session is stopped (its engine wiped), so every later use of the image
    comes from the registry."""
    user = _new_user(deployment, tmp_path_factory)
    try:
        started(user, hello_context)
        user.docker("tag", "hello", world.image)
        pushed = user.docker("push", world.image, timeout=300)
        digest = user.docker(
            "image", "inspect", "--format", "{{json .RepoDigests}}", world.image
        ).stdout
        (repo_digest,) = json.loads(digest)
    finally:
        user.offload("stop", "--force", check=False, timeout=60)
    yield Published(world.image, pushed.stdout + pushed.stderr, repo_digest.split("@", 1)[1])


# ---- registry: push, pull, implicit pull, compose -------------------------------------------


def test_push_reaches_the_registry(world: World, published: Published) -> None:
    assert world.registry.tags("team/bb") == ["1"]
    assert world.registry.manifest_digest("team/bb", "1") == published.local_digest
    assert f"1: digest: {published.local_digest}" in published.push_output
    # The manifest came from the session's engine, through the runner host's side of the veth.
    (put,) = world.registry.access_log("PUT", "/v2/team/bb/manifests/1")
    assert put.startswith(f"{world.host_side} - - ")
    assert '" 201 ' in put and '"docker/' in put and "UpstreamClient(Docker-Client/" in put


def test_fresh_session_pulls_runs_and_composes(
    world: World, published: Published, make_user, tmp_path: Path
) -> None:
    user = make_user()
    user.docker("offload", "start", "--timeout", "60s")
    image = published.image
    # Not there yet: `docker run` pulls it, as a local engine does.
    absent = user.docker("image", "inspect", image, check=False)
    assert absent.returncode != 0 and "No such image" in absent.stderr
    ran = user.docker("run", "--rm", image, "echo", "hi", timeout=300)
    assert ran.stdout == "hi\n"
    assert f"Unable to find image '{image}' locally" in ran.stderr
    assert f"Digest: {published.local_digest}" in ran.stderr

    user.docker("image", "rm", image)
    pulled = user.docker("pull", image, timeout=300)
    assert f"Digest: {published.local_digest}" in pulled.stdout
    assert f"Downloaded newer image for {image}" in pulled.stdout
    inspected = user.docker("image", "inspect", "--format", "{{json .RepoDigests}}", image)
    assert json.loads(inspected.stdout) == [
        f"{world.registry.host}/team/bb@{published.local_digest}"
    ]

    if not COMPOSE.exists():
        pytest.fail(
            f"{COMPOSE} is missing: run scripts/test.sh, which installs docker-compose 1.29"
        )
    user.docker("image", "rm", image)
    app = tmp_path / "app"
    app.mkdir()
    (app / "docker-compose.yml").write_text(
        f'version: "3.8"\nservices:\n  hi:\n    image: {image}\n    command: ["echo", "hi from compose"]\n'
    )
    compose = [str(COMPOSE), "-p", "egress", "-f", str(app / "docker-compose.yml")]
    pull = user.run(*compose, "pull", timeout=300)
    assert "Pulling hi" in pull.stdout + pull.stderr
    user.docker("image", "inspect", image)  # now on the session's engine
    try:
        up = user.run(*compose, "up", "--no-color", "--abort-on-container-exit", timeout=300)
        assert "hi from compose" in up.stdout
    finally:
        user.run(*compose, "down", "-t", "1", check=False, timeout=120)


# ---- builds that fetch from a package mirror ------------------------------------------------

FETCH_DOCKERFILE = """\
FROM {image}
RUN wget -O /f http://{mirror}:{port}/{pkg} && cat /f
CMD ["cat", "/f"]
"""


def _fetch_context(directory: Path, image: str, mirror: str, marker: str) -> Path:
    directory.mkdir(parents=True)
    # A marker in the Dockerfile makes each build's RUN step new (no cache from an earlier run).
    (directory / "Dockerfile").write_text(
        f"# {marker}\n"
        + FETCH_DOCKERFILE.format(image=image, mirror=mirror, port=MIRROR_PORT, pkg=PKG)
    )
    return directory


@pytest.mark.parametrize("builder", ["legacy", "buildkit"])
def test_build_fetches_from_the_mirror(
    world: World, published: Published, make_user, tmp_path: Path, builder: str
) -> None:
    if builder == "buildkit" and not DEBIAN_DOCKER.exists():
        pytest.skip(f"{DEBIAN_DOCKER} (Debian's docker.io CLI, BuildKit built in) is not installed")
    user = make_user()
    user.docker("offload", "start", "--timeout", "60s")
    marker = uuid.uuid4().hex
    context = _fetch_context(tmp_path / "ctx", published.image, world.address, marker)
    tag = f"fetched-{builder}"
    before = len(requests_logged(world.mirror_log, f"/{PKG}"))
    if builder == "legacy":
        built = user.docker(
            "build", "-t", tag, str(context), timeout=300, env_extra={"DOCKER_BUILDKIT": "0"}
        )
        output = built.stdout
    else:
        built = user.run(
            str(DEBIAN_DOCKER), "build", "--progress=plain", "-t", tag, str(context),
            timeout=300, env_extra={"DOCKER_BUILDKIT": "1"},
        )  # fmt: skip
        output = built.stderr  # BuildKit's progress goes to stderr
    assert PKG_CONTENT.strip() in output, output
    assert user.docker("run", "--rm", tag).stdout == PKG_CONTENT
    # The mirror served it (and the request came through the runner host's side of its veth).
    served = requests_logged(world.mirror_log, f"/{PKG}")
    assert len(served) == before + 1, served
    assert served[-1].startswith(world.host_side + " ")


# ---- DNS -----------------------------------------------------------------------------------


def test_containers_resolve_through_the_helpers_dns(make_user, hello_context: Path) -> None:
    """Containers' resolver is the network helper's forwarder (10.0.2.3), as in Docker's rootless
    mode.

    Resolving a name through it is not tested: pasta (like slirp4netns) forwards 10.0.2.3 to the
    nameservers of the runner's /etc/resolv.conf (here the machine's own resolver, outside
    anything a test may send traffic to), and neither reads the host's /etc/hosts, so no name
    resolves deterministically on this closed machine. The runner's egress rule that lets the
    sandboxes' DNS reach exactly those nameservers is tested with real iptables in
    tests/integration/runner/test_egress.py.
    """
    user = started(make_user(), hello_context)
    resolv = user.docker("run", "--rm", "hello", "cat", "/etc/resolv.conf").stdout
    nameservers = [line.split()[1] for line in resolv.splitlines() if line.startswith("nameserver")]
    assert nameservers == [SANDBOX_DNS], resolv


# ---- egress refusals -----------------------------------------------------------------------


class _Counting(BaseHTTPRequestHandler):
    seen: list[str]

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append(self.client_address[0])
        body = b"runner-local\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def runner_local_servers(world: World) -> Iterator[dict[str, tuple[int, list[str]]]]:
    """HTTP servers on the runner host itself: its loopback and its own address on the
    internet veth (198.51.100.1). Each records the clients whose requests reached it."""
    servers = {}
    threads = []
    try:
        for host in ("127.0.0.1", world.host_side):
            seen: list[str] = []
            handler = type("Handler", (_Counting,), {"seen": seen})
            server = ThreadingHTTPServer((host, 0), handler)
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            servers[host] = server
            threads.append(thread)
        yield {
            host: (int(server.server_address[1]), server.RequestHandlerClass.seen)  # type: ignore[attr-defined]
            for host, server in servers.items()
        }
    finally:
        for server in servers.values():
            server.shutdown()
            server.server_close()


def _wget(user: User, container: str, url: str) -> subprocess.CompletedProcess[str]:
    # busybox's `timeout`, not wget's -T: busybox 1.35's wget -T segfaults on a refused connect.
    argv = ["exec", container, "timeout", "30", "wget", "-q", "-O", "-", url]
    return user.docker(*argv, check=False, timeout=60)


def test_egress_refusals_next_to_a_reachable_internet(
    world: World,
    deployment: Deployment,
    make_user,
    hello_context: Path,
    runner_local_servers: dict[str, tuple[int, list[str]]],
) -> None:
    user = started(make_user(), hello_context)
    name = f"probe-{uuid.uuid4().hex[:6]}"
    user.docker("run", "-d", "--name", name, "hello", "sleep", "600")
    try:
        # The internet answers: the network works.
        ok = _wget(user, name, f"http://{world.address}:{MIRROR_PORT}/{PKG}")
        assert ok.returncode == 0 and ok.stdout == PKG_CONTENT, ok.stderr

        # The operator's allowed private range answers too.
        allowed = _wget(user, name, f"http://{ALLOWED_LAN}:{LAN_PORT}/{PKG}")
        assert allowed.returncode == 0 and allowed.stdout == PKG_CONTENT, allowed.stderr

        # Another private address is refused, though the runner host itself reaches it.
        assert tcp_answers(REFUSED_LAN, LAN_PORT)
        before = requests_logged(world.lan_log, f"/{PKG}")
        refused = _wget(user, name, f"http://{REFUSED_LAN}:{LAN_PORT}/{PKG}")
        assert refused.returncode == 1 and refused.stdout == ""
        assert refused.stderr == (
            f"wget: can't connect to remote host ({REFUSED_LAN}): Connection refused\n"
        )
        assert requests_logged(world.lan_log, f"/{PKG}") == before

        # The runner's loopback and the runner's own address, while the same servers answer on
        # the runner host. pasta maps nothing to the runner's loopback (--no-map-gw): the
        # gateway 10.0.2.2 is then a private address like any other, which the egress rules
        # refuse (slirp4netns, with --disable-host-loopback, answered "Network is unreachable").
        loop_port, loop_seen = runner_local_servers["127.0.0.1"]
        own_port, own_seen = runner_local_servers[world.host_side]
        assert tcp_answers("127.0.0.1", loop_port) and tcp_answers(world.host_side, own_port)
        for host, port, reason in (
            ("10.0.2.2", loop_port, "Connection refused"),
            (world.host_side, own_port, "Connection refused"),
        ):
            result = _wget(user, name, f"http://{host}:{port}/")
            assert result.returncode == 1 and result.stdout == "", host
            assert result.stderr == f"wget: can't connect to remote host ({host}): {reason}\n"
        assert loop_seen == [] and own_seen == []
    finally:
        user.docker("rm", "-f", name, check=False)


# ---- fidelity: what local Docker allows works inside the sandbox -----------------------------


def _client(user: User) -> docker.DockerClient:
    return docker.DockerClient(base_url=f"unix://{user.agent_socket}", timeout=120)


def test_privileged_and_host_namespaces(make_user, hello_context: Path) -> None:
    user = started(make_user(), hello_context)
    client = _client(user)
    try:
        script = (
            "grep CapEff /proc/self/status; cat /proc/sys/kernel/cap_last_cap; "
            "mkdir /m && mount -t tmpfs t /m && echo mounted"
        )
        privileged = client.containers.run(
            TEST_IMAGE_ALIAS, ["sh", "-c", script], privileged=True, remove=True
        ).decode()
        cap_eff = int(re.search(r"CapEff:\s*([0-9a-f]+)", privileged).group(1), 16)  # type: ignore[union-attr]
        last_cap = int(privileged.splitlines()[1])
        engine = user.docker("version", "--format", "{{.Server.Version}}").stdout
        if engine.startswith("20.10"):
            # dockerd 20.10 grants --privileged every capability up to CAP_AUDIT_READ (37), not
            # the kernel's newer PERFMON/BPF/CHECKPOINT_RESTORE (moby#41563, reverted in 23.0).
            last_cap = min(last_cap, CAP_AUDIT_READ)
        assert cap_eff == (1 << (last_cap + 1)) - 1, privileged
        assert privileged.splitlines()[2] == "mounted"
        plain = user.docker("run", "--rm", "hello", "sh", "-c", script, check=False)
        assert "CapEff:\t00000000a80425fb" in plain.stdout
        assert "mounted" not in plain.stdout and plain.returncode != 0
        assert "mount: permission denied (are you root?)" in plain.stderr

        # --pid=host: the sandbox's processes (its dockerd), none of the runner's.
        comms = user.docker("run", "--rm", "--pid=host", "hello", "sh", "-c", COMMS).stdout.split()
        assert "dockerd" in comms and "containerd" in comms, comms
        for outside in ("pasta", "passt", "passt.avx2", "slirp4netns", "offload", "python3",
                        "sshd", "systemd"):  # fmt: skip
            assert outside not in comms, comms
        own = user.docker("run", "--rm", "hello", "sh", "-c", COMMS).stdout
        assert "dockerd" not in own.split()

        # --uts=host: the sandbox's host name, which the engine reports as its name.
        engine_name = user.docker("info", "--format", "{{.Name}}").stdout.strip()
        uts = user.docker("run", "--rm", "--uts=host", "hello", "hostname").stdout.strip()
        assert uts == engine_name and uts.startswith("offload-"), (uts, engine_name)
        assert user.docker("run", "--rm", "hello", "hostname").stdout.strip() != engine_name

        # --ipc=host: two containers share the sandbox's IPC namespace (POSIX shm).
        token = uuid.uuid4().hex
        user.docker(
            "run", "--rm", "--ipc=host", "hello", "sh", "-c", f"echo {token} > /dev/shm/t-{token}"
        )
        shared = user.docker("run", "--rm", "--ipc=host", "hello", "cat", f"/dev/shm/t-{token}")
        assert shared.stdout.strip() == token
        apart = user.docker("run", "--rm", "hello", "cat", f"/dev/shm/t-{token}", check=False)
        assert apart.returncode != 0
        ipc_ns = user.docker("run", "--rm", "--ipc=host", "hello", "readlink", "/proc/self/ns/ipc")
        ipc_own = user.docker("run", "--rm", "hello", "readlink", "/proc/self/ns/ipc")
        assert ipc_ns.stdout != ipc_own.stdout
    finally:
        client.close()


TEST_IMAGE_ALIAS = "hello"  # what `started()` tags the busybox test image as


def test_swarm_service_reaches_a_running_task(make_user, hello_context: Path) -> None:
    user = started(make_user(), hello_context)
    client = _client(user)
    try:
        # Outside a swarm, `swarm leave` answers as dockerd does: 503, its own message.
        with pytest.raises(docker.errors.APIError) as left:
            client.swarm.leave()
        assert left.value.status_code == 503
        assert left.value.explanation == "This node is not part of a swarm"
        cli_leave = user.docker("swarm", "leave", check=False)
        assert cli_leave.returncode == 1
        assert (
            cli_leave.stderr.strip()
            == "Error response from daemon: This node is not part of a swarm"
        )
        plain = _plain_engine_swarm_leave()
        if plain is not None:
            assert plain == (503, "This node is not part of a swarm")

        user.docker("swarm", "init")
        try:
            name = f"svc-{uuid.uuid4().hex[:6]}"
            user.docker(
                "service", "create", "--detach", "--no-resolve-image", "--name", name,
                "hello", "sleep", "600", timeout=120,
            )  # fmt: skip

            def running() -> bool:
                states = user.docker(
                    "service", "ps", name, "--format", "{{.CurrentState}}|{{.Error}}"
                ).stdout.splitlines()
                return any(state.startswith("Running") for state in states)

            wait_until(running, WAIT, f"a running task of service {name}", 0.5)
            tasks = client.services.get(name).tasks(filters={"desired-state": "running"})
            assert tasks and tasks[0]["Status"]["State"] == "running"
        finally:
            user.docker("swarm", "leave", "--force", check=False)
        assert client.info()["Swarm"]["LocalNodeState"] == "inactive"
    finally:
        client.close()


def _plain_engine_swarm_leave() -> tuple[int, str] | None:
    """What the machine's default engine (not Offload) answers, if it runs (scripts/test.sh)."""
    try:
        plain = docker.DockerClient(base_url="unix:///var/run/docker.sock", timeout=10)
        plain.ping()
    except Exception:  # noqa: BLE001 (no default engine here)
        return None
    try:
        if plain.info()["Swarm"]["LocalNodeState"] != "inactive":
            return None
        plain.swarm.leave()
    except docker.errors.APIError as exc:
        return exc.status_code, exc.explanation  # type: ignore[return-value]
    finally:
        plain.close()
    return None


DIND_DOCKERFILE = """\
FROM scratch
COPY rootfs/ /
"""
INNER_DOCKERFILE = (
    'FROM scratch\nCOPY busybox /bin/busybox\nCMD ["/bin/busybox", "echo", "inner ok"]\n'
)


def _dind_context(directory: Path) -> Path:
    """An image of nothing but bin/lib/lib64/sbin -> usr/... and empty etc, tmp, var/run, run,
    var/lib: the programs come from a bind of the sandbox's /usr."""
    rootfs = directory / "rootfs"
    for d in ("etc", "tmp", "var/run", "run", "var/lib"):
        (rootfs / d).mkdir(parents=True)
        (rootfs / d / ".keep").write_text("")
    (rootfs / "tmp").chmod(0o1777)
    for link in ("bin", "lib", "lib64", "sbin"):
        (rootfs / link).symlink_to(f"usr/{link}")
    (directory / "Dockerfile").write_text(DIND_DOCKERFILE)
    return directory


def test_docker_in_docker(make_user, tmp_path: Path) -> None:
    """The sandbox's own dockerd, run again in a --privileged container, serves and runs.

    The sandbox's /usr reaches the container through a local-driver bind volume: through
    Offload a plain `-v /usr:/usr:ro` names the laptop's /usr, which the agent syncs into the
    mount area like any laptop directory (5.9 GB on this machine). As with local Docker, the
    inner /var/lib/docker is a volume (overlay2 cannot stack on the container's own overlay
    root: "failed to mount overlay: invalid argument"), and Debian's /usr/sbin/iptables is a
    link through /etc/alternatives, bound too (without it: "failed to create NAT chain DOCKER:
    Iptables not found").
    """
    user = make_user()
    user.docker("offload", "start", "--timeout", "60s")
    user.docker("build", "-q", "-t", "usr-only", str(_dind_context(tmp_path / "dind")))
    for volume, device in (("sandbox-usr", "/usr"), ("sandbox-alternatives", "/etc/alternatives")):
        user.docker(
            "volume", "create", "--driver", "local", "--opt", "type=none", "--opt", "o=bind",
            "--opt", f"device={device}", volume,
        )  # fmt: skip
    name = f"dind-{uuid.uuid4().hex[:6]}"
    user.docker(
        "run", "-d", "--privileged", "--name", name,
        "-v", "sandbox-usr:/usr:ro", "-v", "sandbox-alternatives:/etc/alternatives:ro",
        "-v", "/var/lib/docker",
        "usr-only", "dockerd",
    )  # fmt: skip
    try:

        def answers() -> str | None:
            state = user.docker("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            if state != "true":
                logs = user.docker("logs", "--tail", "30", name, check=False)
                raise AssertionError(f"the inner dockerd exited:\n{logs.stdout}{logs.stderr}")
            probe = user.docker(
                "exec", name, "docker", "version", "--format", "{{.Server.Version}}", check=False
            )
            return probe.stdout.strip() if probe.returncode == 0 else None

        version = wait_until(answers, WAIT, "the inner dockerd to answer docker version", 0.5)
        outer = user.docker("version", "--format", "{{.Server.Version}}").stdout.strip()
        assert version == outer  # the same binary: the sandbox's own /usr/sbin/dockerd

        # And it runs containers of its own: a FROM scratch busybox image built inside.
        build = (
            "mkdir /tmp/c && cp /usr/bin/busybox /tmp/c/ && printf '%s' \"$1\" > /tmp/c/Dockerfile"
            " && DOCKER_BUILDKIT=0 docker build -q -t inner /tmp/c >/dev/null"
            " && docker run --rm inner"
        )
        inner = user.docker("exec", name, "sh", "-c", build, "sh", INNER_DOCKERFILE, timeout=180)
        assert inner.stdout == "inner ok\n"
    finally:
        user.docker("rm", "-f", "-v", name, check=False)


def test_user_defined_bridge_networks_get_the_sandboxs_mtu(make_user, hello_context: Path) -> None:
    """dockerd 20.10 gives user-defined networks (compose's) 1500, at which downloads through
    the network helper crawl: the agent adds the sandbox's MTU to bridge network creates that
    name none, and leaves a client's own MTU alone (offload.agent.networks)."""
    user = started(make_user(), hello_context)
    user.docker("network", "create", "plain")
    user.docker("network", "create", "-o", "com.docker.network.driver.mtu=1400", "own")
    try:
        for network, mtu in (("bridge", "65520"), ("plain", "65520"), ("own", "1400")):
            seen = user.docker(
                "run", "--rm", "--network", network, "hello", "cat", "/sys/class/net/eth0/mtu"
            ).stdout.strip()
            assert seen == mtu, (network, seen)
        options = user.docker("network", "inspect", "plain", "--format", "{{json .Options}}")
        assert json.loads(options.stdout) == {"com.docker.network.driver.mtu": "65520"}
        # The raw API with an odd spelling of the key, as dockerd reads it.
        client = _client(user)
        made = client.api.post(
            client.api._url("/networks/create"),
            data=json.dumps(
                {"name": "odd", "options": {"com.docker.network.bridge.name": "br-odd"}}
            ),
            headers={"Content-Type": "application/json"},
        )
        assert made.status_code == 201, made.text
        odd = client.networks.get("odd").attrs["Options"]
        assert odd == {"com.docker.network.bridge.name": "br-odd",
                       "com.docker.network.driver.mtu": "65520"}  # fmt: skip
    finally:
        user.docker("network", "rm", "plain", "own", "odd", check=False)
