"""A deployment whose control plane runs on a clock the test moves: lifecycle end to end.

The control plane (the real app, real SQLite) serves from a thread of the test process with a
`SteppedClock`; its lifecycle clock ticks every 0.1 s at that clock's time, so moving the clock
past an idle timeout or a grace period makes the transition happen at once. Everything else is
real and separate: `offload runner` as a subprocess (own run dir and cgroup parent, real
engines), users signed in with the real CLI, the real docker CLI through the real agent.

The clock starts two hours behind the wall clock: session certificates are signed at the
clock's time and checked by the runner against the wall clock, so a clock moved forward by a few
minutes must never be ahead of it.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from offload.agent.state import AgentState, read_model
from offload.core import schemas as s
from offload.core.config import ServerSettings
from offload.core.waiting import wait_until
from tests.e2e.conftest import VENV_BIN, User, _free_port, _user_env
from tests.support.engines import LABELS_FORMAT, environment_id
from tests.support.identities import identity_env

CLOCK_BEHIND = timedelta(hours=2)
# A desktop cannot exist here: a stand-in `notify-send` records what the agent would show.
NOTIFY_SEND = '#!/bin/sh\nprintf "%s\\n" "$*" >> "$HOME/notifications.log"\n'


class SteppedClock:
    """The control plane's clock: stands still unless the test moves it (thread-safe reads)."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> datetime:
        with self._lock:
            self._now += timedelta(seconds=seconds)
            return self._now


@dataclass
class ClockedDeployment:
    clock: SteppedClock
    settings: ServerSettings
    server_url: str
    run_dir: Path
    runner_data_dir: Path
    cgroup_parent: str
    runner_log: Path
    runner_token: str = ""
    ssh_port: int = 0
    runner: subprocess.Popen[bytes] | None = None

    def start_runner(self) -> None:
        """Start `offload runner` (again) and wait for its SSH endpoint."""
        runner = _start_runner(self, self.runner_token, self.ssh_port)
        self.runner = runner
        wait_until(
            lambda: _listening(self.ssh_port, runner, self.runner_log),
            90,
            "the runner's SSH endpoint",
            interval=0.1,
        )

    def kill_runner(self) -> None:
        """SIGKILL the runner's whole process group: a host that died, nothing cleaned up."""
        if self.runner is not None and self.runner.poll() is None:
            os.killpg(self.runner.pid, signal.SIGKILL)
            self.runner.wait(30)


def _serve(settings: ServerSettings, clock: SteppedClock) -> tuple[object, threading.Thread]:
    import uvicorn

    from offload.server.app import create_app

    config = uvicorn.Config(
        create_app(settings, clock), host="127.0.0.1", port=settings.port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="clocked-control-plane", daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "the clocked control plane to serve")
    return server, thread


_RANGES: dict[Path, dict[str, str]] = {}


