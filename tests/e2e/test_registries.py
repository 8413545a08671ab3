"""Registries as users meet them: TLS, htpasswd, credentials from the laptop, the runner's cache.

Two real registries (Debian's `docker-registry`), each in a network namespace of its own on a
TEST-NET block, with TLS (a certificate of this module's test CA, which the runner trusts through
OFFLOAD_RUNNER_REGISTRY_CA) and htpasswd auth:

- "the hub" stands for Docker Hub: the runner's pull-through cache fronts it
  (OFFLOAD_RUNNER_PULL_CACHE_UPSTREAM) with the operator's account, so `docker pull bb:1`
  (docker.io/library/bb:1) is served by the cache;
- "the private registry" holds an organisation's private images.

Users of two organisations (acme: alice and bob; globex: eve) use Offload as developers do:
`docker login` on the laptop, then pulls, pushes, runs, compose and builds through their
sessions. The same commands against the machine's own dockerd (trusting the same CA) are the
reference for errors: through Offload they must read the same.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from tests.e2e.conftest import Deployment, User, embedded_deployment, signed_in_user, started
from tests.support.internet import Netns, internet_hosts
from tests.support.pki import CertificateAuthority
from tests.support.registry import Registry, start_registry
from tests.support.secrets_search import files_containing, processes_showing

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / ".venv-compose" / "bin" / "docker-compose"
DEBIAN_DOCKER = Path("/usr/bin/docker")  # 20.10, BuildKit built in
LOCAL_ENGINE = "unix:///var/run/docker.sock"  # the machine's own dockerd: the reference
CERTS_D = Path("/etc/docker/certs.d")
PORT = 5000
CACHE_ACCOUNT = "offload-cache"


@dataclass(frozen=True)
class World:
    ca: CertificateAuthority
    hub: Registry
    private: Registry
    hub_ns: Netns
    passwords: dict[str, str]

    def password(self, account: str) -> str:
        return self.passwords[account]


def _password() -> str:
    return f"pw-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("registries")
    ca = CertificateAuthority(work / "ca")
    passwords = {CACHE_ACCOUNT: _password(), "hubuser": _password(), "acme": _password()}
    with internet_hosts(2) as (hub_ns, private_ns):
        hub = start_registry(
            hub_ns, hub_ns.address, PORT, work / "hub", ca,
            {"hubuser": passwords["hubuser"], CACHE_ACCOUNT: passwords[CACHE_ACCOUNT]},
        )  # fmt: skip
        private = start_registry(
            private_ns, private_ns.address, PORT, work / "private", ca,
            {"acme": passwords["acme"]},
        )  # fmt: skip
        # The reference engine (the machine's dockerd) trusts the same CA, per registry host.
        trusted = [CERTS_D / registry.host for registry in (hub, private)]
        for directory in trusted:
            directory.mkdir(parents=True, exist_ok=True)
            shutil.copy(ca.cert_file, directory / "ca.crt")
        try:
            yield World(ca, hub, private, hub_ns, passwords)
        finally:
            for directory in trusted:
                shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def deployment(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """This module's deployment: the runner trusts the test CA, and its pull cache fronts the
    hub with the operator's account."""
    home = tmp_path_factory.mktemp("registries-admin")
    password_file = home / "cache-password"
    password_file.write_text(world.password(CACHE_ACCOUNT) + "\n")
    password_file.chmod(0o600)
    runner_env = {
        "OFFLOAD_RUNNER_REGISTRY_CA": str(world.ca.cert_file),
        "OFFLOAD_RUNNER_PULL_CACHE": "true",  # test runners have none by default
        "OFFLOAD_RUNNER_PULL_CACHE_UPSTREAM": world.hub.url,
        "OFFLOAD_RUNNER_PULL_CACHE_USERNAME": CACHE_ACCOUNT,
        "OFFLOAD_RUNNER_PULL_CACHE_PASSWORD_FILE": str(password_file),
    }
    with embedded_deployment(home, "rg", runner_env) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def people(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> dict[str, User]:
    return {
        "alice": signed_in_user(deployment, tmp_path_factory, "alice", "acme"),
        "bob": signed_in_user(deployment, tmp_path_factory, "bob", "acme"),
        "eve": signed_in_user(deployment, tmp_path_factory, "eve", "globex"),
    }


@pytest.fixture(scope="module", autouse=True)
def _sessions_stop(people: dict[str, User]) -> Iterator[None]:
    yield
    for user in people.values():
        user.offload("stop", "--force", check=False, timeout=60)


def _login(user: User, registry: Registry, account: str, password: str, **kw: object):  # type: ignore[no-untyped-def]
    return user.docker(
        "login", registry.host, "-u", account, "--password-stdin", input=password + "\n", **kw
    )


def _local(*args: str, config: Path, **kw: object) -> subprocess.CompletedProcess[str]:
    """The docker CLI against the machine's own engine, with a docker config of its own."""
    return subprocess.run(
        ["docker", "--config", str(config), "-H", LOCAL_ENGINE, *args],
        capture_output=True, text=True, timeout=kw.pop("timeout", 120), **kw,  # type: ignore[call-overload]
    )  # fmt: skip


def _private_context(directory: Path, base: str, marker: str) -> Path:
    """A build whose layer is this module's own (the marker): its digest is nowhere else."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Dockerfile").write_text(
        f'FROM {base}\nRUN echo {marker} > /secret-plan.txt\nCMD ["cat", "/secret-plan.txt"]\n'
    )
    return directory


@dataclass(frozen=True)
class Published:
    private_image: str
    marker: str
    private_layer: str  # digest of the private image's own layer
    hub_image: str  # the hub's name for docker.io/library/bb:1


@pytest.fixture(scope="module")
def published(
    world: World,
    people: dict[str, User],
    hello_context: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Published:
    """alice logs in to both registries from her laptop, pushes the busybox image to the hub as
    library/bb:1 and acme's private image to the private registry."""
    alice = started(people["alice"], hello_context)
    assert (
        "Login Succeeded" in _login(alice, world.hub, "hubuser", world.password("hubuser")).stdout
    )
    assert "Login Succeeded" in _login(alice, world.private, "acme", world.password("acme")).stdout
    hub_image = f"{world.hub.host}/library/bb:1"
    alice.docker("tag", "hello", hub_image)
    alice.docker("push", hub_image, timeout=300)
    marker = f"acme-plan-{uuid.uuid4().hex}"
    private_image = f"{world.private.host}/acme/app:1"
    context = _private_context(tmp_path_factory.mktemp("private-ctx"), "hello", marker)
    alice.docker("build", "-q", "-t", private_image, str(context), timeout=300)
    pushed = alice.docker("push", private_image, timeout=300)
    assert "1: digest: sha256:" in pushed.stdout
    status, _, body = world.private.get(
        "/v2/acme/app/manifests/1", "application/vnd.docker.distribution.manifest.v2+json"
    )
    assert status == 200, body
    layers = [layer["digest"] for layer in json.loads(body)["layers"]]
    return Published(private_image, marker, layers[-1], hub_image)


# ---- credentials travel from the laptop, per request -------------------------------------------


def test_login_push_pull_run_with_laptop_credentials(
    world: World, people: dict[str, User], published: Published
) -> None:
    alice = people["alice"]
    # docker login stayed on the laptop: the credentials are in alice's own docker config.
    config = json.loads((alice.home / ".docker" / "config.json").read_text())
    assert set(config["auths"]) >= {world.hub.host, world.private.host}
    assert world.private.tags("acme/app") == ["1"]
    # The push came from the session's engine (through the runner host's side of the veth).
    (put,) = world.private.access_log("PUT", "/v2/acme/app/manifests/1")
    assert '"PUT /v2/acme/app/manifests/1' in put and " 201 " in put

    alice.docker("image", "rm", published.private_image)
    pulled = alice.docker("pull", published.private_image, timeout=300)
    assert f"Downloaded newer image for {published.private_image}" in pulled.stdout
    alice.docker("image", "rm", published.private_image)
    ran = alice.docker("run", "--rm", published.private_image, timeout=300)  # implicit pull
    assert ran.stdout == published.marker + "\n"
    assert f"Unable to find image '{published.private_image}' locally" in ran.stderr


def test_docker_py_and_compose_pull_with_credentials(
    world: World, people: dict[str, User], published: Published, tmp_path: Path
) -> None:
    bob = people["bob"]
    bob.docker("offload", "start", "--timeout", "60s")
    client = docker.DockerClient(base_url=f"unix://{bob.agent_socket}", timeout=300)
    try:
        auth = {"username": "acme", "password": world.password("acme")}
        image = client.images.pull(published.private_image, auth_config=auth)
        assert published.private_image in image.tags
        client.images.remove(published.private_image)
    finally:
        client.close()

    if not COMPOSE.exists():
        pytest.fail(f"{COMPOSE} is missing: run scripts/test.sh, which installs docker-compose")
    _login(bob, world.private, "acme", world.password("acme"))  # compose reads the laptop's
    app = tmp_path / "app"
    app.mkdir()
    (app / "docker-compose.yml").write_text(
        f'version: "3.8"\nservices:\n  plan:\n    image: {published.private_image}\n'
    )
    compose = [str(COMPOSE), "-p", "reg", "-f", str(app / "docker-compose.yml")]
    bob.run(*compose, "pull", timeout=300)
    try:
        up = bob.run(*compose, "up", "--no-color", "--abort-on-container-exit", timeout=300)
        assert published.marker in up.stdout
    finally:
        bob.run(*compose, "down", "-t", "1", check=False, timeout=120)


def test_wrong_password_and_no_credentials_read_as_on_a_local_engine(
    world: World, people: dict[str, User], published: Published, tmp_path: Path
) -> None:
    eve = people["eve"]
    eve.docker("offload", "start", "--timeout", "60s")
    reference = tmp_path / "local-docker-config"
    reference.mkdir()
    if _local("version", config=reference).returncode != 0:
        pytest.fail(f"the machine's own dockerd ({LOCAL_ENGINE}) is not running: scripts/test.sh "
                    "starts it")  # fmt: skip
    wrong = "not-" + world.password("acme")

    offloaded = _login(eve, world.private, "acme", wrong, check=False)
    local = _local("login", world.private.host, "-u", "acme", "--password-stdin",
                   config=reference, input=wrong + "\n")  # fmt: skip
    assert offloaded.returncode == local.returncode == 1, (offloaded.stderr, local.stderr)
    assert "401 Unauthorized" in local.stderr, local.stderr
    assert offloaded.stderr == local.stderr, (offloaded.stderr, local.stderr)

    # eve (globex) has no acme credentials: the private registry's own refusal, as locally.
    offloaded = eve.docker("pull", published.private_image, check=False, timeout=120)
    local = _local("pull", published.private_image, config=reference)
    assert offloaded.returncode == local.returncode == 1
    assert "no basic auth credentials" in local.stderr, local.stderr
    assert offloaded.stderr == local.stderr


def test_credentials_are_nowhere_on_the_runner(
    world: World, deployment: Deployment, people: dict[str, User], published: Published
) -> None:
    """After logins, pushes and pulls with them: no file of the runner (its data, its engines'
    data-roots and logs, the pull cache, the control plane's data) and no process's command
    line or environment holds a user's password, in plain text or base64."""
    roots = [deployment.data_dir, deployment.run_dir]
    for account in ("hubuser", "acme"):
        password = world.password(account)
        assert files_containing(roots, password) == [], account
        assert processes_showing(password) == [], account
    # The search does find what it looks for: the laptop's own docker config holds it.
    assert files_containing([people["alice"].home / ".docker"], world.password("acme"))


# ---- the runner's pull-through cache ------------------------------------------------------------


def _hub_blob_gets(world: World) -> list[str]:
    """distribution's own log lines of the hub's completed blob GETs (they name the account)."""
    return [line for line in world.hub.log.read_text(errors="replace").splitlines()
            if 'msg="response completed"' in line and "http.request.method=GET" in line
            and 'http.request.uri="/v2/library/bb/blobs/sha256:' in line]  # fmt: skip


def test_a_second_session_is_served_from_the_runners_cache(
    world: World, deployment: Deployment, people: dict[str, User], published: Published
) -> None:
    bob, eve = people["bob"], people["eve"]
    # Fresh engines: bob's earlier pulls left the busybox layer in his.
    for user in (bob, eve):
        user.offload("stop", "--force", timeout=60)
    bob.docker("offload", "start", "--timeout", "60s")
    first = bob.docker("pull", "bb:1", timeout=300)
    assert "Downloaded newer image for bb:1" in first.stdout
    fetched = _hub_blob_gets(world)
    # The cache (Go's HTTP client, not an engine) fetched the layers from the hub, which answers
    # only authenticated requests: with the only account it has, the operator's.
    assert fetched and all(
        "http.request.useragent=Go-http-client/" in line and "http.response.status=200" in line
        for line in fetched
    ), fetched

    eve.docker("offload", "start", "--timeout", "60s")
    second = eve.docker("pull", "bb:1", timeout=300)
    assert "Downloaded newer image for bb:1" in second.stdout
    digest = [line for line in first.stdout.splitlines() if line.startswith("Digest:")]
    assert digest and digest[0] in second.stdout
    # Not one more layer came from the hub: the runner's cache served them.
    assert _hub_blob_gets(world) == fetched
    assert eve.docker("run", "--rm", "bb:1", "echo", "from the cache").stdout == "from the cache\n"


def test_a_private_image_never_reaches_another_organisation(
    world: World, deployment: Deployment, people: dict[str, User], published: Published
) -> None:
    """acme's private image (pulled with credentials by alice and bob above) is not in the
    runner's cache at all, and eve (globex), on the same runner, gets it by no path: not from
    the private registry without credentials, not from the cache by name nor by its layer's
    digest."""
    eve = people["eve"]
    eve.docker("offload", "start", "--timeout", "60s")
    storage = deployment.data_dir / "runner" / "pull-cache" / "storage"
    layer_hex = published.private_layer.removeprefix("sha256:")
    assert storage.is_dir()
    assert not list(storage.rglob(layer_hex)), "the private layer is in the shared cache"
    assert files_containing([storage], published.marker) == []

    refused = eve.docker("pull", published.private_image, check=False, timeout=120)
    assert refused.returncode == 1 and "no basic auth credentials" in refused.stderr
    mirror = _mirror_of(eve)
    probe = f"probe-{uuid.uuid4().hex[:6]}"
    eve.docker("run", "-d", "--name", probe, "bb:1", "sleep", "300", timeout=300)
    try:
        for path in (
            "/v2/acme/app/manifests/1",
            f"/v2/acme/app/blobs/{published.private_layer}",
            f"/v2/library/bb/blobs/{published.private_layer}",
        ):
            got = eve.docker(
                "exec", probe, "wget", "-q", "-O", "/dev/null", f"{mirror}{path}", check=False
            )
            assert got.returncode == 1 and "404 Not Found" in got.stderr, (path, got.stderr)
    finally:
        eve.docker("rm", "-f", probe, check=False)


def _mirror_of(user: User) -> str:
    info = json.loads(user.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}").stdout)
    (mirror,) = info
    return str(mirror).rstrip("/")


# ---- builds from registry base images -----------------------------------------------------------


@pytest.mark.parametrize("builder", ["legacy", "buildkit"])
def test_build_from_a_private_base_image(
    world: World, people: dict[str, User], published: Published, tmp_path: Path, builder: str
) -> None:
    """FROM a private image: the legacy builder gets the laptop's credentials in the request
    (X-Registry-Config), BuildKit asks the laptop for them through its session."""
    alice = people["alice"]
    alice.docker("offload", "start", "--timeout", "60s")
    alice.docker("image", "rm", "-f", published.private_image)
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(
        f"FROM {published.private_image}\nRUN cat /secret-plan.txt > /copied\n"
    )
    tag = f"from-private-{builder}"
    if builder == "legacy":
        alice.docker("build", "-t", tag, str(context), timeout=300,
                     env_extra={"DOCKER_BUILDKIT": "0"})  # fmt: skip
    else:
        if not DEBIAN_DOCKER.exists():
            pytest.fail(f"{DEBIAN_DOCKER} (Debian's docker.io CLI) is missing: scripts/test.sh")
        alice.run(str(DEBIAN_DOCKER), "build", "--progress=plain", "-t", tag, str(context),
                  timeout=300, env_extra={"DOCKER_BUILDKIT": "1"})  # fmt: skip
    assert alice.docker("run", "--rm", tag, "cat", "/copied").stdout == published.marker + "\n"
