"""CLI pieces that need no control plane: durations, the docker plugin handshake, docker contexts
(driven through the real docker CLI in a throwaway HOME), and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from offload.cli import dockerctx
from offload.cli.durations import format_duration, parse_bounded_duration, parse_duration
from offload.core.errors import InvalidInput

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("10s", 10), ("5m", 300), ("1h", 3600), ("1h30m", 5400), ("1.5s", 1.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "--x") == seconds


@pytest.mark.parametrize("text", ["", "abc", "5x", "m5", "-3s"])
def test_bad_durations_name_the_option_and_forms(text: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_duration(text, "--timeout")
    assert "--timeout" in caught.value.message and "5m" in caught.value.fix


def test_idle_timeout_range_is_enforced() -> None:
    assert parse_bounded_duration("10s", "--idle-timeout", 10, 3600) == 10
    with pytest.raises(InvalidInput) as caught:
        parse_bounded_duration("2h", "--idle-timeout", 10, 3600)
    assert "10s" in caught.value.fix and "1h" in caught.value.fix
    assert format_duration(3725) == "1h2m5s"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.delenv("DOCKER_CONTEXT", raising=False)
    monkeypatch.delenv("OFFLOAD_HOME", raising=False)
    return tmp_path


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "OFFLOAD_"))}
    return {**env, "HOME": str(home), "PATH": f"{BIN}:{env['PATH']}"}


def test_plugin_answers_the_docker_cli_handshake(home: Path) -> None:
    out = subprocess.run(
        [str(BIN / "docker-offload"), "docker-cli-plugin-metadata"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["SchemaVersion"] == "0.1.0"
    installed = dockerctx.ensure_plugin_installed()
    assert installed == home / ".docker" / "cli-plugins" / "docker-offload"
    assert dockerctx.ensure_plugin_installed() is None  # idempotent
    version = subprocess.run(
        ["docker", "offload", "version", "--short"],
        env=_env(home),
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.strip() == "0.1.0"


def test_context_switch_and_restore(home: Path, tmp_path: Path) -> None:
    subprocess.run(
        ["docker", "context", "create", "mine", "--docker", "host=unix:///tmp/nothing.sock"],
        env=_env(home),
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["docker", "context", "use", "mine"], env=_env(home), check=True, capture_output=True
    )
    assert dockerctx.current_context() == "mine"
    dockerctx.use_offload_context(tmp_path / "agent.sock", "ses_test")
    assert dockerctx.current_context() == "offload"
    dockerctx.use_offload_context(tmp_path / "agent.sock", "ses_again")  # update, not fail
    assert dockerctx.restore_context("mine") == "mine"
    assert dockerctx.current_context() == "mine"
    assert not dockerctx.context_exists("offload")
    assert dockerctx.restore_context("gone-context") == "default"


def test_cli_errors_name_the_fix(home: Path) -> None:
    result = subprocess.run(
        [str(BIN / "offload"), "start"], env=_env(home), capture_output=True, text=True
    )
    assert result.returncode == 3
    assert "not signed in" in result.stderr and "offload login" in result.stderr
    bad_flag = subprocess.run(
        [str(BIN / "offload"), "start", "--idle-timeout", "3s"],
        env=_env(home),
        capture_output=True,
        text=True,
    )
    assert bad_flag.returncode == 2 and "10s" in bad_flag.stderr
    unknown = subprocess.run(
        [str(BIN / "offload"), "start", "--bogus"], env=_env(home), capture_output=True, text=True
    )
    assert unknown.returncode == 2 and "--bogus" in unknown.stderr


def test_bad_settings_name_the_variable_not_a_traceback(home: Path) -> None:
    env = {**_env(home), "OFFLOAD_PORT": "99999", "OFFLOAD_RUNNER_POOL_SIZE": "-1"}
    server = subprocess.run(
        [str(BIN / "offload"), "server"], env=env, capture_output=True, text=True
    )
    assert server.returncode == 2
    assert "OFFLOAD_PORT=99999" in server.stderr and "Traceback" not in server.stderr
    runner = subprocess.run(
        [str(BIN / "offload"), "runner"], env=env, capture_output=True, text=True
    )
    assert runner.returncode == 2
    assert "OFFLOAD_RUNNER_POOL_SIZE=-1" in runner.stderr and "Traceback" not in runner.stderr
