"""Many runner hosts (issue #11): each runner its own host, in a network namespace of its own
with an address of its own, all registered with one control plane.

The LAN (tests/support/runner_hosts.py): a bridge in the host namespace at 10.77.N.1, where the
control plane listens and the laptops live, and two namespaces at 10.77.N.2 and 10.77.N.3, each
running a real `offload runner` (own name, token, run dir, data dir, cgroup parent and identity
range) whose SSH endpoint listens on its namespace's address only (the same port on both: they
are different hosts). Users' `docker offload start` sessions are placed across the hosts by the
control plane, each user's docker CLI reaches the engine on the host it was placed on through
the SSH tunnel to that host's address, and `offload runner drain` sends the next session to the
other host while the drained host's session keeps working.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from offload.core.config import ServerSettings
from offload.core.schemas import SessionState
from offload.core.waiting import wait_until
from offload.server.bootstrap import runner_fleet
from tests.e2e.clocked import CLOCK_BEHIND, Laptop, SteppedClock, _laptop_env
from tests.e2e.conftest import VENV_BIN
from tests.support.engines import LABELS_FORMAT, environment_id
from tests.support.identities import identity_env
from tests.support.internet import Netns, _ip, tcp_answers
from tests.support.net import free_port
from tests.support.runner_hosts import Lan, lan

pytestmark = pytest.mark.slow

SSH_PORT = 2222  # the same on every host: each is a namespace of its own


@dataclass
class RunnerHost:
    name: str
    ns: Netns
    run_dir: Path
    data_dir: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return self.ns.address

    def serves(self, env_id: str) -> bool:
        """Whether environment `env_id` lives on this host (its data dir and run dir)."""
        return (self.data_dir / "envs" / env_id).is_dir() and (
            self.run_dir / env_id / "sock" / "docker.sock"
        ).exists()


@dataclass
class Fleet:
    lan: Lan
    settings: ServerSettings
    server_url: str
    hosts: list[RunnerHost]
    clock: SteppedClock

    def operator(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`offload ARGS` as the operator on the control plane's host."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
        env["OFFLOAD_DATA_DIR"] = str(self.settings.data_dir)
        result = subprocess.run(
            [str(VENV_BIN / "offload"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"offload {' '.join(args)}: {result.stderr}"
        return result

    def runners(self) -> dict[str, dict[str, object]]:
        """The operator's view (`offload admin runners --json`) at the control plane's clock:
        the CLI would judge heartbeats by the wall clock, which this control plane is behind."""
        fleet = runner_fleet(self.settings, self.clock).model_dump(mode="json")
        return {view["name"]: view for view in fleet["runners"]}


def _serve(settings: ServerSettings, clock: SteppedClock) -> tuple[object, threading.Thread]:
    import uvicorn

    from offload.server.app import create_app

    config = uvicorn.Config(
        create_app(settings, clock), host=settings.host, port=settings.port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="runner-hosts-control-plane", daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "the control plane to serve")
    return server, thread


def _start_runner(host: RunnerHost, server_url: str, token: str, cgroup_parent: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    env.update(
        identity_env(),  # a range of its own: the other runner holds another
        OFFLOAD_RUNNER_SERVER_URL=server_url,
        OFFLOAD_RUNNER_TOKEN=token,
        OFFLOAD_RUNNER_NAME=host.name,
        OFFLOAD_RUNNER_SSH_HOST=host.address,
        OFFLOAD_RUNNER_SSH_LISTEN_HOST=host.address,
        OFFLOAD_RUNNER_SSH_PORT=str(SSH_PORT),
        OFFLOAD_RUNNER_DATA_DIR=str(host.data_dir),
        OFFLOAD_RUNNER_RUN_DIR=str(host.run_dir),
        OFFLOAD_RUNNER_CGROUP_PARENT=cgroup_parent,
        OFFLOAD_RUNNER_POOL_SIZE="1",
        # Builds go to the session's own engine: no organisation builder (one engine fewer).
        OFFLOAD_RUNNER_BUILDER_SLOTS="0",
        OFFLOAD_RUNNER_HEARTBEAT_WAIT_S="5",
    )
    with open(host.log, "ab") as log:
        # nsenter --net only: /sys and the cgroup filesystem stay the machine's.
        host.process = subprocess.Popen(
            ["nsenter", f"--net={host.ns.path}", str(VENV_BIN / "offload"), "runner"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop_runner(host: RunnerHost) -> None:
    process = host.process
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)  # again is harmless: it only sets the runner's stop event
    try:
        process.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def _ssh_up(host: RunnerHost) -> bool:
    assert host.process is not None
    if host.process.poll() is not None:
        raise RuntimeError(f"runner {host.name} exited: {host.log.read_text()[-3000:]}")
    return tcp_answers(host.address, SSH_PORT, timeout=1)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    from offload.server.bootstrap import bootstrap, create_runner_token

    root = tmp_path_factory.mktemp("runner-hosts")
    suffix = uuid.uuid4().hex[:6]
    with lan(2) as network:
        settings = ServerSettings(
            data_dir=root / "server",
            host=network.host_side,
            port=free_port(),
            tick_interval_s=0.2,
            # The control plane's clock moves only when a test moves it, so placement never
            # depends on how late a heartbeat is on a busy machine; a host silent while the
            # clock moves 120 s is lost.
            runner_timeout_s=30,
            runner_lost_after_s=120,
            cert_validity_s=6 * 3600,
            default_idle_timeout_s=3600,
        )
        clock = SteppedClock(datetime.now(UTC) - CLOCK_BEHIND)
        bootstrap(settings, admin_username="hosts-admin", org_name="hosts")
        server, thread = _serve(settings, clock)
        server_url = f"http://{network.host_side}:{settings.port}"
        hosts = [
            RunnerHost(
                name=f"rh-{suffix}-{letter}",
                ns=ns,
                run_dir=Path(f"/run/orh-{suffix}-{letter}"),
                data_dir=root / f"runner-{letter}",
                log=root / f"runner-{letter}.log",
            )
            for letter, ns in zip("ab", network.hosts, strict=True)
        ]
        deployed = Fleet(network, settings, server_url, hosts, clock)
        try:
            for host in hosts:
                token = create_runner_token(settings, host.name)
                _start_runner(host, server_url, token, f"offload-rh-{suffix}-{host.name[-1]}")
            for host in hosts:
                wait_until(lambda host=host: _ssh_up(host), 120, f"{host.name}'s SSH endpoint", 0.2)
            yield deployed
        finally:
            for host in hosts:
                if host.process is not None and host.process.poll() is None:
                    host.process.send_signal(signal.SIGTERM)  # both wipe at once
            for host in hosts:
                _stop_runner(host)
                shutil.rmtree(host.run_dir, ignore_errors=True)
            server.should_exit = True  # type: ignore[attr-defined]
            thread.join(30)


@pytest.fixture
def make_laptop(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from offload.server.bootstrap import create_user

    made: list[Laptop] = []

    def make() -> Laptop:
        name = f"rh{len(made) + 1}-{uuid.uuid4().hex[:4]}"
        token = create_user(fleet.settings, name, f"pw-{name}-secret", f"org-{name}")
        home = tmp_path_factory.mktemp(name)
        laptop = Laptop(
            name,
            home,
            _laptop_env(home, f"{name}-laptop"),
            token=token,
            server_url=fleet.server_url,
        )
        laptop.offload("login", "--server", fleet.server_url, env_extra={"OFFLOAD_TOKEN": token})
        made.append(laptop)
        return laptop

    yield make
    for laptop in made:
        laptop.offload("stop", "--force", check=False, timeout=60)


def _start_and_run(laptop: Laptop, hello_context: Path) -> str:
    """`docker offload start`, build and run through the tunnel; the serving environment's id."""
    laptop.docker("offload", "start", "--timeout", "120s", timeout=180)
    laptop.docker("build", "-q", "-t", "hello", str(hello_context), timeout=180)
    assert laptop.docker("run", "--rm", "hello").stdout.strip() == "hello from offload"
    return environment_id(laptop.docker("info", "--format", LABELS_FORMAT).stdout.strip())


