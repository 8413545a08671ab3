"""CLI flows around the session: password login, accounts, version, confirmation on stop."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import uuid
from pathlib import Path

from offload.core.schemas import Role
from tests.e2e.conftest import VENV_BIN, Deployment, User, _user_env, started


def test_password_login_accounts_and_version(deployment: Deployment, tmp_path: Path) -> None:
    from offload.server.bootstrap import create_user

    name = f"pw-{uuid.uuid4().hex[:6]}"
    create_user(deployment.server_settings, name, "correct horse battery", "default", Role.MEMBER)
    user = User(name, tmp_path, _user_env(tmp_path))
    wrong = user.offload(
        "login",
        "--server",
        deployment.server_url,
        "-u",
        name,
        check=False,
        env_extra={"OFFLOAD_PASSWORD": "wrong"},
    )
    assert wrong.returncode != 0 and "Fix:" in wrong.stderr
    assert not (user.offload_home / "config.json").exists()  # nothing half-written

    user.offload(
        "login",
        "--server",
        deployment.server_url,
        "-u",
        name,
        env_extra={"OFFLOAD_PASSWORD": "correct horse battery"},
    )
    accounts = json.loads(user.docker("offload", "accounts").stdout)
    assert accounts["user"] == name
    assert [org["name"] for org in accounts["orgs"]] == ["default"]
    version = json.loads(user.docker("offload", "version", "--json").stdout)
    assert version["client_version"] == version["server_version"]


def test_stop_asks_for_confirmation_on_a_terminal(make_user, hello_context: Path) -> None:
    user = started(make_user(), hello_context)
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [str(VENV_BIN / "offload"), "stop"], stdin=slave, stdout=slave, stderr=slave, env=user.env
    )
    os.close(slave)
    os.write(master, b"n\n")
    assert process.wait(timeout=60) != 0  # declined: aborted
    os.close(master)
    status = json.loads(user.offload("status", "-f", "json").stdout)
    assert status["state"] == "Started (Active)"


def test_up_is_idempotent(deployment: Deployment) -> None:
    again = deployment.admin.offload("up", timeout=120)
    assert "already up" in again.stdout
