"""The session lifecycle as a user lives it, on a control plane whose clock the test moves:
idle (containers paused, tunnel suspended, billing stopped), resume within grace (same
environment, continuous billing), wipe after grace (a new clean session, told once), prompts,
one session per user with takeover, and the refusals of each limit."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from offload.core import schemas as s
from offload.core.waiting import wait_until
from tests.e2e.clocked import ClockedDeployment, Laptop, environment_of

GRACE_S = 300


def _started(laptop: Laptop, hello_context: Path, *extra: str) -> Laptop:
    laptop.docker("offload", "start", "--timeout", "60s", *extra)
    laptop.docker("build", "-q", "-t", "hello", str(hello_context))
    return laptop


def _state_becomes(
    laptop: Laptop, state: s.SessionState, session_id: str | None = None
) -> s.SessionInfo:
    def reached() -> s.SessionInfo | None:
        info = laptop.session_by_id(session_id) if session_id else laptop.session()
        return info if info.state is state else None

    return wait_until(reached, 30, f"the session to become {state.value}")


def _suspended(laptop: Laptop) -> bool:
    state = laptop.agent_state
    return state is not None and state.suspended and not state.connected


def _status(laptop: Laptop) -> dict[str, object]:
    return json.loads(laptop.offload("status", "--format", "json").stdout)


def test_idle_resume_pause_and_wipe_after_grace(
    clocked: ClockedDeployment, make_laptop, hello_context: Path
) -> None:
    laptop = _started(make_laptop(), hello_context, "--idle-timeout", "1m")
    laptop.docker("run", "--name", "done", "hello", "true")  # exited: not activity
    env = environment_of(laptop, clocked)
    first = laptop.session()
    assert first.idle_timeout_s == 60

    # No activity for the idle timeout: idle, tunnel suspended, billing stopped.
    laptop.wait_reported()
    clocked.clock.advance(61)
    idle = _state_becomes(laptop, s.SessionState.IDLE)
    wait_until(lambda: _suspended(laptop), 30, "the agent to suspend the tunnel")
    assert "Idle" in _status(laptop)["state"]  # type: ignore[operator]
    clocked.clock.advance(30)
    assert laptop.session().billed_s == idle.billed_s  # nothing billed while idle

    # A docker command resumes the same environment; the idle gap is billed (continuous).
    assert "done" in laptop.docker("ps", "-a", "--format", "{{.Names}}").stdout.split()
    resumed = laptop.session()
    assert resumed.state is s.SessionState.ACTIVE and resumed.id == first.id
    assert environment_of(laptop, clocked) == env
    assert resumed.started_at is not None
    now = clocked.clock()
    assert resumed.billed_s is not None
    # Continuous billing on the stepped clock: exactly the clock time since the start.
    assert resumed.billed_s == pytest.approx((now - resumed.started_at).total_seconds(), abs=0.01)

    # A running container is paused while idle and unpaused by the next command.
    laptop.docker(
        "run", "-d", "--name", "spin", "hello", "sh", "-c", "while true; do sleep 1; done"
    )
    laptop.wait_reported()
    assert "idle" in laptop.offload("idle").stdout
    _state_becomes(laptop, s.SessionState.IDLE)
    wait_until(lambda: env.paused("spin") is True, 30, "the runner to pause the container")
    wait_until(lambda: _suspended(laptop), 30, "the agent to suspend the tunnel")
    assert "hello" in laptop.docker("images", "--format", "{{.Repository}}").stdout.split()
    wait_until(lambda: env.paused("spin") is False, 30, "the container to be unpaused")
    assert laptop.docker("exec", "spin", "echo", "back").stdout.strip() == "back"

    # Idle past the grace period: the environment is wiped; the next command starts a new,
    # clean session and the user is told once.
    laptop.docker("rm", "-f", "spin")
    laptop.wait_reported()
    laptop.offload("idle")
    _state_becomes(laptop, s.SessionState.IDLE)
    clocked.clock.advance(GRACE_S + 1)
    _state_becomes(laptop, s.SessionState.TERMINATED, first.id)
    wait_until(lambda: not env.home.exists(), 60, "the old environment's data-root to go")
    wait_until(lambda: not env.socket.exists(), 60, "the old environment's engine to go")

    images = laptop.docker("images", "--format", "{{.Repository}}").stdout.split()
    assert "hello" not in images
    second = laptop.session()
    assert second.id != first.id and second.state.live
    status = _status(laptop)
    assert status["session_id"] == second.id
    notice = status["replaced_session_notice"]
    assert isinstance(notice, str) and first.id in notice
    assert _status(laptop)["replaced_session_notice"] is None  # once
    agent_log = (laptop.offload_home / "logs" / "agent.log").read_text()
    assert notice in agent_log


def test_prompt_shown_notified_and_answered(clocked: ClockedDeployment, make_laptop) -> None:
    laptop = make_laptop()
    laptop.docker("offload", "start", "--timeout", "60s")
    assert laptop.session().idle_timeout_s == 300  # the server's default
    laptop.wait_reported()

    clocked.clock.advance(181)  # 3 quiet minutes: "keep or idle?"
    prompt = wait_until(lambda: laptop.session().prompt, 30, "the quiet prompt")
    assert prompt.reason is s.PromptReason.QUIET
    pretty = laptop.offload("status").stdout
    assert "Prompt:" in pretty and "offload keep" in pretty and "offload idle" in pretty
    data = _status(laptop)
    assert data["prompt"]["id"] == prompt.id  # type: ignore[index]
    assert data["time_until_idle_s"] is not None
    assert data["fair_use_remaining_s"] is not None
    wait_until(lambda: prompt.message in laptop.notifications(), 30, "a desktop notification")

    assert "Kept session" in laptop.offload("keep").stdout
    after = laptop.session()
    assert after.prompt is None and after.state is s.SessionState.ACTIVE
    assert after.time_until_idle_s == 300  # the quiet clock restarted
    assert _status(laptop)["prompt"] is None


def test_one_session_per_user_and_takeover(clocked: ClockedDeployment, make_laptop) -> None:
    first = make_laptop()
    first.docker("offload", "start", "--timeout", "60s")
    session_id = first.session().id
    second = make_laptop(like=first)
    first_machine = first.env["OFFLOAD_CLIENT_NAME"]

    refused = second.docker("offload", "start", "--timeout", "60s", check=False)
    assert refused.returncode == 5, refused.stderr
    assert first_machine in refused.stderr and "--takeover" in refused.stderr

    second.docker("offload", "start", "--timeout", "60s", "--takeover")
    assert second.session().id == session_id
    assert second.session().client_name == second.env["OFFLOAD_CLIENT_NAME"]
    assert second.docker("ps").returncode == 0

    def first_told() -> str | None:
        result = first.docker("ps", check=False)
        return result.stderr if result.returncode != 0 and "moved to" in result.stderr else None

    told = wait_until(first_told, 30, "the first machine to learn the session moved")
    assert second.env["OFFLOAD_CLIENT_NAME"] in told and "--takeover" in told
    # Stopping on the first machine disconnects it and leaves the session to the second.
    assert "left running" in first.offload("stop", "--force").stdout
    assert second.session().state.live and second.docker("ps").returncode == 0


def test_settings_and_limit_refusals(clocked: ClockedDeployment, make_laptop) -> None:
    owner = make_laptop(role=s.Role.OWNER)
    org = f"org-{owner.name}"
    member = make_laptop(org=org)

    for args in (("docker", "offload", "start", "--idle-timeout", "5s"),):
        result = member.run(*args, check=False)
        assert result.returncode == 2 and "10s" in result.stderr and "1h" in result.stderr
    result = member.offload("settings", "--idle-timeout", "2h", check=False)
    assert result.returncode == 2 and "10s" in result.stderr and "1h" in result.stderr
    mine = json.loads(member.offload("settings", "--idle-timeout", "15m", "--json").stdout)
    assert mine["idle_timeout_s"] == 900 and mine["default_org"] == org

    # A member reads the organisation's settings but cannot change them.
    assert json.loads(member.offload("org", "settings", "--json").stdout)["org"] == org
    denied = member.offload("org", "settings", "--disable", check=False)
    assert denied.returncode == 3 and owner.name in denied.stdout + denied.stderr

    # The owner locks the idle timeout: a different one is refused naming the locked value.
    owner.offload("org", "settings", org, "--idle-timeout-default", "5m", "--lock-idle-timeout")
    locked = member.docker("offload", "start", "--idle-timeout", "1m", check=False)
    assert locked.returncode == 2 and "5 min" in locked.stderr, locked.stderr

    # No allowance left: refused naming the organisation.
    owner.offload("org", "billing", org, "--committed-minutes", "0")
    broke = member.docker("offload", "start", "--timeout", "60s", check=False)
    assert broke.returncode != 0 and org in broke.stderr, broke.stderr

    # Offload disabled for the organisation: refused naming its owners.
    owner.offload("org", "billing", org, "--committed-minutes", "none")
    owner.offload("org", "settings", org, "--disable")
    disabled = member.docker("offload", "start", "--timeout", "60s", check=False)
    assert disabled.returncode == 3 and owner.name in disabled.stderr, disabled.stderr

    usage = json.loads(member.offload("usage", "--json").stdout)
    assert usage["user"] == member.name and usage["orgs"][0]["org"] == org
    assert "Recent sessions" in member.offload("usage").stdout
    assert isinstance(datetime.fromisoformat(usage["now"]), datetime)
