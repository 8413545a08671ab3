"""`offload diagnose`: independent checks, each with a verdict and the fix.

Checks run in order and later ones are skipped (not failed) when what they need is missing, so
the first failure is the one to fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

import asyncssh
import httpx

from offload import __version__
from offload.agent.state import AgentState, ClientConfig, SessionFile, read_model
from offload.cli import dockerctx, processes
from offload.cli.session_ops import isolation_label, ping_engine
from offload.core import schemas as s
from offload.core.api_client import UserClient
from offload.core.client_paths import ClientPaths
from offload.core.errors import OffloadError
from offload.core.waiting import within

MAX_CLOCK_SKEW_S = 60.0


@dataclass
class Check:
    name: str
    status: str  # "pass" | "fail" | "warn" | "skip"
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "fail"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


async def run_checks(paths: ClientPaths) -> list[Check]:
    checks: list[Check] = []
    config = read_model(paths.config_file, ClientConfig)
    if config is None:
        checks.append(
            Check(
                "configuration",
                "fail",
                f"no {paths.config_file}",
                "Run `offload login --server URL --token TOKEN` or `offload up`.",
            )
        )
    else:
        checks.append(Check("configuration", "pass", f"server {config.server_url}"))
        checks.extend(await _server_checks(config))
    session = read_model(paths.session_file, SessionFile)
    checks.append(await _runner_check(session))
    checks.extend(await _local_checks(paths, session))
    if config is not None:
        checks.append(await _gpu_check(paths, config, session))
    return checks


async def _server_checks(config: ClientConfig) -> list[Check]:
    checks: list[Check] = []
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            response = await http.get(f"{config.server_url}/healthz")
    except httpx.HTTPError as exc:
        return [
            Check(
                "control plane reachable",
                "fail",
                f"{config.server_url}: {exc.__class__.__name__}",
                "Start it (`offload up` for the embedded one) or fix the URL with `offload login`.",
            )
        ]
    checks.append(Check("control plane reachable", "pass", config.server_url))
    checks.append(_clock_check(response.headers.get("date")))
    async with UserClient(config.server_url, config.token) as client:
        try:
            version = await client.version()
            accepted = _version_tuple(__version__) >= _version_tuple(version.min_client_version)
            checks.append(
                Check(
                    "client version accepted",
                    "pass" if accepted else "fail",
                    f"client {__version__}, server {version.server_version} "
                    f"(minimum client {version.min_client_version})",
                    "" if accepted else "Upgrade Offload: pip install -U offload",
                )
            )
            me = await client.me()
            checks.append(Check("credentials", "pass", f"signed in as {me.username}"))
            orgs = ", ".join(f"{o.name} ({o.role})" for o in me.orgs) or "none"
            checks.append(
                Check(
                    "organisation access",
                    "pass" if me.orgs else "fail",
                    f"organisations: {orgs}",
                    "" if me.orgs else "Ask an organisation owner to add you.",
                )
            )
            checks.extend([await _billing_check(client, org.name) for org in me.orgs])
        except OffloadError as exc:
            checks.append(Check("credentials", "fail", exc.message, exc.fix))
    return checks


async def _billing_check(client: UserClient, org: str) -> Check:
    """Whether `org` can still pay for a session this month."""
    name = f"billing ({org})"
    try:
        usage = await client.org_usage(org)
    except OffloadError as exc:
        return Check(name, "warn", exc.message, exc.fix)
    if not usage.metered:
        return Check(name, "pass", f"unmetered; {usage.used_minutes:.0f} min used this month")
    left = usage.standard_minutes_left
    if left is not None and left <= 0:
        return Check(
            name,
            "fail",
            f"no allowance left this month ({usage.used_minutes:.0f} min used)",
            f"Ask an owner of {org} to add committed minutes or enable on-demand, "
            "or start with another organisation: `docker offload start --account ORG`.",
        )
    remaining = "unlimited" if left is None else f"{left:.0f} min left"
    return Check(name, "pass", f"{usage.used_minutes:.0f} min used this month, {remaining}")


def _clock_check(date_header: str | None) -> Check:
    if not date_header:
        return Check("clock skew", "skip", "server sent no Date header")
    skew = abs((datetime.now(UTC) - parsedate_to_datetime(date_header)).total_seconds())
    if skew > MAX_CLOCK_SKEW_S:
        return Check(
            "clock skew",
            "fail",
            f"this machine's clock is {skew:.0f}s away from the server's",
            "Synchronise the clock (e.g. `timedatectl set-ntp true`): certificates depend on it.",
        )
    return Check("clock skew", "pass", f"{skew:.0f}s")


async def _runner_check(session: SessionFile | None) -> Check:
    """Reach the runner's SSH endpoint and verify its host key against the pinned one."""
    if session is None or session.session.runner is None:
        return Check("runner reachable (SSH, pinned key)", "skip", "no session started")
    runner = session.session.runner
    known = asyncssh.import_known_hosts(
        f"[{runner.ssh_host}]:{runner.ssh_port} {runner.host_key}\n"
    )
    where = f"{runner.name} at {runner.ssh_host}:{runner.ssh_port}"
    try:
        conn = await within(
            asyncssh.connect(
                runner.ssh_host,
                runner.ssh_port,
                username="offload-diagnose",
                known_hosts=known,
                client_keys=None,
                agent_path=None,
                config=None,
                password=None,
            ),
            timeout=10,
        )
        conn.close()
    except asyncssh.PermissionDenied:
        pass  # host key verified, then (as expected) no credentials: reachable and genuine
    except asyncssh.HostKeyNotVerifiable:
        return Check(
            "runner reachable (SSH, pinned key)",
            "fail",
            f"{where} presented a host key other than the pinned one",
            "Do not connect; tell your Offload operator (possible interception or a re-keyed runner).",
        )
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        return Check(
            "runner reachable (SSH, pinned key)",
            "fail",
            f"{where}: {exc.__class__.__name__}: {exc}",
            "Check your network or VPN to the runner; `docker offload start` picks a live runner.",
        )
    return Check("runner reachable (SSH, pinned key)", "pass", where)


