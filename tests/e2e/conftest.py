"""End to end: the embedded default started with the real `offload up`, users driving the real
`offload` / `docker offload` CLI and the real docker CLI, containers on real per-session engines.

One deployment per test run (expensive); every test gets its own user (own HOME, own docker
config, own session) so tests stay independent.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from offload.core.config import ServerSettings
from offload.core.schemas import Role
from offload.core.waiting import wait_until
from tests.support.identities import identity_env
from tests.support.images import write_build_context
from tests.support.net import free_port as _free_port

VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@dataclass
class User:
    """One developer: their own HOME (so ~/.offload and ~/.docker), CLI and docker client."""

    name: str
    home: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 120,
        input: str | None = None,
        env_extra: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            list(args),
            env={**self.env, **(env_extra or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}\nstdout: {result.stdout}\n"
                f"stderr: {result.stderr}"
            )
        return result

    def offload(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run(str(VENV_BIN / "offload"), *args, **kwargs)  # type: ignore[arg-type]

    def docker(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run("docker", *args, **kwargs)  # type: ignore[arg-type]

    @property
    def offload_home(self) -> Path:
        return self.home / ".offload"

    @property
    def agent_socket(self) -> Path:
        return self.offload_home / "run" / "docker.sock"


@dataclass
class Deployment:
    admin: User
    server_url: str
    server_settings: ServerSettings
    run_dir: Path
    data_dir: Path
    cgroup_parent: str
    ssh_port: int


def _user_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "OFFLOAD_"))}
    env.update(HOME=str(home), PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}")
    return env


@contextmanager
def embedded_deployment(
    home: Path, name: str, runner_env: dict[str, str] | None = None
) -> Iterator[Deployment]:
    """`offload up` as the admin in `home`, with a run dir, cgroup parent and identity range of
    its own (see tests/support/identities.py) and `runner_env` for its runner; `down` after."""
    suffix = uuid.uuid4().hex[:6]
    run_dir = Path(f"/run/o{name}-{suffix}")
    cgroup_parent = f"offload-{name}-{suffix}"
    admin = User("admin", home, _user_env(home))
    port, ssh_port = _free_port(), _free_port()
    up_args = [
        "up", "--port", str(port), "--ssh-port", str(ssh_port), "--run-dir", str(run_dir),
        "--cgroup-parent", cgroup_parent, "--pool-size", "1",
    ]  # fmt: skip
    data_dir = home / ".offload" / "embedded"
    try:
        admin.offload(*up_args, timeout=180, env_extra={**identity_env(), **(runner_env or {})})
        yield Deployment(
            admin=admin,
            server_url=f"http://127.0.0.1:{port}",
            server_settings=ServerSettings(data_dir=data_dir / "server", port=port),
            run_dir=run_dir,
            data_dir=data_dir,
            cgroup_parent=cgroup_parent,
            ssh_port=ssh_port,
        )
    finally:
        admin.offload("down", check=False, timeout=180)
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with embedded_deployment(tmp_path_factory.mktemp("admin-home"), "e2e") as deployment:
        yield deployment


_user_numbers = itertools.count(1)


def signed_in_user(
    deployment: Deployment,
    tmp_path_factory: pytest.TempPathFactory,
    prefix: str = "dev",
    org: str = "default",
    role: Role = Role.MEMBER,
) -> User:
    """A new user of `deployment` with a signed-in CLI, as a developer would sign in."""
    from offload.server.bootstrap import create_user

    name = f"{prefix}{next(_user_numbers)}-{uuid.uuid4().hex[:4]}"
    home = tmp_path_factory.mktemp(name)
    token = create_user(deployment.server_settings, name, f"pw-{name}-secret", org, role)
    user = User(name, home, _user_env(home))
    # `offload login` with the token from the environment, not argv.
    user.run(
        str(VENV_BIN / "offload"),
        "login",
        "--server",
        deployment.server_url,
        env_extra={"OFFLOAD_TOKEN": token},
    )
    return user


@pytest.fixture
def make_user(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Factory: a new user with a signed-in CLI; their session is stopped at teardown."""
    created: list[User] = []

    def make(org: str = "default", role: Role = Role.MEMBER) -> User:
        user = signed_in_user(deployment, tmp_path_factory, "dev", org, role)
        created.append(user)
        return user

    yield make
    for user in created:
        user.offload("stop", "--force", check=False, timeout=60)


@pytest.fixture(scope="session")
def hello_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_build_context(tmp_path_factory.mktemp("hello-context"))


def started(user: User, hello_context: Path) -> User:
    """`docker offload start` then `docker build -t hello` of the FROM scratch test image."""
    user.docker("offload", "start", "--timeout", "60s")
    user.docker("build", "-q", "-t", "hello", str(hello_context))
    return user


def environment_sockets(deployment: Deployment) -> set[Path]:
    return set(deployment.run_dir.glob("env-*/sock/docker.sock"))


def wait_gone(path: Path, timeout: float = 60) -> None:
    wait_until(lambda: not path.exists(), timeout, f"{path} to disappear")


# The clocked deployment's fixtures (tests/e2e/test_lifecycle.py), defined next to it.
from tests.e2e.clocked import clocked, make_laptop  # noqa: E402, F401