def _start_runner(
    deployment: ClockedDeployment, token: str, ssh_port: int
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    env.update(
        OFFLOAD_RUNNER_SERVER_URL=deployment.server_url,
        OFFLOAD_RUNNER_TOKEN=token,
        OFFLOAD_RUNNER_NAME="clocked-runner",
        OFFLOAD_RUNNER_DATA_DIR=str(deployment.runner_data_dir),
        OFFLOAD_RUNNER_RUN_DIR=str(deployment.run_dir),
        OFFLOAD_RUNNER_SSH_PORT=str(ssh_port),
        OFFLOAD_RUNNER_CGROUP_PARENT=deployment.cgroup_parent,
        OFFLOAD_RUNNER_POOL_SIZE="1",
        OFFLOAD_RUNNER_HEARTBEAT_WAIT_S="5",
        # One identity range per deployment, the same across the runner's restarts.
        **_RANGES.setdefault(deployment.run_dir, identity_env()),
    )
    log = open(deployment.runner_log, "ab")  # noqa: SIM115 - the runner keeps it while it runs
    try:
        return subprocess.Popen(
            [str(VENV_BIN / "offload"), "runner"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


def _listening(port: int, runner: subprocess.Popen[bytes], log: Path) -> bool:
    import socket

    if runner.poll() is not None:
        raise RuntimeError(f"the runner exited: {log.read_text()[-3000:]}")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _stop_runner(runner: subprocess.Popen[bytes]) -> None:
    if runner.poll() is None:
        runner.send_signal(signal.SIGTERM)
        try:
            runner.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait(10)


@pytest.fixture(scope="module")
def clocked(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ClockedDeployment]:
    """One per test module; a module's `CLOCKED_SETTINGS` (a dict) changes server settings."""
    from offload.server.bootstrap import bootstrap

    root = tmp_path_factory.mktemp("clocked")
    suffix = uuid.uuid4().hex[:6]
    defaults = {
        "data_dir": root / "server",
        "port": _free_port(),
        "tick_interval_s": 0.1,
        # The runner stays "live" however far the test moves the clock between heartbeats.
        "runner_timeout_s": 7 * 24 * 3600,
        "cert_validity_s": 6 * 3600,
        "default_idle_timeout_s": 300,
    }
    settings = ServerSettings(**(defaults | getattr(request.module, "CLOCKED_SETTINGS", {})))
    clock = SteppedClock(datetime.now(UTC) - CLOCK_BEHIND)
    tokens = bootstrap(settings, admin_username="clock-admin", org_name="clocked")
    server, thread = _serve(settings, clock)
    deployment = ClockedDeployment(
        clock=clock,
        settings=settings,
        server_url=f"http://127.0.0.1:{settings.port}",
        run_dir=Path(f"/run/oclk-{suffix}"),
        runner_data_dir=root / "runner",
        cgroup_parent=f"offload-clk-{suffix}",
        runner_log=root / "runner.log",
        runner_token=tokens.runner_token,
        ssh_port=_free_port(),
    )
    try:
        deployment.start_runner()
        yield deployment
    finally:
        if deployment.runner is not None:
            _stop_runner(deployment.runner)
        server.should_exit = True  # type: ignore[attr-defined]
        thread.join(30)
        shutil.rmtree(deployment.run_dir, ignore_errors=True)


# ---- users --------------------------------------------------------------------------------------

_numbers = itertools.count(1)


@dataclass
class Laptop(User):
    """A user on one machine of theirs, with the token kept to ask the control plane directly."""

    token: str = ""
    server_url: str = ""

    @property
    def agent_state(self) -> AgentState | None:
        return read_model(self.offload_home / "run" / "agent.json", AgentState)

    def api(self, method: str, path: str) -> httpx.Response:
        return httpx.request(
            method,
            f"{self.server_url}{s.API_PREFIX}{path}",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )

    def session(self) -> s.SessionInfo:
        response = self.api("GET", "/sessions/current")
        response.raise_for_status()
        return s.SessionInfo.model_validate(response.json())

    def session_by_id(self, session_id: str) -> s.SessionInfo:
        response = self.api("GET", f"/sessions/{session_id}")
        response.raise_for_status()
        return s.SessionInfo.model_validate(response.json())

    def wait_reported(self) -> None:
        """Until the agent has told the control plane about everything it saw (so that moving
        the clock cannot race a late report)."""

        def quiet() -> bool:
            state = self.agent_state
            return state is not None and state.activity_quiet

        wait_until(quiet, 30, f"{self.name}'s agent to report its activity")

    def notifications(self) -> str:
        log = self.home / "notifications.log"
        return log.read_text() if log.exists() else ""


def _laptop_env(home: Path, machine: str) -> dict[str, str]:
    env = _user_env(home)
    bin_dir = home / "bin"
    bin_dir.mkdir(exist_ok=True)
    notify = bin_dir / "notify-send"
    notify.write_text(NOTIFY_SEND)
    notify.chmod(0o755)
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        OFFLOAD_CLIENT_NAME=machine,
        # Quick agent cadences, so that tests wait on conditions for less time.
        OFFLOAD_AGENT_POLL_INTERVAL_S="0.3",
        OFFLOAD_AGENT_REPORT_MIN_INTERVAL_S="0.2",
    )
    return env


@pytest.fixture
def make_laptop(clocked: ClockedDeployment, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Factory: `make_laptop()` a new user (own organisation) signed in on their first machine;
    `make_laptop(like=other)` the same user on another machine. Sessions stop at teardown."""
    from offload.server.bootstrap import create_user

    made: list[Laptop] = []

    def make(
        like: Laptop | None = None, org: str | None = None, role: s.Role = s.Role.MEMBER
    ) -> Laptop:
        number = next(_numbers)
        if like is None:
            name = f"clk{number}-{uuid.uuid4().hex[:4]}"
            org = org or f"org-{name}"
            token = create_user(clocked.settings, name, f"pw-{name}-secret", org, role)
        else:
            name, token = like.name, like.token
        home = tmp_path_factory.mktemp(f"{name}-m{number}")
        laptop = Laptop(
            name,
            home,
            _laptop_env(home, f"{name}-machine{number}"),
            token=token,
            server_url=clocked.server_url,
        )
        laptop.offload("login", "--server", clocked.server_url, env_extra={"OFFLOAD_TOKEN": token})
        made.append(laptop)
        return laptop

    yield make
    for laptop in made:
        laptop.offload("stop", "--force", check=False, timeout=60)


@dataclass(frozen=True)
class EnvironmentOnRunner:
    env_id: str
    socket: Path
    home: Path  # data_dir/envs/<id>: data-root, mount area and log; gone once wiped

    def docker(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The docker CLI on the environment's own engine socket (not through Offload)."""
        return subprocess.run(
            ["docker", "-H", f"unix://{self.socket}", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def paused(self, container: str) -> bool | None:
        result = self.docker("inspect", "--format", "{{.State.Paused}}", container)
        return None if result.returncode else result.stdout.strip() == "true"


def environment_of(laptop: Laptop, clocked: ClockedDeployment) -> EnvironmentOnRunner:
    """The runner environment serving `laptop`'s session, from its engine's label."""
    env_id = environment_id(laptop.docker("info", "--format", LABELS_FORMAT).stdout.strip())
    env_home = clocked.runner_data_dir / "envs" / env_id
    assert env_home.is_dir(), env_home
    return EnvironmentOnRunner(env_id, clocked.run_dir / env_id / "sock" / "docker.sock", env_home)
