"""What `offload start|stop|status|keep|idle|usage|settings|org|login|accounts|version` do; the
Typer commands only print.

Each function returns plain data (pydantic models / dataclasses) or raises an OffloadError
carrying the fix, so the same logic serves `offload …` and `docker offload …`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from offload import __version__
from offload.agent.state import (
    AgentState,
    ClientConfig,
    SessionFile,
    client_name,
    notice_marker,
    read_model,
    write_model,
)
from offload.cli import dockerctx, processes
from offload.cli.agent_launcher import AgentLauncher
from offload.core import schemas as s
from offload.core.api_client import UserClient
from offload.core.client_paths import ClientPaths
from offload.core.engine_http import engine_client
from offload.core.errors import (
    InvalidInput,
    NotAuthenticated,
    NotFound,
    OffloadError,
    Unreachable,
)

Progress = Callable[[str], None]


def _no_progress(_: str) -> None:
    pass


def load_config(paths: ClientPaths) -> ClientConfig:
    config = read_model(paths.config_file, ClientConfig)
    if config is None:
        raise NotAuthenticated(
            "This machine is not signed in to an Offload control plane.",
            "Run `offload login --server URL --token TOKEN` (or `offload up` for the embedded "
            "default on this machine).",
        )
    return config


def user_client(config: ClientConfig) -> UserClient:
    return UserClient(config.server_url, config.token)


# ---- login ------------------------------------------------------------------------------------


async def login(
    paths: ClientPaths,
    server_url: str,
    token: str | None,
    username: str | None,
    password: str | None,
) -> s.UserInfo:
    """Check the credentials against the server, then store server URL and token."""
    server_url = server_url.rstrip("/")
    if not server_url.startswith(("http://", "https://")):
        raise InvalidInput(
            f"--server: '{server_url}' is not a URL.", "Use e.g. http://127.0.0.1:8421"
        )
    if token is None and username is None:
        from offload.cli.device_login import device_login

        token = await device_login(server_url, show_device_code)
    if token is None:
        if not username or not password:
            raise InvalidInput(
                "--username needs a password.",
                "Set OFFLOAD_PASSWORD, or run `offload login` on a terminal to be asked for it.",
            )
        async with UserClient(server_url, None) as anonymous:
            issued = await anonymous.login(
                s.LoginRequest(username=username, password=password, token_name=_hostname())
            )
        token = issued.token
    async with UserClient(server_url, token) as client:
        me = await client.me()
    write_model(
        paths.config_file,
        ClientConfig(server_url=server_url, token=token, default_org=me.default_org),
    )
    _install_plugin_quietly()  # so that the very next command can be `docker offload start`
    return me


def show_device_code(verification_uri: str, user_code: str) -> None:
    """Tell the user where to approve this machine (stderr: stdout stays for scripts)."""
    import sys

    print(
        f"To sign in, open {verification_uri}?code={user_code} in a browser\n"
        f"and confirm the code {user_code}. Waiting for approval…",
        file=sys.stderr,
        flush=True,
    )


# ---- start ------------------------------------------------------------------------------------


@dataclass
class StartResult:
    session: s.SessionInfo
    socket: Path
    context_switched: bool
    plugin_installed: Path | None
    already_running: bool = False


async def start(
    paths: ClientPaths,
    account: str | None,
    gpu: bool,
    idle_timeout_s: int | None,
    engine_timeout_s: float,
    progress: Progress = _no_progress,
    takeover: bool = False,
    agent: AgentLauncher | None = None,
) -> StartResult:
    agent = agent or AgentLauncher(paths)
    try:
        return await _start(
            paths, account, gpu, idle_timeout_s, engine_timeout_s, progress, takeover, agent
        )
    finally:
        agent.cancel()  # launched or not needed: the forked child leaves


async def _start(
    paths: ClientPaths,
    account: str | None,
    gpu: bool,
    idle_timeout_s: int | None,
    engine_timeout_s: float,
    progress: Progress,
    takeover: bool,
    agent: AgentLauncher,
) -> StartResult:
    config = load_config(paths)
    plugin = _install_plugin_quietly()
    async with user_client(config) as client:
        running = await _reusable_session(paths, client)
        if running is not None:
            # Starting on the machine holding the session is activity: the ping through the
            # agent wakes an idle session (resume within grace).
            await wait_for_engine(paths, engine_timeout_s)
            return StartResult(running, paths.agent_socket, False, plugin, already_running=True)
        progress("Requesting a session from the control plane")
        # The docker CLI calls (tens of ms each) run beside the requests, not after them.
        previous_context = asyncio.create_task(asyncio.to_thread(_previous_context, paths))
        public_key = _new_client_key(paths)
        # No --account: the control plane picks the user's default organisation (a personal
        # setting, `offload settings --default-org`).
        session = await client.create_session(
            s.SessionCreate(
                org=account,
                gpu=gpu,
                idle_timeout_s=idle_timeout_s,
                client_public_key=public_key,
                client_name=_hostname(),
                takeover=takeover,
            )
        )
    previous = await previous_context
    write_model(
        paths.session_file,
        SessionFile(
            session=session,
            private_key_path=str(paths.key_file),
            account=session.org,
            previous_docker_context=previous,
            client_name=_hostname(),
            idle_timeout_s=idle_timeout_s,
        ),
    )
    runner = session.runner.name if session.runner else "?"
    progress(f"Connecting to runner {runner} for session {session.id}")
    agent.launch()
    switching = asyncio.create_task(asyncio.to_thread(_switch_context, paths, session.id))
    try:
        await wait_for_engine(paths, engine_timeout_s)
    except BaseException:
        if await switching:  # the engine never answered: the user's docker stays where it was
            await asyncio.to_thread(dockerctx.restore_context, previous)
        raise
    return StartResult(session, paths.agent_socket, await switching, plugin)


def _install_plugin_quietly() -> Path | None:
    try:
        return dockerctx.ensure_plugin_installed()
    except OSError:
        return None  # `offload …` still works; diagnose reports the missing plugin


async def _reusable_session(paths: ClientPaths, client: UserClient) -> s.SessionInfo | None:
    """The running session if the agent is alive and the session is still live, else clean up."""
    agent = read_model(paths.agent_state_file, AgentState)
    if agent is None or not processes.is_alive(agent.pid):
        return None
    try:
        session = await client.get_session(agent.session_id)
    except NotFound:
        session = None
    if (
        session is not None
        and session.state.live
        and session.client_name in ("", _hostname())
        and (agent.connected or agent.suspended)
    ):
        return session
    processes.terminate(agent.pid)  # a stale agent holds the socket: replace it
    return None


def _new_client_key(paths: ClientPaths) -> str:
    """A fresh ed25519 key per session; the private half never leaves this machine. Returns the
    public half as an OpenSSH line. Made with `cryptography` (which asyncssh uses for it too):
    asyncssh is the agent's, and loading it here would delay the request for the session."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    paths.key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(paths.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    os.chmod(paths.key_file, 0o600)  # an older file keeps its mode through O_TRUNC
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return f"{public.decode()} offload@{_hostname()}"


