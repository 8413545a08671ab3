"""The agent's side of the session lifecycle (docs/activity.md, "What the agent and the runner do").

`SessionKeeper` listens to every answer of the control plane (activity reports, and a poll every
`poll_interval_s` while nothing else was heard) and acts on it:

- `idle`: the tunnel is suspended (the SSH connection closed; the local socket stays). The next
  Docker request is held while `wake` reports activity (which resumes the session within its
  grace), reconnects and waits for the runner to unpause the containers; then it goes through.
- `terminated` / `failed` (grace over, a limit, an error): the next Docker request creates a new
  session (same key, same client name), rewrites the session file, reconnects and tells the user
  once (agent log, `offload status`). A session the user stopped is not replaced: its agent
  answers "session ended" until `offload stop` / `start`.
- another machine took the session over (`--takeover`): every request is refused, naming it.
- a new prompt or warning: a desktop notification where the laptop has one.

Everything `offload status` needs goes into the agent state file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from offload.agent.activity import ActivityTracker
from offload.agent.state import SessionFile, client_name, write_model
from offload.agent.tunnel import Tunnel
from offload.core.api_client import UserClient
from offload.core.client_paths import ClientPaths
from offload.core.errors import NotFound, OffloadError, PermissionDenied, Unreachable
from offload.core.schemas import ActivityReport, SessionCreate, SessionInfo, SessionState
from offload.core.waiting import WaitTimeout, async_wait_until, within

if TYPE_CHECKING:
    from offload.agent.daemon import Credentials, StateWriter

log = logging.getLogger("offload.agent")

SESSION_ENDED = "Offload: session ended. Run `docker offload start`."
# The control plane's end reason for `offload stop` (server.services.sessions.STOPPED_BY_USER):
# a session the user ended on purpose is not replaced behind their back.
STOPPED_BY_USER = "stopped by user"
_PAUSED_QUERY = (
    b"GET /containers/json?filters=%7B%22status%22%3A%5B%22paused%22%5D%7D HTTP/1.0\r\n"
    b"Host: docker\r\n\r\n"
)


class AgentSettings(BaseSettings):
    """The agent's timings (`OFFLOAD_AGENT_…`); the defaults follow docs/activity.md."""

    model_config = SettingsConfigDict(env_prefix="OFFLOAD_AGENT_", extra="ignore")

    poll_interval_s: float = Field(default=12.0, gt=0, le=300)
    report_min_interval_s: float = Field(default=2.0, gt=0, le=60)
    keepalive_report_s: float = Field(default=5.0, gt=0, le=60)
    stream_after_s: float = Field(default=2.0, ge=0, le=60)
    wake_timeout_s: float = Field(default=30.0, gt=0, le=600)
    unpause_wait_s: float = Field(default=5.0, ge=0, le=60)


class SessionEnded(NotFound):
    """The control plane no longer knows this session as live."""

    def __init__(self, message: str = SESSION_ENDED, session: SessionInfo | None = None) -> None:
        super().__init__(message, "")
        self.session = session


class SessionMoved(PermissionDenied):
    """Another machine took the session over (`docker offload start --takeover`)."""

    def __init__(self, machine: str) -> None:
        super().__init__(
            f"your session moved to {machine} (`docker offload start --takeover` there)",
            "Run `docker offload start --takeover` to move it back to this machine.",
        )
        self.machine = machine


