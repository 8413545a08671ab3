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


def test_lockout_unlock_audit_and_password_through_the_cli(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The real CLI against the real control plane: a guessed password locks the account, the
    owner unlocks it and reads the audit log, the user changes their password."""
    from offload.server.bootstrap import create_user

    name = f"lock-{uuid.uuid4().hex[:6]}"
    create_user(deployment.server_settings, name, "correct horse battery", "default", Role.MEMBER)
    user = User(name, tmp_path, _user_env(tmp_path))

    def login(password: str) -> subprocess.CompletedProcess[str]:
        return user.offload(
            "login",
            "--server",
            deployment.server_url,
            "-u",
            name,
            check=False,
            env_extra={"OFFLOAD_PASSWORD": password},
        )

    failures = [login(f"guess-{i}") for i in range(5)]
    assert [f.returncode for f in failures] == [3] * 5
    locked = login("correct horse battery")
    assert locked.returncode == 10, locked.stderr
    assert "locked" in locked.stderr and "offload org unlock" in locked.stderr

    unlocked = deployment.admin.offload("org", "unlock", name)
    assert f"{name} can sign in again" in unlocked.stdout
    assert login("correct horse battery").returncode == 0

    changed = user.offload(
        "password", input="correct horse battery\nsecond horse 22\nsecond horse 22\n"
    )
    assert f"Password changed for {name}" in changed.stdout
    assert login("correct horse battery").returncode == 3
    assert login("second horse 22").returncode == 0

    audit = json.loads(deployment.admin.offload("org", "audit", "--json", "--limit", "500").stdout)
    mine = [e["action"] for e in reversed(audit["events"]) if name in (e["actor"], e["subject"])]
    assert mine == [
        *["auth.sign_in_failed"] * 5,
        "auth.account_locked",
        "auth.account_unlocked",
        "auth.sign_in",
        "token.created",
        "auth.sign_in",  # the current password, checked like a sign-in
        "auth.password_changed",
        "auth.sign_in_failed",
        "auth.sign_in",
        "token.created",
    ]
    table = deployment.admin.offload("org", "audit", "--action", "auth.account_locked")
    assert "auth.account_locked" in table.stdout and name in table.stdout
    for secret in ("correct horse battery", "second horse 22"):
        assert secret not in json.dumps(audit)


def test_the_operator_lists_and_drains_runners(deployment: Deployment) -> None:
    server_env = {"OFFLOAD_DATA_DIR": str(deployment.server_settings.data_dir)}
    fleet = json.loads(
        deployment.admin.offload("admin", "runners", "--json", env_extra=server_env).stdout
    )
    assert fleet["online"] >= 1
    runner = next(view for view in fleet["runners"] if view["online"])
    drained = deployment.admin.offload("runner", "drain", runner["name"], env_extra=server_env)
    try:
        assert "is draining" in drained.stdout
        view = deployment.admin.offload("admin", "runners", env_extra=server_env).stdout
        assert "draining" in view and runner["name"] in view
    finally:
        deployment.admin.offload("runner", "drain", runner["name"], "--undo", env_extra=server_env)
    wrong = deployment.admin.offload(
        "runner", "drain", "no-such-runner", check=False, env_extra=server_env
    )
    assert wrong.returncode == 4 and "No runner is named" in wrong.stderr