def _previous_context(paths: ClientPaths) -> str | None:
    current = dockerctx.current_context()
    if current != dockerctx.CONTEXT_NAME:
        return current
    # Already on `offload` (a restart after a crash): keep what the last session remembered.
    old = read_model(paths.session_file, SessionFile)
    return old.previous_docker_context if old else None


async def wait_for_engine(paths: ClientPaths, timeout_s: float) -> None:
    """Until the engine answers `/_ping` through the agent, or fail with the agent's own words."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    last_problem = "the agent did not start"
    while asyncio.get_running_loop().time() < deadline:
        agent = read_model(paths.agent_state_file, AgentState)
        if agent is not None:
            if not processes.is_alive(agent.pid):
                last_problem = "the agent exited"
                break
            last_problem = agent.last_error or "the tunnel is not connected yet"
            ready = agent.connected or agent.suspended  # a ping wakes a suspended agent
            if ready and await ping_engine(paths.agent_socket):
                return
        await asyncio.sleep(0.02)  # a local file: cheap to read, and every wait is the user's
    raise Unreachable(
        f"The session engine did not answer within {timeout_s:g}s: {last_problem}.",
        "Run `docker offload start --timeout 60s` to wait longer, or `offload status` and "
        f"the agent log ({paths.agent_log}) for details:\n"
        + processes.log_tail(paths.agent_log, 8),
    )


async def ping_engine(socket_path: Path, timeout: float = 5.0) -> bool:
    if not socket_path.exists():
        return False
    try:
        async with engine_client(socket_path, timeout) as engine:
            response = await engine.get("/_ping")
            return response.status_code == 200
    except httpx.HTTPError:
        return False


def _switch_context(paths: ClientPaths, session_id: str) -> bool:
    try:
        dockerctx.use_offload_context(paths.agent_socket, session_id)
    except dockerctx.DockerCLIMissing:
        return False
    return True


# ---- stop -------------------------------------------------------------------------------------


@dataclass
class StopResult:
    session_id: str | None
    restored_context: str | None
    server_error: str | None = None
    moved_to: str | None = None  # the machine that holds the session now (left running)


async def stop(paths: ClientPaths) -> StopResult:
    """End the session on the control plane (its environment is wiped), stop the agent locally."""
    config = load_config(paths)
    session_file = read_model(paths.session_file, SessionFile)
    agent = read_model(paths.agent_state_file, AgentState)
    session_id = session_file.session.id if session_file else None
    server_error = None
    moved_to = None
    async with user_client(config) as client:
        try:
            if session_id is None:
                session_id = (await client.current_session()).id
            else:
                moved_to = await _moved_to(client, session_id)
            if moved_to is None:
                await client.stop_session(session_id)
        except NotFound:
            pass
        except Unreachable as exc:
            server_error = exc.message
    if agent is not None:
        processes.terminate(agent.pid)
    restored = None
    if dockerctx.docker_binary() and dockerctx.current_context() == dockerctx.CONTEXT_NAME:
        restored = dockerctx.restore_context(
            session_file.previous_docker_context if session_file else None
        )
    for leftover in (paths.session_file, paths.agent_state_file, paths.key_file):
        leftover.unlink(missing_ok=True)
    return StopResult(session_id, restored, server_error, moved_to)


async def _moved_to(client: UserClient, session_id: str) -> str | None:
    """The other machine that took this session over (`--takeover`): not ours to stop."""
    session = await client.get_session(session_id)
    if session.state.live and session.client_name and session.client_name != _hostname():
        return session.client_name
    return None


# ---- status -----------------------------------------------------------------------------------


def state_label(session: s.SessionInfo | None, agent_alive: bool) -> str:
    if session is None or not session.state.live:
        return "Stopped"
    if session.state == s.SessionState.STARTING:
        return "Starting"
    label = "Started (Idle)" if session.state == s.SessionState.IDLE else "Started (Active)"
    return label if agent_alive else f"{label}, agent not running"


async def status(paths: ClientPaths) -> dict[str, Any]:
    """Everything `offload status` shows, as a JSON-ready dict (keys are the --format json API).

    The control plane's answer is the truth about the session (a GET: never activity); the
    agent's state file fills in when the control plane cannot be reached."""
    config = load_config(paths)
    agent = read_model(paths.agent_state_file, AgentState)
    agent_alive = agent is not None and processes.is_alive(agent.pid)
    session: s.SessionInfo | None = None
    server_error = None
    async with user_client(config) as client:
        try:
            session = await client.current_session()
        except NotFound:
            session = None
        except OffloadError as exc:
            server_error = exc.message
    now = datetime.now(UTC)
    live = session is not None and session.state.live
    lifecycle = _lifecycle(session if live else None, agent if agent_alive else None, now)
    return {
        "account": session.org if session else config.default_org,
        "state": state_label(session, agent_alive),
        "session_id": session.id if live and session else None,
        "session_start": _iso(session.started_at or session.created_at)
        if live and session
        else None,
        "uptime_s": _uptime(session, now) if live else None,
        "idle_timeout_s": session.idle_timeout_s if live and session else None,
        **lifecycle,
        "gpu": bool(session.gpu) if live and session else False,
        "gpu_devices": [
            gpu.model_dump(mode="json") for gpu in (session.gpu_devices if live and session else [])
        ],
        "server": config.server_url,
        "runner": _runner_label(session) if live else None,
        "engine": f"unix://{paths.agent_socket}" if agent_alive else None,
        "isolation": isolation_label(agent.isolation) if agent_alive and agent else None,
        "agent": {
            "running": agent_alive,
            "pid": agent.pid if agent_alive and agent else None,
            "connected": bool(agent and agent_alive and agent.connected),
            "suspended": bool(agent and agent_alive and agent.suspended),
            "last_error": agent.last_error if agent else None,
            "log": str(paths.agent_log),
        },
        "replaced_session_notice": _notice_once(paths, agent if agent_alive else None),
        **_ports_and_syncs(agent if agent_alive else None),
        "docker_context": dockerctx.current_context(),
        "docker_host_env": os.environ.get("DOCKER_HOST"),
        "server_error": server_error,
    }


