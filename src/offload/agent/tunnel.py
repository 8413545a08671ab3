"""The session's one SSH connection to its runner: certificate auth, pinned host key, reconnects.

Nothing from `~/.ssh` is used: no config file, no known_hosts, no agent, no default keys. The
only host key trusted is the one the control plane pinned for this session's runner, and the only
client credential is the session key with its CA-signed certificate.

When the connection drops, the tunnel reconnects with capped exponential backoff, asking
`credentials()` (when given) for a fresh target first, which is where the agent renews its
certificate. A host key mismatch, a session that no longer exists or a refused sign-in are not
retried: `failed` says why, and `docker` commands get that reason through the proxy.

Channels over the one connection: the engine (`open_engine_channel`/`open_engine_session`), a
published port (`open_port_channel`, `direct-tcpip` to 127.0.0.1:PORT in the session's namespace),
a UDP relay (`open_udp_channel`) and the file sync of the mount area (`open_sync_stream`).

While the session is idle the agent `suspend`s the tunnel (connection closed, no reconnects) and
`resume`s it when the next Docker request arrives.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from offload.agent.standby import STANDBY_CHANNEL_PATH
from offload.agent.udp_relay import udp_channel_path
from offload.core import ssh_fastpath
from offload.core.errors import (
    NotAuthenticated,
    NotFound,
    OffloadError,
    PermissionDenied,
    Suspended,
    Unreachable,
)
from offload.core.schemas import BUILDER_CHANNEL_PATH, ENGINE_CHANNEL_PATH
from offload.core.tunnel_tuning import CHANNEL_MAX_PKTSIZE, CHANNEL_WINDOW, ENCRYPTION_ALGS
from offload.core.waiting import wait_event
from offload.sync.protocol import SYNC_CHANNEL_PATH

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TunnelTarget:
    """Where and as whom to connect. `certificate` is the OpenSSH certificate text."""

    host: str
    port: int
    host_key: str  # OpenSSH public key line the control plane pinned for this runner
    username: str  # the session id
    private_key_path: Path
    certificate: str


class HostKeyMismatch(PermissionDenied):
    """The runner presented a host key other than the pinned one: possibly an impostor."""


class TunnelRefused(PermissionDenied):
    """The runner refused the session certificate (expired, revoked CA, or another session)."""


class _Retry(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


ChangeCallback = Callable[["Tunnel"], None]


class Tunnel:
    def __init__(
        self,
        target: TunnelTarget,
        credentials: Callable[[], Awaitable[TunnelTarget]] | None = None,
        *,
        on_change: ChangeCallback | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 15.0,
        connect_timeout_s: float = 15.0,
        keepalive_interval_s: float = 15.0,
        keepalive_count_max: int = 3,
        window: int = CHANNEL_WINDOW,
        max_pktsize: int = CHANNEL_MAX_PKTSIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self._clock = clock
        self._credentials = credentials
        self.on_change = on_change
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_interval_s = keepalive_interval_s
        self.keepalive_count_max = keepalive_count_max
        self.window = window
        self.max_pktsize = max_pktsize
        self.last_error: str | None = None
        self.failed: OffloadError | None = None  # set when the tunnel gave up for good
        self._conn: asyncssh.SSHClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._state_changed = asyncio.Event()
        self._closed = False
        # Suspended while the session is idle: no connection and no reconnecting until resumed.
        self.suspended = False

    # ---- state ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def _changed(self) -> None:
        self._state_changed.set()
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:  # a broken observer must not break the tunnel
                log.exception("tunnel on_change callback failed")

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start keeping the connection up, in the background; returns at once."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._keep_up())

    def kick(self) -> None:
        """Cut a backoff wait short: someone needs the tunnel now."""
        self._wake.set()

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        await self._stop_keeping_up()
        self._changed()

    async def suspend(self) -> None:
        """Close the connection and stop reconnecting (the session went idle); `resume` undoes."""
        self.suspended = True
        await self._stop_keeping_up()
        self.last_error = None
        log.info("tunnel to runner suspended")
        self._changed()

    async def resume(self, target: TunnelTarget | None = None) -> None:
        """Connect again after `suspend` or a give-up (optionally to a new target)."""
        if target is not None:
            self.target = target
        self.suspended = False
        self.failed = None
        self.last_error = None
        await self.start()

    @property
    def reconnecting(self) -> bool:
        """The connection dropped and the tunnel is trying again (not suspended, not given up)."""
        return (
            self._conn is None
            and self._task is not None
            and not self._task.done()
            and not self.suspended
            and self.failed is None
            and not self._closed
        )

    async def next_change(self, timeout: float) -> None:
        """Until the tunnel's state next changes (an attempt's outcome), at most `timeout`."""
        self._state_changed.clear()
        await wait_event(self._state_changed, timeout)

    async def wait_connected(self, timeout: float) -> None:
        """Until the connection is up; raises what made the tunnel give up, or Unreachable."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._conn is None:
            if self.failed is not None:
                raise self.failed
            remaining = deadline - loop.time()
            if remaining <= 0:
                reason = f" ({self.last_error})" if self.last_error else ""
                raise Unreachable(
                    f"the tunnel to the runner did not come up within {timeout:g}s{reason}"
                )
            self._state_changed.clear()
            await wait_event(self._state_changed, remaining)

    async def _stop_keeping_up(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            await conn.wait_closed()

    async def _keep_up(self) -> None:
        delay = self.backoff_initial_s
        fresh_needed = False
        while not self._closed:
            try:
                conn = await self._attempt(fresh_needed)
            except _Retry as retry:
                self.last_error = retry.reason
                log.warning("tunnel to runner: %s; retrying in %.1fs", retry.reason, delay)
                self._changed()
                fresh_needed = True
                await self._backoff(delay)
                delay = min(delay * 2, self.backoff_max_s)
                continue
            except OffloadError as exc:
                self._give_up(exc)
                return
            up_since = self._clock()
            self._conn, self.last_error = conn, None
            log.info("tunnel to runner %s:%s up", self.target.host, self.target.port)
            self._changed()
            await conn.wait_closed()
            if self._closed:
                return
            self._conn = None
            self.last_error = "the connection to the runner was lost"
            log.warning("tunnel to runner lost; reconnecting")
            self._changed()
            fresh_needed = True
            if self._clock() - up_since >= self.backoff_max_s:
                delay = self.backoff_initial_s
            else:
                # Dropped soon after it came up (e.g. the runner refused the session after
                # sign-in): keep backing off instead of hammering the runner.
                await self._backoff(delay)
                delay = min(delay * 2, self.backoff_max_s)

    async def _attempt(self, fresh_needed: bool) -> asyncssh.SSHClientConnection:
        """One connection attempt; raises `_Retry` for what a later attempt may cure."""
        if fresh_needed and self._credentials is not None:
            try:
                self.target = await self._credentials()
            except (NotFound, NotAuthenticated, PermissionDenied):
                raise  # the session or the user's access is gone: retrying cannot help
            except Exception as exc:
                raise _Retry(f"cannot renew the session credentials: {_describe(exc)}") from exc
        try:
            return await self._connect(self.target)
        except HostKeyMismatch:
            raise
        except TunnelRefused as exc:
            if self._credentials is None:
                raise  # nothing would change on the next attempt
            raise _Retry(exc.message) from exc
        except (OSError, asyncssh.Error, TimeoutError, OffloadError) as exc:
            raise _Retry(_describe(exc)) from exc

    def _give_up(self, exc: OffloadError) -> None:
        self.failed, self.last_error = exc, exc.message
        log.error("tunnel to runner stopped: %s", exc.message)
        self._changed()

    async def _backoff(self, delay: float) -> None:
        self._wake.clear()
        # Jitter so that many agents of a restarted runner do not reconnect in lockstep.
        await wait_event(self._wake, delay * random.uniform(0.8, 1.2))

    # ---- connecting -----------------------------------------------------------------------

    async def _connect(self, target: TunnelTarget) -> asyncssh.SSHClientConnection:
        ssh_fastpath.install()
        key = await asyncio.to_thread(asyncssh.read_private_key, target.private_key_path)
        cert = asyncssh.import_certificate(target.certificate)
        host_key = asyncssh.import_public_key(target.host_key)
        try:
            return await asyncssh.connect(
                target.host,
                target.port,
                username=target.username,
                # Trust exactly the pinned key, with no host-pattern matching.
                known_hosts=([host_key], [], []),
                client_keys=[(key, cert)],
                agent_path=None,
                config=[],
                x509_trusted_certs=None,
                gss_host=None,
                password=None,
                kbdint_auth=False,
                host_based_auth=False,
                preferred_auth="publickey",
                encryption_algs=ENCRYPTION_ALGS,
                compression_algs=None,
                keepalive_interval=self.keepalive_interval_s,
                keepalive_count_max=self.keepalive_count_max,
                connect_timeout=self.connect_timeout_s,
                window=self.window,
                max_pktsize=self.max_pktsize,
            )
        except asyncssh.HostKeyNotVerifiable:
            raise HostKeyMismatch(
                f"The runner host key does not match the one the control plane pinned "
                f"for {target.host}:{target.port}: refusing to connect.",
                "If the runner was reinstalled, run `docker offload start` again to get its "
                "new key; otherwise tell your administrator, the connection may be intercepted.",
            ) from None
        except asyncssh.PermissionDenied:
            raise _refused(target) from None

    # ---- channels -------------------------------------------------------------------------

    async def open_engine_channel(
        self,
    ) -> tuple[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]]:
        """A (reader, writer) pair on a new channel to the session's engine."""
        conn = self._require_conn()
        try:
            return await conn.open_unix_connection(
                ENGINE_CHANNEL_PATH, encoding=None, window=self.window, max_pktsize=self.max_pktsize
            )
        except (asyncssh.Error, OSError) as exc:
            raise _channel_failed(exc) from None

    async def open_engine_session(
        self, session_factory: Callable[[], asyncssh.SSHUNIXSession[bytes]]
    ) -> asyncssh.SSHUNIXChannel[bytes]:
        """A new channel to the engine driven by `session_factory`'s protocol (no streams)."""
        return await self._unix_channel(ENGINE_CHANNEL_PATH, session_factory, "engine")

    async def open_builder_session(
        self, session_factory: Callable[[], asyncssh.SSHUNIXSession[bytes]]
    ) -> asyncssh.SSHUNIXChannel[bytes]:
        """A channel for build requests: the organisation's builder (BUILDER_CHANNEL_PATH)."""
        return await self._unix_channel(BUILDER_CHANNEL_PATH, session_factory, "builder")

    async def open_standby_channel(self, session_factory: Callable[[], Any]) -> Any:
        """A channel opened ahead of a forwarded connection (`offload.agent.standby`)."""
        return await self._unix_channel(STANDBY_CHANNEL_PATH, session_factory, "a standby channel")

    async def _unix_channel(
        self, path: str, session_factory: Callable[[], Any], what: str
    ) -> asyncssh.SSHUNIXChannel[bytes]:
        conn = self._require_conn()
        try:
            chan, _ = await conn.create_unix_connection(
                session_factory,
                path,
                encoding=None,
                window=self.window,
                max_pktsize=self.max_pktsize,
            )
        except (asyncssh.Error, OSError) as exc:
            raise _channel_failed(exc, what) from None
        return chan

    async def open_port_channel(self, port: int, session_factory: Callable[[], Any]) -> Any:
        """A `direct-tcpip` channel to published port `port` of the session, driven by
        `session_factory`'s protocol (the port forwarder's far side)."""
        conn = self._require_conn()
        try:
            chan, _ = await conn.create_connection(
                session_factory,
                "127.0.0.1",
                port,
                encoding=None,
                window=self.window,
                max_pktsize=self.max_pktsize,
            )
        except (asyncssh.Error, OSError) as exc:
            raise _channel_failed(exc, f"port {port}") from None
        return chan

    async def open_udp_channel(
        self, port: int
    ) -> tuple[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]]:
        """A channel relaying framed datagrams to published UDP port `port` of the session."""
        return await self._open_stream(udp_channel_path(port), f"UDP port {port}")

    async def open_sync_stream(self) -> tuple[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]]:
        """A channel to the file-sync endpoint of the session's mount area."""
        return await self._open_stream(SYNC_CHANNEL_PATH, "file sync")

    async def _open_stream(
        self, path: str, what: str
    ) -> tuple[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]]:
        conn = self._require_conn()
        try:
            return await conn.open_unix_connection(
                path, encoding=None, window=self.window, max_pktsize=self.max_pktsize
            )
        except (asyncssh.Error, OSError) as exc:
            raise _channel_failed(exc, what) from None

    def _require_conn(self) -> asyncssh.SSHClientConnection:
        if self._conn is None:
            if self.suspended:
                raise Suspended("the tunnel is suspended while the session is idle")
            if self.failed is not None:
                raise Unreachable(self.failed.message)
            self.kick()
            reason = f" ({self.last_error})" if self.last_error else ""
            raise Unreachable(f"the tunnel to the runner is down{reason}")
        return self._conn


def _refused(target: TunnelTarget) -> TunnelRefused:
    return TunnelRefused(
        f"The runner refused the session certificate for session {target.username}.",
        "The session may have ended or its certificate expired: run `docker offload start`.",
    )


def _channel_failed(exc: BaseException, what: str = "engine") -> Unreachable:
    reason = exc.reason if isinstance(exc, asyncssh.ChannelOpenError) else _describe(exc)
    return Unreachable(f"the runner could not open the {what} channel ({reason})")


def _describe(exc: BaseException) -> str:
    """A one-line reason without secrets (asyncssh and OS errors carry none)."""
    text: Any = getattr(exc, "message", None) or getattr(exc, "reason", None) or str(exc)
    text = str(text).strip().splitlines()[0] if text else ""
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__