async def _local_checks(paths: ClientPaths, session: SessionFile | None) -> list[Check]:
    checks: list[Check] = []
    if dockerctx.docker_binary() is None:
        checks.append(
            Check("docker CLI", "fail", "not on PATH", "Install it: apt-get install docker.io")
        )
    else:
        context = dockerctx.current_context()
        on_offload = context == dockerctx.CONTEXT_NAME
        checks.append(
            Check(
                "docker CLI and context",
                "pass" if on_offload or session is None else "warn",
                f"current context: {context}",
                "" if on_offload or session is None else "Run `docker context use offload`.",
            )
        )
        plugin = dockerctx.plugin_path()
        checks.append(
            Check(
                "docker offload plugin",
                "pass" if plugin.exists() else "warn",
                str(plugin) if plugin.exists() else "not installed",
                "" if plugin.exists() else "`offload start` installs it.",
            )
        )
    checks.append(await _agent_check(paths, session))
    checks.append(_isolation_check(paths, session))
    return checks


async def _agent_check(paths: ClientPaths, session: SessionFile | None) -> Check:
    if session is None:
        return Check("agent", "skip", "no session started")
    agent = read_model(paths.agent_state_file, AgentState)
    if agent is None or not processes.is_alive(agent.pid):
        return Check(
            "agent",
            "fail",
            "the agent is not running",
            f"Run `docker offload start` to reconnect; its log is {paths.agent_log}.",
        )
    if agent.suspended or agent.session_state in ("terminated", "failed"):
        # Pinging would wake the session up (resume, or a new session): report what the agent
        # says instead.
        what = "idle, tunnel suspended" if agent.suspended else "ended"
        return Check(
            "agent",
            "pass",
            f"pid {agent.pid}, session {what}: the next docker command "
            + ("resumes it" if agent.suspended else "starts a new one"),
        )
    if not await ping_engine(paths.agent_socket):
        return Check(
            "agent",
            "fail",
            f"agent pid {agent.pid} runs but its socket does not answer: "
            f"{agent.last_error or 'tunnel down'}",
            f"See {paths.agent_log}; `docker offload start` restarts it.",
        )
    return Check("agent", "pass", f"pid {agent.pid}, engine answers on {paths.agent_socket}")