ISOLATIONS = {
    "rootless": "sandboxed: rootless engine in its own user namespace, private root filesystem",
}


def isolation_label(isolation: str | None) -> str | None:
    """What `offload status` and `diagnose` say of the engine's isolation label."""
    if isolation is None:
        return None
    return ISOLATIONS.get(isolation, isolation)


def _ports_and_syncs(agent: AgentState | None) -> dict[str, Any]:
    """Published ports forwarded here, those this machine could not bind, and synced paths."""
    ports = agent.ports if agent is not None else None
    return {
        "forwards": [f.model_dump(mode="json") for f in ports.forwards] if ports else [],
        "port_conflicts": [c.model_dump(mode="json") for c in ports.conflicts] if ports else [],
        "synced_paths": [p.model_dump(mode="json") for p in agent.synced_paths] if agent else [],
    }


def _lifecycle(
    session: s.SessionInfo | None, agent: AgentState | None, now: datetime
) -> dict[str, Any]:
    """Time until idle, prompt, warnings and fair use: from the control plane, else the agent."""
    if session is not None:
        return {
            "time_until_idle_s": session.time_until_idle_s,
            "idle_since": _iso(session.idle_since),
            "grace_ends_at": _iso(session.grace_ends_at),
            "prompt": session.prompt.model_dump(mode="json") if session.prompt else None,
            "warnings": list(session.warnings),
            "fair_use_remaining_s": session.fair_use_remaining_s,
            "fair_use_policy": session.fair_use_policy.value if session.fair_use_policy else None,
            "billed_s": session.billed_s,
        }
    if agent is None or agent.session_state is None:
        return {
            "time_until_idle_s": None,
            "idle_since": None,
            "grace_ends_at": None,
            "prompt": None,
            "warnings": [],
            "fair_use_remaining_s": None,
            "fair_use_policy": None,
            "billed_s": None,
        }
    elapsed = (now - agent.as_of).total_seconds() if agent.as_of else 0.0
    until_idle = agent.time_until_idle_s
    return {
        "time_until_idle_s": max(0.0, until_idle - elapsed) if until_idle is not None else None,
        "idle_since": None,
        "grace_ends_at": None,
        "prompt": agent.prompt.model_dump(mode="json") if agent.prompt else None,
        "warnings": list(agent.warnings),
        "fair_use_remaining_s": agent.fair_use_remaining_s,
        "fair_use_policy": None,
        "billed_s": None,
    }


