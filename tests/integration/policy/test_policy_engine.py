"""The policy in front of a real dockerd, driven with the real docker CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from offload.core.waiting import wait_until
from offload.runner.policy import PolicyPlugin

from .conftest import Engine, LoopThread

pytestmark = pytest.mark.slow


def assert_refused(
    result: subprocess.CompletedProcess[str], plugin: PolicyPlugin, *words: str
) -> None:
    assert result.returncode != 0, result.stdout
    assert f"authorization denied by plugin {plugin.name}: Offload policy: " in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_a_plain_container_runs(engine: Engine, image: str) -> None:
    result = engine.docker("run", "--rm", image, "echo", "ok")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_bind_mount_from_the_mount_area_works(
    engine: Engine, image: str, mount_area: Path
) -> None:
    (mount_area / "sub" / "hello.txt").write_text("from the laptop\n")
    result = engine.docker(
        "run", "--rm", "-v", f"{mount_area}/sub:/x", image, "cat", "/x/hello.txt"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "from the laptop\n"


def test_the_host_network_is_the_sessions_own(engine: Engine, image: str) -> None:
    # Allowed on purpose: "host" is the engine's network namespace, the session's own.
    result = engine.docker("run", "--rm", "--network", "host", image, "true")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("flags", "refused"),
    [
        (["--privileged"], "--privileged"),
        (["--pid", "host"], "--pid host"),
        (["--ipc", "host"], "--ipc host"),
        (["--uts", "host"], "--uts host"),
        (["--userns", "host"], "--userns host"),
        (["--device", "/dev/null"], "--device"),
        (["--cap-add", "SYS_ADMIN"], "SYS_ADMIN"),
        (["--security-opt", "seccomp=unconfined"], "seccomp=unconfined"),
        (["--security-opt", "systempaths=unconfined"], "systempaths=unconfined"),
        (["-v", "/etc:/x"], "'/etc'"),
        (["--mount", "type=bind,src=/etc,dst=/x"], "--mount type=bind of '/etc'"),
        (["-v", "{area}/../x:/x"], "area/../x'"),
        (["-v", "{area}/escape:/x"], "area/escape'"),
    ],
)
def test_escapes_are_refused(
    engine: Engine,
    image: str,
    plugin: PolicyPlugin,
    mount_area: Path,
    flags: list[str],
    refused: str,
) -> None:
    escape = mount_area / "escape"
    if not escape.is_symlink():
        escape.symlink_to("/etc")  # a symlink inside the mount area that points out of it
    flags = [flag.format(area=mount_area) for flag in flags]
    result = engine.docker("run", "--rm", *flags, image, "true")
    assert_refused(result, plugin, refused)


def test_a_volume_bound_to_a_host_path_is_refused(engine: Engine, plugin: PolicyPlugin) -> None:
    result = engine.docker(
        "volume", "create", "--opt", "type=none", "--opt", "o=bind", "--opt", "device=/etc", "v"
    )
    assert_refused(result, plugin, "'/etc'")
    assert engine.docker("volume", "inspect", "v").returncode != 0


def test_privileged_exec_is_refused(engine: Engine, image: str, plugin: PolicyPlugin) -> None:
    name = "policy-exec"
    started = engine.docker("run", "-d", "--name", name, image, "sleep", "300")
    assert started.returncode == 0, started.stderr
    try:
        assert_refused(engine.docker("exec", "--privileged", name, "true"), plugin, "exec")
        plain = engine.docker("exec", name, "echo", "fine")
        assert plain.returncode == 0, plain.stderr
        assert plain.stdout.strip() == "fine"
    finally:
        engine.docker("rm", "-f", name)


def test_the_engine_fails_closed_without_its_plugin(
    engine: Engine, plugin: PolicyPlugin, loop_thread: LoopThread
) -> None:
    loop_thread.run(plugin.stop())
    try:
        # A fixed API version spares the CLI's version probe: one request, one retry window
        # (dockerd retries an unreachable plugin for about 15 s before it gives up).
        result = engine.docker("ps", env={"DOCKER_API_VERSION": "1.41"})
        assert result.returncode != 0
        assert f"plugin {plugin.name} failed with error" in result.stderr, result.stderr
        assert "AuthZPlugin.AuthZReq" in result.stderr
    finally:
        loop_thread.run(plugin.start())
    # Back in service without restarting the engine.
    wait_until(lambda: engine.docker("ps").returncode == 0, 30, "the engine to serve again")