def _isolation_check(paths: ClientPaths, session: SessionFile | None) -> Check:
    """Which sandbox the session's engine runs in, as the agent learnt it from the engine."""
    if session is None:
        return Check("session isolation", "skip", "no session started")
    agent = read_model(paths.agent_state_file, AgentState)
    if agent is None or agent.isolation is None:
        return Check(
            "session isolation",
            "warn",
            "the engine has not said how it is isolated (an older runner, or not connected yet)",
            "Run a docker command, then `offload diagnose` again; ask your operator if it stays.",
        )
    return Check("session isolation", "pass", isolation_label(agent.isolation) or "")


async def _engine_labels(socket: Path) -> dict[str, str]:
    transport = httpx.AsyncHTTPTransport(uds=str(socket))
    async with httpx.AsyncClient(transport=transport, timeout=5) as http:
        info = (await http.get("http://engine/info")).json()
    labels = [str(label) for label in info.get("Labels") or []]
    return dict(label.partition("=")[::2] for label in labels)


async def _gpu_check(
    paths: ClientPaths, config: ClientConfig, session: SessionFile | None
) -> Check:
    """A GPU session: the control plane's GPU, the engine seeing it, and `--gpus` served."""
    name = "GPU"
    if session is None or not session.session.gpu:
        return Check(name, "skip", "not a GPU session")
    try:
        async with UserClient(config.server_url, config.token) as client:
            info = await client.get_session(session.session.id)
    except OffloadError as exc:
        return Check(name, "skip", f"the control plane did not answer: {exc.message}")
    if not info.state.live:
        return Check(name, "skip", f"session {info.id} has ended")
    runner = info.runner.name if info.runner else "its runner"
    if not info.gpu_devices:
        return Check(
            name,
            "fail",
            f"session {info.id} is a GPU session but {runner} no longer reports its GPU",
            f"Stop it and start again with --gpu; tell your operator that {runner} lost a GPU.",
        )
    described = "; ".join(f"{gpu.describe()} ({gpu.uuid})" for gpu in info.gpu_devices)
    try:
        labels = await within(_engine_labels(paths.agent_socket), 5)
    except (OSError, httpx.HTTPError, TimeoutError, ValueError):
        return Check(
            name, "warn", f"{described}; the engine did not answer", "See the agent check."
        )
    seen = set(filter(None, labels.get(s.ENGINE_GPU_LABEL, "").split(",")))
    if seen != {gpu.uuid for gpu in info.gpu_devices}:
        return Check(
            name,
            "fail",
            f"the control plane gave {described}, the engine sees {', '.join(sorted(seen)) or 'none'}",
            f"Stop and start the session again; if it stays, tell your operator ({runner}).",
        )
    if labels.get(s.ENGINE_GPU_RUNTIME_LABEL, s.GPU_RUNTIME_NONE) == s.GPU_RUNTIME_NONE:
        return Check(
            name,
            "warn",
            f"{described}; {runner} has no NVIDIA Container Toolkit, so `docker run --gpus` fails "
            "(`--device /dev/nvidia0` works)",
            f"Ask your operator to install nvidia-container-toolkit on {runner}.",
        )
    return Check(name, "pass", f"{described}; `docker run --gpus all` gives it to containers")


def as_json(checks: list[Check]) -> dict[str, object]:
    return {"ok": not any(c.failed for c in checks), "checks": [asdict(c) for c in checks]}