def _notice_once(paths: ClientPaths, agent: AgentState | None) -> str | None:
    """The agent's replaced-session notice, the first time status is asked after it."""
    if agent is None or not agent.replaced_session_notice:
        return None
    marker = notice_marker(paths)
    try:
        if marker.read_text().strip() == agent.session_id:
            return None
    except FileNotFoundError:
        pass
    marker.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    marker.write_text(agent.session_id + "\n")
    return agent.replaced_session_notice


# ---- lifecycle: keep, idle, usage, settings ---------------------------------------------------


async def _current(client: UserClient) -> s.SessionInfo:
    try:
        return await client.current_session()
    except NotFound:
        raise NotFound(
            "You have no live Offload session.", "Start one with `docker offload start`."
        ) from None


@dataclass
class PromptResult:
    session: s.SessionInfo
    answered: s.Prompt | None  # the prompt that was open, if any


async def keep(paths: ClientPaths) -> PromptResult:
    """Answer "keep going" to the open prompt (or just keep an idle session going)."""
    async with user_client(load_config(paths)) as client:
        session = await _current(client)
        prompt = session.prompt
        answer = s.PromptAnswer(
            answer=s.PromptAnswerChoice.KEEP, prompt_id=prompt.id if prompt else None
        )
        return PromptResult(await client.answer_prompt(session.id, answer), prompt)