class Notifier:
    """Desktop notifications through notify-send (Linux) or osascript (macOS), if present."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def command(self, title: str, message: str) -> list[str] | None:
        if path := shutil.which("notify-send"):
            return [path, "--app-name=Offload", title, message]
        if path := shutil.which("osascript"):
            script = f"display notification {json.dumps(message)} with title {json.dumps(title)}"
            return [path, "-e", script]
        return None

    async def once(self, key: str, title: str, message: str) -> None:
        """Notify about `key` the first time it is seen; silently nothing without a desktop."""
        if key in self._seen:
            return
        self._seen.add(key)
        argv = self.command(title, message)
        if argv is None:
            return
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
            )
            await within(process.wait(), 10)
        except (OSError, TimeoutError):
            log.info("desktop notification not shown (%s)", argv[0])


class SessionKeeper:
    def __init__(
        self,
        *,
        paths: ClientPaths,
        session_file: SessionFile,
        client: UserClient,
        credentials: Credentials,
        tunnel: Tunnel,
        tracker: ActivityTracker,
        state: StateWriter,
        refuse_all: Callable[[str], None],
        settings: AgentSettings,
        clock: Callable[[], float] = time.monotonic,
        notifier: Notifier | None = None,
    ) -> None:
        self.paths = paths
        self.session_file = session_file
        self.client = client
        self.credentials = credentials
        self.tunnel = tunnel
        self.tracker = tracker
        self.state = state
        self._refuse_all = refuse_all
        self.settings = settings
        self._clock = clock
        self.notifier = notifier or Notifier()
        self.client_name = (
            session_file.client_name or session_file.session.client_name or client_name()
        )
        credentials.client_name = self.client_name
        self.ended: SessionInfo | None = None  # set: the next request starts a new session
        self.stopped = False  # the user stopped the session: refuse, never replace
        self.moved_to: str | None = None
        self._lock = asyncio.Lock()
        self._woke_at = clock()
        self._last_answer = clock()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def session_id(self) -> str:
        return self.credentials.session.id

    # ---- the proxy's gate -----------------------------------------------------------------

    def needs_wake(self) -> bool:
        return self.moved_to is None and (self.tunnel.suspended or self.ended is not None)

    async def wake(self) -> None:
        """Make the tunnel usable for a held Docker request (one wake for many requests)."""
        async with self._lock:
            if self.moved_to is not None:
                raise SessionMoved(self.moved_to)
            if self.ended is not None:
                await self._replace()
            elif self.tunnel.suspended:
                await self._resume()
            self._woke_at = self._clock()

    async def _resume(self) -> None:
        log.info("Docker activity on idle session %s: resuming it", self.session_id)
        try:
            await self._report(ActivityReport(api_calls=1))
        except SessionEnded:
            pass  # mark_ended has run: replaced below
        if self.ended is not None:
            await self._replace()
            return
        try:
            target = await self.credentials.fresh_target()
        except SessionEnded as exc:
            self.mark_ended(exc.session)
            await self._replace()
            return
        await self.tunnel.resume(target)
        await self.tunnel.wait_connected(self.settings.wake_timeout_s)
        self._set_suspended(False)
        await self._wait_unpaused()

    async def _replace(self) -> None:
        old = self.ended or self.credentials.session
        if old.end_reason == STOPPED_BY_USER:
            raise SessionEnded(SESSION_ENDED.removeprefix("Offload: "))
        public_key = await asyncio.to_thread(
            _public_key_line, Path(self.session_file.private_key_path)
        )
        try:
            info = await self.client.create_session(
                SessionCreate(
                    org=self.session_file.account,
                    idle_timeout_s=self.session_file.idle_timeout_s,
                    client_public_key=public_key,
                    client_name=self.client_name,
                )
            )
        except OffloadError as exc:  # say why the old one ended, then why no new one
            why = old.end_reason or old.state.value
            raise type(exc)(
                f"Your session {old.id} ended ({why}), and a new one could not start: "
                f"{exc.message}",
                exc.fix,
            ) from None
        if info.runner is None or not info.certificate:
            raise Unreachable(f"the new session {info.id} came without a runner or certificate")
        self.session_file = self.session_file.model_copy(
            update={"session": info, "account": info.org}
        )
        write_model(self.paths.session_file, self.session_file)
        self.credentials.session = info
        self.ended = None
        notice = info.replaced_session_notice or (
            f"Your previous session {old.id} ended ({old.end_reason or old.state.value}); this "
            f"is a new session {info.id} on a clean environment."
        )
        log.warning("%s", notice)
        self.state.state.session_id = info.id
        self.state.state.replaced_session_notice = notice
        self.state.state.last_error = None
        self.observe(info, self._clock())
        await self.tunnel.resume(self.credentials.target())
        await self.tunnel.wait_connected(self.settings.wake_timeout_s)
        self._set_suspended(False)

    async def _wait_unpaused(self) -> None:
        """Give the runner a moment to unpause the containers it paused while idle, so that
        the held request (e.g. `docker exec`) does not meet a paused container."""
        if self.settings.unpause_wait_s <= 0:
            return
        try:
            await async_wait_until(
                self._nothing_paused, self.settings.unpause_wait_s, "containers to unpause", 0.1
            )
        except WaitTimeout:
            log.info("containers still paused after %.0fs; going on", self.settings.unpause_wait_s)

    async def _nothing_paused(self) -> bool:
        try:
            reader, writer = await self.tunnel.open_engine_channel()
            try:
                writer.write(_PAUSED_QUERY)
                data = await within(reader.read(), 5)
            finally:
                writer.close()
            _, _, body = data.partition(b"\r\n\r\n")
            return len(json.loads(body)) == 0
        except (OffloadError, OSError, TimeoutError, ValueError, asyncssh.Error):
            return True  # cannot tell: let the request go

    # ---- answers of the control plane ------------------------------------------------------

    async def send_report(self, report: ActivityReport) -> None:
        """The activity reporter's way out."""
        if self.ended is not None or self.moved_to is not None or self.stopped:
            return  # nothing to keep alive; the next request starts or refuses
        await self._report(report)

    async def _report(self, report: ActivityReport) -> SessionInfo:
        asked = self._clock()
        try:
            info = await self.client.report_activity(self.session_id, report)
        except NotFound:
            self.mark_ended(None)
            raise SessionEnded() from None
        self.observe(info, asked)
        return info

    async def poll(self) -> None:
        """Learn what changed (idle, prompts, warnings, the end) while nothing else tells us.

        A GET: polls are never activity."""
        while True:
            delay = self.settings.poll_interval_s - (self._clock() - self._last_answer)
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            self._last_answer = self._clock()
            if self.ended is not None or self.moved_to is not None or self.stopped:
                continue
            asked = self._clock()
            try:
                info = await self.client.get_session(self.session_id)
            except NotFound:
                self.mark_ended(None)
                continue
            except OffloadError as exc:
                log.info("session poll failed: %s", exc.message)
                continue
            self.observe(info, asked)

    def observe(self, info: SessionInfo, asked_at: float) -> None:
        """Take in one answer of the control plane about our session."""
        self._last_answer = self._clock()
        if info.id != self.session_id:
            return  # about a session this agent already replaced
        self._record(info)
        if info.client_name and info.client_name != self.client_name:
            self._moved(info.client_name)
        elif not info.state.live:
            self.mark_ended(info)
        elif info.state is SessionState.IDLE and not self.tunnel.suspended:
            if self.tracker.pending():
                self.tracker.note_change()  # fresh activity: the next report resumes it
            elif asked_at >= self._woke_at:
                self._spawn(self._suspend(asked_at))
        self._notify(info)
        self.state.write()

    def _record(self, info: SessionInfo) -> None:
        state = self.state.state
        state.session_state = info.state.value
        state.as_of = datetime.now(UTC)
        state.time_until_idle_s = info.time_until_idle_s
        state.fair_use_remaining_s = info.fair_use_remaining_s
        state.prompt = info.prompt
        state.warnings = list(info.warnings)

    def _notify(self, info: SessionInfo) -> None:
        if info.prompt is not None:
            message = f"{info.prompt.message} Answer with `offload keep` or `offload idle`."
            self._spawn(self.notifier.once(info.prompt.id, "Offload", message))
        for warning in info.warnings:
            self._spawn(self.notifier.once(warning, "Offload", warning))

    async def _suspend(self, asked_at: float) -> None:
        async with self._lock:
            if self.tunnel.suspended or self.ended is not None or asked_at < self._woke_at:
                return  # a request woke the session meanwhile: that answer is stale
            await self.tunnel.suspend()
            self._set_suspended(True)
            log.info(
                "session %s is idle: tunnel suspended; the next Docker command resumes it",
                self.session_id,
            )

    def _set_suspended(self, value: bool) -> None:
        self.state.state.suspended = value
        self.state.write()

    def mark_ended(self, info: SessionInfo | None) -> None:
        """The session is over: refuse (stopped by the user) or replace on the next request."""
        if self.ended is not None or self.stopped:
            return
        info = info or self.credentials.session.model_copy(
            update={"state": SessionState.TERMINATED}
        )
        self.state.state.session_state = info.state.value
        if info.end_reason == STOPPED_BY_USER:
            self.stopped = True
            self._refuse_all(SESSION_ENDED)
            self.state.state.last_error = SESSION_ENDED
        else:
            self.ended = info
            log.warning(
                "session %s ended (%s); the next Docker command starts a new session",
                info.id,
                info.end_reason or info.state.value,
            )
            self._spawn(self._quiet_tunnel())
        self.state.write()

    async def _quiet_tunnel(self) -> None:
        """No reconnecting to a session that is over or elsewhere."""
        async with self._lock:
            if (self.ended is not None or self.moved_to) and not self.tunnel.suspended:
                await self.tunnel.suspend()

    def _moved(self, machine: str) -> None:
        if self.moved_to is not None:
            return
        self.moved_to = machine
        moved = SessionMoved(machine)
        message = f"Offload: {moved.message}. {moved.fix}"
        log.warning("%s", message)
        self._refuse_all(message)
        self.state.state.moved_to = machine
        self.state.state.last_error = message
        self._spawn(self._quiet_tunnel())

    def tunnel_gave_up(self, exc: OffloadError) -> None:
        """The tunnel stopped retrying: learn why (ended, moved) from its error."""
        if isinstance(exc, SessionMoved):
            self._moved(exc.machine)
        elif isinstance(exc, SessionEnded):
            self.mark_ended(exc.session)
        elif isinstance(exc, NotFound):
            self.mark_ended(None)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _public_key_line(key_path: Path) -> str:
    return asyncssh.read_private_key(key_path).export_public_key().decode().strip()
