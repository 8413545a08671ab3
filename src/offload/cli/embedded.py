"""`offload up` / `offload down`: the embedded default, a control plane and a local runner.

Both run as background processes of this machine (`offload server`, `offload runner`) with their
data under `~/.offload/embedded`; the CLI is then configured to use them.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import BaseModel

from offload.agent.state import ClientConfig, read_model, write_model
from offload.cli import dockerctx, processes
from offload.cli.session_ops import Progress, _no_progress
from offload.core.client_paths import ClientPaths
from offload.core.config import ServerSettings
from offload.core.errors import EnvironmentError_, InvalidInput, Unreachable
from offload.core.waiting import WaitTimeout, wait_until

REQUIRED_TOOLS = {"dockerd": "docker.io", "nsenter": "util-linux", "ip": "iproute2"}


class EmbeddedState(BaseModel):
    server_url: str
    server_pid: int
    runner_pid: int
    ssh_port: int
    run_dir: str
    cgroup_parent: str


@dataclass
class UpResult:
    server_url: str
    admin_username: str
    admin_password: str | None  # shown only when it was just created
    already_running: bool


def _state_file(paths: ClientPaths) -> Path:
    return paths.embedded_dir / "embedded.json"


def _log(paths: ClientPaths, name: str) -> Path:
    return paths.embedded_dir / "logs" / f"{name}.log"


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise InvalidInput(
            "The embedded runner needs root: it creates network namespaces, cgroups and engines.",
            "Run `sudo offload up` (or the README's first command).",
        )
    missing = [pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise InvalidInput(
            f"Missing system packages: {', '.join(sorted(set(missing)))}.",
            f"Install them: apt-get install -y {' '.join(sorted(set(missing)))}",
        )


def running_state(paths: ClientPaths) -> EmbeddedState | None:
    state = read_model(_state_file(paths), EmbeddedState)
    if state and processes.is_alive(state.server_pid) and processes.is_alive(state.runner_pid):
        return state
    return None


def up(
    paths: ClientPaths,
    port: int,
    ssh_port: int,
    run_dir: Path,
    cgroup_parent: str,
    pool_size: int,
    admin_username: str | None = None,
    org_name: str = "default",
    progress: Progress = _no_progress,
) -> UpResult:
    """Start (or find running) the embedded control plane + runner and sign this CLI in."""
    from offload.server.bootstrap import bootstrap

    check_prerequisites()
    admin = admin_username or _default_admin()
    state = running_state(paths)
    if state is not None:
        return UpResult(state.server_url, admin, None, already_running=True)
    down(paths)  # half-running leftovers of an earlier `up`
    _require_free_port(port, "--port")
    _require_free_port(ssh_port, "--ssh-port")
    server_dir = paths.embedded_dir / "server"
    password_file = paths.embedded_dir / "admin-password"
    settings = ServerSettings(data_dir=server_dir, port=port)
    server_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    progress("Preparing the control plane database")
    known_password = password_file.read_text().strip() if password_file.exists() else None
    result = bootstrap(
        settings, admin_username=admin, admin_password=known_password, org_name=org_name
    )
    new_password = None
    if known_password is None and result.admin_password is not None:
        # Kept (0600) so that the embedded admin can sign in to the dashboard later.
        password_file.write_text(result.admin_password + "\n")
        os.chmod(password_file, 0o600)
        new_password = result.admin_password
    server_url = f"http://127.0.0.1:{port}"
    progress(f"Starting the control plane on {server_url}")
    server_pid = processes.spawn_detached(
        ["-m", "offload.cli.main", "server"],
        _log(paths, "server"),
        env={"OFFLOAD_DATA_DIR": str(server_dir), "OFFLOAD_PORT": str(port)},
    )
    _wait_healthy(paths, server_url, server_pid)
    progress("Starting the local runner (engine pool)")
    runner_pid = processes.spawn_detached(
        ["-m", "offload.cli.main", "runner"],
        _log(paths, "runner"),
        env={
            "OFFLOAD_RUNNER_SERVER_URL": server_url,
            "OFFLOAD_RUNNER_TOKEN": result.runner_token,
            "OFFLOAD_RUNNER_NAME": f"{socket.gethostname()}-local",
            "OFFLOAD_RUNNER_DATA_DIR": str(paths.embedded_dir / "runner"),
            "OFFLOAD_RUNNER_RUN_DIR": str(run_dir),
            "OFFLOAD_RUNNER_SSH_PORT": str(ssh_port),
            "OFFLOAD_RUNNER_CGROUP_PARENT": cgroup_parent,
            "OFFLOAD_RUNNER_POOL_SIZE": str(pool_size),
        },
    )
    write_model(
        _state_file(paths),
        EmbeddedState(
            server_url=server_url,
            server_pid=server_pid,
            runner_pid=runner_pid,
            ssh_port=ssh_port,
            run_dir=str(run_dir),
            cgroup_parent=cgroup_parent,
        ),
    )
    _wait_port(paths, ssh_port, runner_pid)
    write_model(
        paths.config_file,
        ClientConfig(server_url=server_url, token=result.admin_token, default_org=org_name),
    )
    dockerctx.ensure_plugin_installed()  # `docker offload start` is the next command
    return UpResult(server_url, admin, new_password, already_running=False)


def down(paths: ClientPaths) -> bool:
    """Stop the embedded runner (it wipes its environments) and then the control plane."""
    state = read_model(_state_file(paths), EmbeddedState)
    if state is None:
        return False
    processes.terminate(state.runner_pid, timeout=60)
    processes.terminate(state.server_pid, timeout=20)
    _state_file(paths).unlink(missing_ok=True)
    return True


def _default_admin() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "admin"


def _require_free_port(port: int, option: str) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise InvalidInput(
                f"{option} {port} is already in use on this machine.",
                f"Stop what uses it, or choose another: `offload up {option} {port + 10}`.",
            ) from None


def _wait_healthy(paths: ClientPaths, server_url: str, pid: int) -> None:
    def healthy() -> bool:
        if not processes.is_alive(pid):
            raise Unreachable(
                "The control plane exited while starting.",
                f"See its log {_log(paths, 'server')}:\n"
                + processes.log_tail(_log(paths, "server")),
            )
        try:
            return httpx.get(f"{server_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, timeout=60, what="the control plane", interval=0.1)
    except WaitTimeout:
        raise Unreachable(
            "The control plane did not become healthy within 60s.",
            f"See {_log(paths, 'server')}",
        ) from None


def _wait_port(paths: ClientPaths, port: int, pid: int) -> None:
    def listening() -> bool:
        if not processes.is_alive(pid):
            raise EnvironmentError_(
                "The runner exited while starting.",
                f"See its log {_log(paths, 'runner')}:\n"
                + processes.log_tail(_log(paths, "runner")),
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    try:
        wait_until(listening, timeout=90, what="the runner's SSH endpoint", interval=0.1)
    except WaitTimeout:
        raise EnvironmentError_(
            "The runner did not open its SSH endpoint within 90s.",
            f"See {_log(paths, 'runner')}",
        ) from None