async def idle(paths: ClientPaths) -> PromptResult:
    """Go idle now (answering the open prompt with "idle" if there is one)."""
    async with user_client(load_config(paths)) as client:
        session = await _current(client)
        prompt = session.prompt
        if prompt is not None:
            answer = s.PromptAnswer(answer=s.PromptAnswerChoice.IDLE, prompt_id=prompt.id)
            return PromptResult(await client.answer_prompt(session.id, answer), prompt)
        if session.state is s.SessionState.IDLE:
            return PromptResult(session, None)
        return PromptResult(await client.idle_session(session.id), None)


async def usage(paths: ClientPaths) -> s.UsageReport:
    async with user_client(load_config(paths)) as client:
        return await client.usage()


async def settings(paths: ClientPaths, update: s.UserSettingsUpdate | None) -> s.UserSettings:
    """Show, or change (only the fields set in `update`), the personal settings."""
    config = load_config(paths)
    async with user_client(config) as client:
        if update is None or not update.model_fields_set:
            return await client.my_settings()
        result = await client.update_my_settings(update)
    if "default_org" in update.model_fields_set and result.default_org != config.default_org:
        write_model(
            paths.config_file, config.model_copy(update={"default_org": result.default_org})
        )
    return result


async def org_default(paths: ClientPaths, org: str | None) -> str:
    """The organisation named, else the user's default one."""
    if org:
        return org
    async with user_client(load_config(paths)) as client:
        me = await client.me()
    if me.default_org is None:
        raise InvalidInput(
            "You have no default organisation.",
            "Name one: `offload org settings ORG` (`offload accounts` lists yours).",
        )
    return me.default_org


async def org_settings(
    paths: ClientPaths, org: str | None, update: s.OrgSettingsUpdate | None
) -> s.OrgSettings:
    name = await org_default(paths, org)
    async with user_client(load_config(paths)) as client:
        if update is None or not update.model_fields_set:
            return await client.org_settings(name)
        return await client.update_org_settings(name, update)


async def org_audit(
    paths: ClientPaths,
    org: str | None,
    limit: int,
    before: int | None,
    action: s.AuditAction | None,
) -> s.AuditLog:
    name = await org_default(paths, org)
    async with user_client(load_config(paths)) as client:
        return await client.org_audit(name, limit, before, action)


async def unlock_member(paths: ClientPaths, org: str | None, username: str) -> s.Lockout:
    name = await org_default(paths, org)
    async with user_client(load_config(paths)) as client:
        return await client.unlock_member(name, username)


async def change_password(paths: ClientPaths, change: s.PasswordChange) -> s.UserInfo:
    async with user_client(load_config(paths)) as client:
        return await client.change_password(change)


async def org_billing(
    paths: ClientPaths, org: str | None, update: s.OrgBillingUpdate | None
) -> tuple[s.OrgBilling, s.OrgUsage]:
    name = await org_default(paths, org)
    async with user_client(load_config(paths)) as client:
        if update is not None and update.model_fields_set:
            await client.update_org_billing(name, update)
        return await client.org_billing(name), await client.org_usage(name)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _uptime(session: s.SessionInfo | None, now: datetime) -> float | None:
    if session is None:
        return None
    started = session.started_at or session.created_at
    return max(0.0, (now - started).total_seconds())


def _runner_label(session: s.SessionInfo | None) -> str | None:
    if session is None or session.runner is None:
        return None
    runner = session.runner
    return f"{runner.name} ({runner.ssh_host}:{runner.ssh_port})"


# ---- accounts and version ---------------------------------------------------------------------


async def accounts(paths: ClientPaths) -> s.AccountsResponse:
    async with user_client(load_config(paths)) as client:
        return await client.accounts()


async def version(paths: ClientPaths) -> dict[str, Any]:
    info: dict[str, Any] = {"client_version": __version__, "api_version": s.API_VERSION}
    config = read_model(paths.config_file, ClientConfig)
    if config is None:
        return info
    async with user_client(config) as client:
        try:
            server = await client.version()
            info["server_version"] = server.server_version
            info["server"] = config.server_url
        except OffloadError as exc:
            info["server_error"] = exc.message
    return info


def _hostname() -> str:
    return client_name()
