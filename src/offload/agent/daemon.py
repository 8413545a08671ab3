"""`offload agent`: the laptop daemon that ties the tunnel and the Docker API proxy together.

The CLI starts it detached (`python -m offload.agent.daemon`, stderr to `ClientPaths.agent_log`)
after `offload start` wrote the session file. It

- connects the session's tunnel and keeps it up, renewing the session certificate before it
  expires (in the background, and on every reconnect when it is close to expiry);
- serves the Docker API on `ClientPaths.agent_socket`;
- forwards the ports the session's containers publish to the same ports on this laptop
  (`offload.agent.ports`, `offload.agent.channels`), re-read after every reconnect or resume;
- syncs the laptop directories that container creates bind into the session's mount area and
  points the binds there (`offload.agent.intercept`, `offload.sync.laptop.SyncManager`), and
  shows those binds' laptop paths in the engine's answers (`offload.agent.bind_sources`,
  remembered in `run/bind-sources.json` for the next agent);
- tells the control plane about Docker activity (`offload.agent.activity`) and follows the
  session's lifecycle: tunnel suspended while idle, resumed, or a new session once the old one
  was wiped (`offload.agent.keeper`);
- writes `AgentState` to `ClientPaths.agent_state_file` whenever something changes, for
  `offload status` and `offload start`;
- once the user stopped the session elsewhere, answers every Docker request with
  "Offload: session ended…" until it is stopped (SIGTERM/SIGINT).

Certificates and tokens never reach the log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import asyncssh
from asyncssh.public_key import SSHOpenSSHCertificate

from offload.agent.activity import ActivityReporter, ActivityTracker
from offload.agent.bind_sources import SOURCES_FILE, BindSources
from offload.agent.channels import ForwardChannels
from offload.agent.engine_requests import OpenEngine, engine_isolation
from offload.agent.intercept import CreateBinds
from offload.agent.keeper import (
    SESSION_ENDED,
    AgentSettings,
    SessionEnded,
    SessionKeeper,
    SessionMoved,
)
from offload.agent.ports import PortForwarder
from offload.agent.proxy import AgentProxy
from offload.agent.state import AgentState, ClientConfig, SessionFile, read_model, write_model
from offload.agent.tunnel import Tunnel, TunnelTarget
from offload.core.api_client import UserClient
from offload.core.client_paths import ClientPaths
from offload.core.errors import Conflict, InvalidInput, NotFound, OffloadError
from offload.core.schemas import SessionInfo
from offload.core.waiting import wait_event, within
from offload.sync.laptop import SyncManager

log = logging.getLogger("offload.agent")

__all__ = ["SESSION_ENDED", "Credentials", "SessionEnded", "certificate_validity", "run_agent"]

# Renew when less than this share of the certificate's validity is left.
RENEW_FRACTION = 1 / 3
RENEW_RETRY_S = 30.0
MIN_RENEW_INTERVAL_S = 60.0
# Connection counts change on every docker command: write the state file at most this often.
STATE_WRITE_DELAY_S = 0.5
# How often the synced paths' status is looked at for `offload status`.
SYNC_STATUS_INTERVAL_S = 1.0
ISOLATION_QUERY_TIMEOUT_S = 10.0


class Credentials:
    """The session's certificate, renewed through the control plane before it expires."""

    def __init__(
        self,
        client: UserClient,
        session: SessionInfo,
        private_key_path: Path,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self.session = session
        self._key_path = private_key_path
        self._wall_clock = wall_clock
        self._lock = asyncio.Lock()
        # This laptop's name: a live session held by another name was taken over.
        self.client_name: str | None = None

    def target(self) -> TunnelTarget:
        session = self.session
        if session.runner is None or not session.certificate:
            raise InvalidInput(
                f"Session {session.id} has no runner or certificate in the session file.",
                "Run `docker offload start` again.",
            )
        return TunnelTarget(
            host=session.runner.ssh_host,
            port=session.runner.ssh_port,
            host_key=session.runner.host_key,
            username=session.id,
            private_key_path=self._key_path,
            certificate=session.certificate,
        )

    def renew_at(self) -> float:
        """Wall-clock time at which the certificate enters its last third of validity."""
        valid_after, valid_before = certificate_validity(self.target().certificate)
        return valid_before - (valid_before - valid_after) * RENEW_FRACTION

    def needs_renewal(self) -> bool:
        return self._wall_clock() >= self.renew_at()

    async def fresh_target(self) -> TunnelTarget:
        """For the tunnel's reconnects: check the session is live, renew if due."""
        async with self._lock:
            if self.needs_renewal():
                await self._renew()
            else:
                self._check_live(await self._get())
            return self.target()

    async def renew(self) -> None:
        async with self._lock:
            await self._renew()

    async def _get(self) -> SessionInfo:
        try:
            return await self._client.get_session(self.session.id)
        except NotFound:
            raise SessionEnded(SESSION_ENDED) from None

    async def _renew(self) -> None:
        # Check first: renewing with this laptop's key after another machine took the session
        # over would make the control plane hand the session back to this key.
        self._check_live(await self._get())
        public_key = await asyncio.to_thread(_public_key_line, self._key_path)
        try:
            session = await self._client.renew_certificate(self.session.id, public_key)
        except NotFound:
            raise SessionEnded(SESSION_ENDED) from None
        except Conflict:
            self._check_live(await self._get())  # an ended session is refused with a Conflict
            raise
        self._check_live(session)
        if session.runner is None:
            session = session.model_copy(update={"runner": self.session.runner})
        self.session = session
        log.info("session certificate renewed (valid until %s)", session.certificate_valid_before)

    def _check_live(self, session: SessionInfo) -> None:
        if not session.state.live:
            raise SessionEnded(SESSION_ENDED, session)
        if self.client_name and session.client_name and session.client_name != self.client_name:
            raise SessionMoved(session.client_name)


def certificate_validity(certificate: str) -> tuple[float, float]:
    """(valid_after, valid_before) of an OpenSSH certificate, as POSIX timestamps."""
    cert = asyncssh.import_certificate(certificate)
    if not isinstance(cert, SSHOpenSSHCertificate):
        raise InvalidInput("The session certificate is not an OpenSSH certificate.", "")
    # asyncssh keeps the decoded validity window without a public accessor.
    return float(cert._valid_after), float(cert._valid_before)


def _public_key_line(key_path: Path) -> str:
    return asyncssh.read_private_key(key_path).export_public_key().decode().strip()


class StateWriter:
    """Keeps `agent.json` in step with the tunnel and proxy, without writing on every byte."""

    def __init__(self, paths: ClientPaths, session_id: str) -> None:
        self._paths = paths
        self.state = AgentState(
            pid=os.getpid(),
            session_id=session_id,
            socket=str(paths.agent_socket),
            connected=False,
            started_at=datetime.now(UTC),
        )
        self._scheduled: asyncio.TimerHandle | None = None
        self._ports: PortForwarder | None = None

    def tunnel_changed(self, tunnel: Tunnel) -> None:
        was = self.state.connected
        self.state.connected = tunnel.connected
        self.state.suspended = tunnel.suspended
        if self.state.last_error != SESSION_ENDED:  # the end of the session is what matters
            self.state.last_error = tunnel.last_error
        if tunnel.connected and not was:
            self.state.connected_since = datetime.now(UTC)
        elif not tunnel.connected:
            self.state.connected_since = None
        self.write()

    def proxy_changed(self, proxy: AgentProxy) -> None:
        self.state.open_connections = proxy.activity_snapshot().open_connections
        self._write_soon()

    def ports_changed(self, forwarder: PortForwarder) -> None:
        # Snapshot when writing: every forwarded connection opens and closes this, and building
        # a snapshot of every forward each time is work on the forward's own path.
        self._ports = forwarder
        self._write_soon()

    def detach_ports(self) -> None:
        """The forwarder is gone: `ports` stays what the caller sets."""
        self._ports = None

    def syncs_changed(self, manager: SyncManager) -> None:
        statuses = manager.statuses()
        if statuses != self.state.synced_paths:
            self.state.synced_paths = statuses
            self._write_soon()

    def _write_soon(self) -> None:
        if self._scheduled is None:
            loop = asyncio.get_running_loop()
            self._scheduled = loop.call_later(STATE_WRITE_DELAY_S, self.write)

    def write(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if self._ports is not None:
            self.state.ports = self._ports.snapshot()
        write_model(self._paths.agent_state_file, self.state)


def _load(paths: ClientPaths) -> tuple[ClientConfig, SessionFile]:
    config = read_model(paths.config_file, ClientConfig)
    if config is None:
        raise NotFound(
            f"No client configuration at {paths.config_file}.",
            "Sign in with `offload login` (or `offload up`), then `docker offload start`.",
        )
    session_file = read_model(paths.session_file, SessionFile)
    if session_file is None:
        raise NotFound(
            f"No session file at {paths.session_file}: the agent has no session to serve.",
            "Start one with `docker offload start` (it launches the agent).",
        )
    return config, session_file


async def _renew_in_background(
    credentials: Credentials,
    tunnel: Tunnel,
    keeper: SessionKeeper,
    stop: asyncio.Event,
    wall_clock: Callable[[], float],
) -> None:
    """Renew the certificate when it enters its last third, so reconnects never wait on it."""
    minimum = 0.0
    while not stop.is_set():
        if keeper.ended is not None or keeper.moved_to is not None or keeper.stopped:
            # Nothing to renew until a Docker request starts a new session.
            if await _wait(stop, RENEW_RETRY_S):
                return
            continue
        # At least a minute between renewals: a laptop clock far ahead of the control plane's
        # would otherwise see every fresh certificate as due and renew in a loop.
        delay = max(minimum, credentials.renew_at() - wall_clock())
        if await _wait(stop, delay):
            return
        minimum = MIN_RENEW_INTERVAL_S
        try:
            await credentials.renew()
            if not tunnel.suspended:
                tunnel.target = credentials.target()
        except (SessionEnded, SessionMoved) as exc:
            keeper.tunnel_gave_up(exc)
        except OffloadError as exc:
            log.warning("certificate renewal failed: %s", exc.message)
            if await _wait(stop, RENEW_RETRY_S):
                return


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    """True if `event` was set within `timeout`."""
    return await wait_event(event, timeout)


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (tests pass their own stop event)


async def run_agent(
    paths: ClientPaths,
    stop: asyncio.Event | None = None,
    *,
    wall_clock: Callable[[], float] = time.time,
    tunnel_options: dict[str, float] | None = None,
    settings: AgentSettings | None = None,
) -> None:
    """Serve the session in `paths.session_file` until `stop` is set (or SIGTERM/SIGINT)."""
    config, session_file = _load(paths)
    settings = settings or AgentSettings()
    if stop is None:
        stop = asyncio.Event()
        _install_signal_handlers(stop)
    session_id = session_file.session.id
    client = UserClient(config.server_url, config.token)
    credentials = Credentials(
        client, session_file.session, Path(session_file.private_key_path), wall_clock
    )
    state = StateWriter(paths, session_id)
    tunnel = Tunnel(
        credentials.target(),
        credentials.fresh_target,
        on_change=state.tunnel_changed,
        **(tunnel_options or {}),  # type: ignore[arg-type]
    )
    tracker = ActivityTracker(stream_after_s=settings.stream_after_s)
    syncs = SyncManager(tunnel.open_sync_stream)
    sources = BindSources(paths.agent_state_file.with_name(SOURCES_FILE))
    creates = CreateBinds(syncs, sources=sources)
    proxy = AgentProxy(
        paths.agent_socket, tunnel, tracker=tracker, creates=creates, responses=sources,
        builds=True,
    )  # fmt: skip
    proxy.on_change = state.proxy_changed
    keeper = SessionKeeper(
        paths=paths,
        session_file=session_file,
        client=client,
        credentials=credentials,
        tunnel=tunnel,
        tracker=tracker,
        state=state,
        refuse_all=proxy.refuse_all,
        settings=settings,
    )
    proxy.gate = keeper
    channels = ForwardChannels(tunnel, tracker, keeper)
    ports = PortForwarder(
        channels.open_tcp, channels.open_udp, channels.open_engine, take_tcp=channels.take_tcp
    )
    ports.on_change = state.ports_changed
    ports.on_activity = tracker.note_traffic
    reporter = ActivityReporter(
        tracker,
        keeper.send_report,
        min_interval_s=settings.report_min_interval_s,
        keepalive_s=settings.keepalive_report_s,
    )

    def on_quiet(quiet: bool) -> None:
        state.state.activity_quiet = quiet
        state.write()

    reporter.on_quiet = on_quiet

    was_connected = False
    learning: set[asyncio.Task[None]] = set()

    def on_tunnel_change(t: Tunnel) -> None:
        nonlocal was_connected
        state.tunnel_changed(t)
        if t.connected and not was_connected:
            # Reconnected, resumed or a new session: its engine and mount area may differ.
            ports.kick()
            syncs.kick()
            task = asyncio.create_task(_learn_isolation(channels.open_engine, state))
            learning.add(task)
            task.add_done_callback(learning.discard)
        was_connected = t.connected
        if t.failed is not None:
            keeper.tunnel_gave_up(t.failed)

    tunnel.on_change = on_tunnel_change
    state.write()
    log.info("agent for session %s starting (pid %s)", session_id, os.getpid())
    background: list[asyncio.Task[None]] = []
    try:
        await proxy.start()
        if await _usable(credentials, tunnel, keeper):
            await tunnel.start()
        await ports.start()
        background = [
            asyncio.create_task(_watch_syncs(syncs, state, stop)),
            asyncio.create_task(
                _renew_in_background(credentials, tunnel, keeper, stop, wall_clock)
            ),
            asyncio.create_task(reporter.run()),
            asyncio.create_task(keeper.poll()),
        ]
        await stop.wait()
        log.info("agent stopping")
    finally:
        for task in [*background, *learning]:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await keeper.close()
        await proxy.stop()
        await ports.close()
        channels.standby.close()
        await syncs.close()
        await tunnel.close()
        await client.aclose()
        state.state.connected = False
        state.state.connected_since = None
        state.state.open_connections = 0
        state.state.suspended = False
        state.detach_ports()
        state.state.ports = None
        state.state.synced_paths = []
        state.state.last_error = "the agent stopped"
        state.write()
        log.info("agent stopped")


async def _learn_isolation(open_engine: OpenEngine, state: StateWriter) -> None:
    """Ask the (new) engine how it is isolated, for `offload status` and `diagnose`."""
    try:
        isolation = await within(engine_isolation(open_engine), ISOLATION_QUERY_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError, asyncssh.Error) as exc:
        log.info("could not ask the engine for its isolation: %s", exc)
        return
    if isolation != state.state.isolation:
        state.state.isolation = isolation
        state.write()


async def _watch_syncs(syncs: SyncManager, state: StateWriter, stop: asyncio.Event) -> None:
    """Keep the synced paths' status in the state file (syncs change without telling)."""
    while not await _wait(stop, SYNC_STATUS_INTERVAL_S):
        state.syncs_changed(syncs)


async def _usable(credentials: Credentials, tunnel: Tunnel, keeper: SessionKeeper) -> bool:
    """False if the session has ended (the keeper knows then). A certificate read from an old
    session file may have expired: renew it before the first connection."""
    if not credentials.needs_renewal():
        return True
    try:
        await credentials.renew()
        tunnel.target = credentials.target()
    except (SessionEnded, SessionMoved) as exc:
        keeper.tunnel_gave_up(exc)
        return False
    except OffloadError as exc:
        log.warning("certificate renewal failed: %s", exc.message)  # the tunnel retries
    return True


def _setup_logging() -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # asyncssh logs every channel at INFO: keep the agent log about what matters.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    # httpx logs every request at INFO: the session poll alone would fill the log.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def main() -> None:
    _setup_logging()
    paths = ClientPaths()
    try:
        asyncio.run(run_agent(paths))
    except OffloadError as exc:
        log.error("agent cannot run: %s", exc)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