def _placed_on(laptop: Laptop, fleet: Fleet, env_id: str) -> RunnerHost:
    """The host serving `laptop`'s session: the control plane's word, the tunnel's address and
    where the engine that answered lives must all agree."""
    runner = laptop.session().runner
    assert runner is not None
    host = next(host for host in fleet.hosts if host.name == runner.name)
    assert (runner.ssh_host, runner.ssh_port) == (host.address, SSH_PORT)
    assert [h.name for h in fleet.hosts if h.serves(env_id)] == [host.name]
    return host


def test_sessions_spread_over_hosts_and_drain_sends_new_ones_elsewhere(
    fleet: Fleet, make_laptop, hello_context: Path
) -> None:
    first, second = fleet.hosts  # by name: a placement tie goes to `first`
    views = fleet.runners()
    for host in fleet.hosts:
        view = views[host.name]
        assert view["online"] and not view["draining"], view
        assert view["ssh"] == f"{host.address}:{SSH_PORT}"
    # Each endpoint listens on its own host's address only: not on the other's, nor on the LAN
    # side of the host namespace.
    assert not tcp_answers(fleet.lan.host_side, SSH_PORT, timeout=1)

    # Equal free slots: the tie goes by name; then the other host has more free slots.
    alice = make_laptop()
    alice_env = _start_and_run(alice, hello_context)
    assert _placed_on(alice, fleet, alice_env) is first
    bob = make_laptop()
    bob_env = _start_and_run(bob, hello_context)
    assert _placed_on(bob, fleet, bob_env) is second
    # Two hosts, two host keys: each tunnel pins the key of the host it dials.
    alice_runner, bob_runner = alice.session().runner, bob.session().runner
    assert alice_runner is not None and bob_runner is not None
    assert alice_runner.host_key != bob_runner.host_key

    # Equal again (one session each): the next would go to `first`; drained, it goes to `second`.
    drained = fleet.operator("runner", "drain", first.name)
    assert "is draining" in drained.stdout
    views = fleet.runners()
    assert views[first.name]["draining"] and views[first.name]["live_sessions"] == 1
    carol = make_laptop()
    carol_env = _start_and_run(carol, hello_context)
    assert _placed_on(carol, fleet, carol_env) is second

    # The drained host's session runs on: a new container, on the same engine there.
    assert alice.docker("run", "--rm", "hello", "echo", "still on a").stdout.strip() == (
        "still on a"
    )
    assert alice.session().state is SessionState.ACTIVE
    assert environment_id(alice.docker("info", "--format", LABELS_FORMAT).stdout.strip()) == (
        alice_env
    )
    assert _placed_on(alice, fleet, alice_env) is first
    assert fleet.runners()[second.name]["live_sessions"] == 2


