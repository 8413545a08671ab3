"""The core path as a user lives it: start, build, run, interact, stop — all through the tunnel."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
import uuid
from pathlib import Path

from tests.e2e.conftest import Deployment, User, environment_sockets, started, wait_gone
from tests.support.engines import LABELS_FORMAT, environment_id

DEFAULT_ENGINE = "unix:///var/run/docker.sock"


def _engine_of_session(user: User, deployment: Deployment) -> Path:
    """The session engine's own socket on the runner, found by asking each engine for its name."""
    # Engines on one host share an ID (key.json), but each is labelled with its environment.
    name = environment_id(user.docker("info", "--format", LABELS_FORMAT).stdout.strip())
    for sock in environment_sockets(deployment):
        probe = subprocess.run(
            ["docker", "-H", f"unix://{sock}", "info", "--format", LABELS_FORMAT],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if probe.returncode == 0 and environment_id(probe.stdout.strip()) == name:
            return sock
    raise AssertionError(f"no environment engine has id {name}")


def test_start_build_run_on_the_session_engine(
    deployment: Deployment, make_user, hello_context: Path
) -> None:
    user = started(make_user(), hello_context)
    assert user.docker("context", "show").stdout.strip() == "offload"
    assert user.docker("run", "--rm", "hello").stdout.strip() == "hello from offload"

    marker = f"marker-{uuid.uuid4().hex[:8]}"
    user.docker("run", "--name", marker, "hello", "true")
    session_engine = _engine_of_session(user, deployment)
    on_session = subprocess.run(
        ["docker", "-H", f"unix://{session_engine}", "ps", "-a", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert marker in on_session
    default = subprocess.run(
        ["docker", "-H", DEFAULT_ENGINE, "ps", "-a", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
    )
    if default.returncode == 0:  # scripts/test.sh starts the machine's default engine
        assert marker not in default.stdout.split()


def test_interactive_tty(make_user, hello_context: Path) -> None:
    user = started(make_user(), hello_context)
    output = _run_in_pty(
        user, ["docker", "run", "-it", "--rm", "hello", "sh"], b"echo tty=$((6*7)); tty; exit\n"
    )
    assert "tty=42" in output
    assert "/dev/pts/" in output


def _run_in_pty(user: User, argv: list[str], keys: bytes, timeout: float = 60) -> str:
    """Run `argv` with a real pseudo-terminal as stdin/stdout, type `keys`, collect output."""
    master, slave = pty.openpty()
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=user.env)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    typed = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the other side closed
                    break
                if not data:
                    break
                chunks.append(data)
                if not typed and b"#" in b"".join(chunks):  # the shell's prompt
                    os.write(master, keys)
                    typed = True
            elif process.poll() is not None:
                break
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        os.close(master)
    return b"".join(chunks).decode(errors="replace")


def test_exec_logs_follow_and_cp(make_user, hello_context: Path, tmp_path: Path) -> None:
    user = started(make_user(), hello_context)
    name = f"ticker-{uuid.uuid4().hex[:6]}"
    loop = "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.2; done"
    user.docker("run", "-d", "--name", name, "hello", "sh", "-c", loop)

    assert user.docker("exec", name, "echo", "exec-ok").stdout.strip() == "exec-ok"

    follower = subprocess.Popen(
        ["docker", "logs", "-f", name], env=user.env, stdout=subprocess.PIPE, text=True
    )
    seen = []
    assert follower.stdout is not None
    for line in follower.stdout:  # streams: lines keep arriving while the container prints
        seen.append(line.strip())
        if len(seen) >= 5:
            break
    follower.send_signal(signal.SIGINT)
    follower.wait(timeout=10)
    assert seen[:5] == [f"line{i}" for i in range(5)]

    local = tmp_path / "to-container.txt"
    local.write_text("copied in\n")
    user.docker("cp", str(local), f"{name}:/in.txt")
    assert user.docker("exec", name, "cat", "/in.txt").stdout == "copied in\n"
    user.docker("exec", name, "sh", "-c", "echo made remotely > /out.txt")
    user.docker("cp", f"{name}:/out.txt", str(tmp_path / "back.txt"))
    assert (tmp_path / "back.txt").read_text() == "made remotely\n"
    user.docker("rm", "-f", name)


def test_status_pretty_and_json(deployment: Deployment, make_user, hello_context: Path) -> None:
    user = started(make_user(), hello_context)
    data = json.loads(user.docker("offload", "status", "--format", "json").stdout)
    assert data["state"] == "Started (Active)"
    assert data["session_id"].startswith("ses_")
    assert data["server"] == deployment.server_url
    assert data["engine"] == f"unix://{user.agent_socket}"
    assert data["runner"]
    assert data["agent"]["running"] and data["agent"]["connected"]
    pretty = user.docker("offload", "status").stdout
    assert data["session_id"] in pretty and "Started (Active)" in pretty


def test_two_users_get_two_engines(deployment: Deployment, make_user, hello_context: Path) -> None:
    alice = started(make_user(), hello_context)
    bob = started(make_user(), hello_context)
    alice.docker("run", "--name", "only-alice", "hello", "true")
    assert "only-alice" not in bob.docker("ps", "-a", "--format", "{{.Names}}").stdout.split()
    assert _engine_of_session(alice, deployment) != _engine_of_session(bob, deployment)
    ids = {json.loads(u.offload("status", "-f", "json").stdout)["session_id"] for u in (alice, bob)}
    assert len(ids) == 2


def test_stop_wipes_the_environment_and_restores_context(
    deployment: Deployment, make_user, hello_context: Path
) -> None:
    user = make_user()
    user.docker("context", "create", "mine", "--docker", "host=unix:///var/run/docker.sock")
    user.docker("context", "use", "mine")
    started(user, hello_context)
    engine = _engine_of_session(user, deployment)
    env_dir = engine.parent
    result = user.docker("offload", "stop", "--force")
    assert "stopped" in result.stdout
    assert user.docker("context", "show").stdout.strip() == "mine"
    wait_gone(engine)
    wait_gone(env_dir)
    netns = [line.split()[0] for line in _netns_list()]
    assert f"off-{env_dir.name.removeprefix('env-')}" not in netns
    status = json.loads(user.offload("status", "-f", "json").stdout)
    assert status["state"] == "Stopped"


def _netns_list() -> list[str]:
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line for line in result.stdout.splitlines() if line.strip()]


def test_old_api_versions_refused_and_local_docker_powers_work(
    make_user, hello_context: Path
) -> None:
    """The runner's policy refuses only API versions below 1.24 (dockerd's legacy paths), in
    dockerd's own words; what a local engine allows works, inside the session's sandbox."""
    user = started(make_user(), hello_context)
    old = user.docker(
        "run", "--rm", "hello", "true", check=False, env_extra={"DOCKER_API_VERSION": "1.23"}
    )
    assert old.returncode != 0
    assert (
        "client version 1.23 is too old. Minimum supported API version is 1.24, please upgrade "
        "your client to a newer version"
    ) in old.stderr, old.stderr
    allowed = {
        "--privileged": ["--privileged"],
        "host pid": ["--pid", "host"],
        "device": ["--device", "/dev/null"],
        "capability": ["--cap-add", "SYS_ADMIN"],
    }
    for what, flags in allowed.items():
        result = user.docker("run", "--rm", *flags, "hello", "true", check=False)
        assert result.returncode == 0, (what, result.stderr)
    # --pid=host is the sandbox's pid namespace: its own engine, none of the runner's processes.
    ps = user.docker("run", "--rm", "--pid", "host", "hello", "ps").stdout
    assert "dockerd" in ps and "offload.cli.main" not in ps, ps


def test_agent_death_is_reported_and_start_recovers(make_user, hello_context: Path) -> None:
    user = started(make_user(), hello_context)
    before = json.loads(user.offload("status", "-f", "json").stdout)
    os.kill(before["agent"]["pid"], signal.SIGKILL)

    broken = user.docker("ps", check=False)
    assert broken.returncode != 0
    assert str(user.agent_socket) in broken.stderr  # docker names the Offload socket it can't reach
    status = user.offload("status")
    assert "agent not running" in status.stdout
    assert "docker offload start" in status.stderr

    user.docker("offload", "start", "--timeout", "60s")
    after = json.loads(user.offload("status", "-f", "json").stdout)
    assert after["session_id"] == before["session_id"]  # the same session, images intact
    assert user.docker("run", "--rm", "hello").stdout.strip() == "hello from offload"