def _heartbeat_at_clock(fleet: Fleet, host: RunnerHost) -> bool:
    seen = fleet.runners()[host.name]["last_heartbeat_at"]
    return seen is not None and datetime.fromisoformat(str(seen)) == fleet.clock()


def test_a_host_that_loses_its_network_fails_its_session_and_comes_back_clean(
    fleet: Fleet, make_laptop, hello_context: Path
) -> None:
    first, second = fleet.hosts
    fleet.operator("runner", "drain", first.name)  # the session goes to `second`
    dave = make_laptop()
    dave_env = _start_and_run(dave, hello_context)
    assert _placed_on(dave, fleet, dave_env) is second
    fleet.operator("runner", "drain", first.name, "--undo")
    session = dave.session()
    assert session.started_at is not None

    fleet.clock.advance(30)  # half a minute of work, then the last heartbeat
    wait_until(lambda: _heartbeat_at_clock(fleet, second), 30, "a heartbeat at the moved clock")
    last_heartbeat = fleet.clock()
    _ip("link", "set", second.ns.host_if, "down")  # the host's network is gone
    try:
        fleet.clock.advance(121)

        def failed() -> object:
            info = dave.session_by_id(session.id)
            return info if info.state is SessionState.FAILED else None

        ended = wait_until(failed, 30, "the session on the unreachable host to fail")
        assert ended.end_reason == (  # type: ignore[attr-defined]
            f"runner {second.name} lost: no heartbeat since "
            f"{last_heartbeat.isoformat(timespec='seconds')}"
        )
        assert ended.ended_at == last_heartbeat  # type: ignore[attr-defined]
        assert ended.billed_s == 30.0  # type: ignore[attr-defined]
        assert not fleet.runners()[second.name]["online"]

        # The next docker commands: a new session on the host that is still there (once its
        # heartbeat caught up with the clock the test moved).
        wait_until(lambda: _heartbeat_at_clock(fleet, first), 30, "the other host's heartbeat")
        wait_until(
            lambda: dave.agent_state is not None and dave.agent_state.session_state == "failed",
            30,
            "dave's agent to hear the session failed",
        )
        dave.docker("build", "-q", "-t", "hello", str(hello_context), timeout=180)
        assert dave.docker("run", "--rm", "hello", "echo", "moved").stdout.strip() == "moved"
        replacement = dave.session()
        assert replacement.id != session.id
        assert replacement.runner is not None and replacement.runner.name == first.name
    finally:
        _ip("link", "set", second.ns.host_if, "up")

    # Back on the network, the host learns its session ended and wipes its environment.
    wait_until(
        lambda: not second.serves(dave_env), 120, "the returning host to wipe the old engine"
    )
    wait_until(lambda: fleet.runners()[second.name]["online"], 60, "the host to heartbeat again")
