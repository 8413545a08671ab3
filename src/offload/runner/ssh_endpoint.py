"""The runner's SSH endpoint: session certificates in, that session's engine socket out.

What a client may do once connected, and nothing more:

- authenticate with an OpenSSH *user certificate* signed by the control plane's CA, for the
  username (= session id) listed among its principals, valid now (plain keys, passwords and
  keyboard-interactive are refused);
- open `direct-streamlocal` channels to `ENGINE_CHANNEL_PATH`, which this endpoint connects to the
  engine socket of the environment bound to that session;
- open `direct-tcpip` channels to 127.0.0.1:PORT, forwarded into that environment's network
  namespace when one of its own running (or paused) containers publishes PORT/tcp
  (`offload.runner.port_gate`), and `direct-streamlocal` channels to `udp_channel_path(PORT)`,
  relaying framed datagrams to PORT/udp under the same rule;
- open `direct-streamlocal` channels to `BUILDER_CHANNEL_PATH`: build requests only, served by
  the persistent builder of the session's organisation (`offload.runner.builder_proxy`);
- open `direct-streamlocal` channels to `SYNC_CHANNEL_PATH`, served by the file-sync endpoint of
  that environment's mount area (`offload.sync.remote.RemoteEndpoint`): bind mounts of laptop
  directories land there, and nowhere else.

One key per session: the control plane names the fingerprint of the one client key allowed now
(`AssignedSession.client_key_fingerprint`; it changes on `--takeover` from another machine).  A
connection whose certified key has another fingerprint is refused after authentication (the
runner asks the control plane then, so the answer is fresh), and live connections made with
another key are closed the moment the runner hears of the change (`set_client_key`).

No shells, exec, subsystems, remote forwards, other socket paths or other TCP destinations.

Speed: the channel is spliced onto the engine socket at the asyncio protocol level
(`forward_unix_connection`), so bytes never pass through a stream or a task; windows and packets
are large so that an upload of hundreds of megabytes is not held back by window updates.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable

import asyncssh
from asyncssh.public_key import decode_ssh_certificate  # not re-exported at the top level

from offload.agent.standby import STANDBY_CHANNEL_PATH
from offload.agent.udp_relay import parse_udp_channel_path
from offload.core import ssh_fastpath
from offload.core.errors import OffloadError
from offload.core.schemas import BUILDER_CHANNEL_PATH, ENGINE_CHANNEL_PATH
from offload.core.tunnel_tuning import (
    CHANNEL_MAX_PKTSIZE,
    CHANNEL_WINDOW,
    ENCRYPTION_ALGS,
    KEEPALIVE_COUNT_MAX,
    KEEPALIVE_INTERVAL_S,
)
from offload.runner.builder_proxy import BuilderConnection, BuildRoute
from offload.runner.driver import Environment
from offload.runner.port_gate import PortGate, standby_tcp_forward, tcp_forward, udp_forward
from offload.sync.protocol import SYNC_CHANNEL_PATH
from offload.sync.remote import RemoteEndpoint

log = logging.getLogger(__name__)

LOGIN_TIMEOUT_S = 30.0

# Session ids become an authorized-keys `principals=` pattern: only plain characters, so that no
# wildcard or quote can widen it.
_SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

Resolve = Callable[[str], Awaitable[Environment]]
RouteBuilds = Callable[[str], Awaitable[BuildRoute]]


class _Server(asyncssh.SSHServer):
    """One client connection: authentication policy and channel policy."""

    def __init__(self, endpoint: SSHEndpoint) -> None:
        self._endpoint = endpoint
        self._conn: asyncssh.SSHServerConnection | None = None
        self._username = ""
        self._key_fingerprint: str | None = None  # of the certified key that authenticated
        # Set once authentication succeeded and the session's environment is known.
        self._env: asyncio.Future[Environment] = asyncio.get_running_loop().create_future()

    # ---- connection ---------------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._endpoint._connections.add(conn)
        self._note_certified_keys(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._endpoint._connections.discard(self._conn)
            self._endpoint._keys.pop(self._conn, None)
        if not self._env.done():
            self._env.cancel()

    # ---- authentication -----------------------------------------------------------------

    def begin_auth(self, username: str) -> bool:
        assert self._conn is not None
        self._username = username
        if not _SESSION_ID.match(username):
            # An impossible session id: trust nothing, so every method fails.
            self._conn.set_authorized_keys(asyncssh.SSHAuthorizedKeys())
            return True
        # Why authorized keys and not only validate_ca_key: asyncssh accepts a certificate whose
        # principal list is empty for any username (OpenSSH refuses those). A `principals=`
        # option makes asyncssh require the session id among the certificate's principals;
        # asyncssh still checks the certificate type and validity period against the clock.
        ca_key = self._endpoint._ca_public_key().strip()
        entry = f'cert-authority,principals="{username}" {ca_key}\n'
        self._conn.set_authorized_keys(asyncssh.import_authorized_keys(entry))
        return True

    def _note_certified_keys(self, conn: asyncssh.SSHServerConnection) -> None:
        """Remember which key a successful certificate login certified.

        asyncssh keeps the certificate to itself (no hook receives it), so its check is wrapped:
        the result is unchanged, and the key of the signed, accepted attempt is recorded."""
        check = conn.validate_public_key

        async def validate(username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
            accepted = await check(username, key_data, msg, signature)
            if accepted and msg:
                self._key_fingerprint = _certified_key_fingerprint(key_data)
            return accepted

        conn.validate_public_key = validate  # type: ignore[method-assign]

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return False  # plain keys: never, only certificates

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return False  # only the authorized-keys CA entry set in begin_auth is trusted

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    async def auth_completed(self) -> None:
        # Only an authenticated client makes the runner ask the control plane and bind an
        # environment: an anonymous peer must not be able to trigger either.
        try:
            env = await self._endpoint._resolve(self._username)
        except Exception as exc:  # any failure refuses the connection
            log.warning("SSH connection for session %s refused: %s", self._username, _reason(exc))
            self._refuse()
            return
        assert self._conn is not None
        if not self._endpoint.key_allowed(self._username, self._key_fingerprint):
            log.warning(
                "SSH connection for session %s refused: the session belongs to another client "
                "key now (taken over from another machine)", self._username,
            )  # fmt: skip
            self._refuse()
            return
        self._endpoint._keys[self._conn] = self._key_fingerprint
        log.info("SSH connection for session %s bound to environment %s", self._username, env.id)
        self._endpoint._envs[self._username] = env
        self._env.set_result(env)

    def _refuse(self) -> None:
        self._env.cancel()
        assert self._conn is not None
        self._conn.close()

    # ---- channels -----------------------------------------------------------------------

    def session_requested(self) -> bool:
        return False  # no shell, exec or subsystem

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> tuple[asyncssh.SSHTCPChannel[bytes], Awaitable[asyncssh.SSHTCPSession[bytes]]]:
        # A published port: checked (loopback only, published by this session) once the
        # session's environment is known, then spliced into its network namespace.
        assert self._conn is not None
        chan = self._conn.create_tcp_channel(
            window=self._endpoint.window, max_pktsize=self._endpoint.max_pktsize
        )
        return chan, self._forward_tcp(dest_host, dest_port)

    async def _forward_tcp(self, dest_host: str, dest_port: int) -> asyncssh.SSHTCPSession[bytes]:
        env = await self._bound_env()
        return await tcp_forward(self._endpoint.port_gate, env, dest_host, dest_port)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return False  # no remote TCP forwards

    def unix_server_requested(self, listen_path: str) -> bool:
        return False  # no remote socket forwards

    def unix_connection_requested(self, dest_path: str):  # type: ignore[no-untyped-def]
        session: object
        if dest_path == ENGINE_CHANNEL_PATH:
            session = self._forward_to_engine()
        elif dest_path == STANDBY_CHANNEL_PATH:
            session = standby_tcp_forward(self._endpoint.port_gate, self._bound_env)
        elif dest_path == SYNC_CHANNEL_PATH:
            session = self._serve_sync  # a stream handler: asyncssh calls it with (reader, writer)
        elif dest_path == BUILDER_CHANNEL_PATH and self._endpoint.build_route is not None:
            session = self._serve_builder
        elif parse_udp_channel_path(dest_path) is not None:
            session = self._forward_udp(dest_path)
        else:
            log.warning("session %s: channel to %r refused", self._username, dest_path)
            return False
        assert self._conn is not None
        chan = self._conn.create_unix_channel(
            window=self._endpoint.window, max_pktsize=self._endpoint.max_pktsize
        )
        return chan, session

    async def _bound_env(self) -> Environment:
        """The session's environment once authentication bound it; a channel-open failure if
        the connection was refused meanwhile."""
        try:
            return await self._env
        except asyncio.CancelledError:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED, "session is not served by this runner"
            ) from None

    async def _forward_udp(self, path: str) -> asyncssh.SSHUNIXSession[bytes]:
        env = await self._bound_env()
        return await udp_forward(self._endpoint.port_gate, env, path)

    async def _serve_sync(
        self, reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]
    ) -> None:
        """One sync stream, written only inside the session's own mount area."""
        try:
            env = await self._env
        except asyncio.CancelledError:
            writer.close()
            return
        await self._endpoint.sync_endpoint(env).serve(reader, writer)

    async def _serve_builder(
        self, reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]
    ) -> None:
        """Build requests, to the session's organisation's builder (builder_proxy)."""
        try:
            await self._env
            assert self._endpoint.build_route is not None
            route = await self._endpoint.build_route(self._username)
        except asyncio.CancelledError:
            writer.close()
            return
        except OffloadError as exc:
            log.warning("session %s: no builder: %s", self._username, exc)
            writer.close()
            return
        await BuilderConnection(route, reader, writer).serve()

    async def _forward_to_engine(self) -> asyncssh.SSHUNIXSession[bytes]:
        env = await self._bound_env()
        assert self._conn is not None
        # forward_unix_connection splices the channel and the engine socket at protocol level,
        # with flow control and half-close passed through both ways.
        try:
            forwarder = await self._conn.forward_unix_connection(str(env.engine_socket))
        except asyncssh.ChannelOpenError as exc:
            log.warning(
                "session %s: engine of environment %s not answering at %s: %s",
                self._username, env.id, env.engine_socket, exc.reason,
            )  # fmt: skip
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED, "the session's engine is not answering"
            ) from None
        return forwarder  # type: ignore[return-value]


def _certified_key_fingerprint(key_data: bytes) -> str | None:
    """`SHA256:…` of the key inside an OpenSSH certificate blob (the control plane's format:
    asyncssh's `get_fingerprint("sha256")` of the agent's public key)."""
    try:
        return str(decode_ssh_certificate(key_data).key.get_fingerprint("sha256"))
    except (asyncssh.KeyImportError, ValueError):
        return None  # not a certificate: plain keys are never accepted anyway


def _reason(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc) or exc.__class__.__name__
    return message.splitlines()[0]


class SSHEndpoint:
    """The runner's SSH server. `port=0` picks a free port; `.port` tells which after start()."""

    def __init__(
        self,
        host: str,
        port: int,
        host_key: asyncssh.SSHKey,
        ca_public_key: Callable[[], str],
        resolve: Resolve,
        *,
        keepalive_interval: float = KEEPALIVE_INTERVAL_S,
        keepalive_count_max: int = KEEPALIVE_COUNT_MAX,
        window: int = CHANNEL_WINDOW,
        max_pktsize: int = CHANNEL_MAX_PKTSIZE,
        port_gate: PortGate | None = None,
        build_route: RouteBuilds | None = None,
    ) -> None:
        # None: no builder channel (builds go to the session's engine channel).
        self.build_route = build_route
        self.host = host
        self._port = port
        self._host_key = host_key
        self._ca_public_key = ca_public_key
        self._resolve = resolve
        self.keepalive_interval = keepalive_interval
        self.keepalive_count_max = keepalive_count_max
        self.window = window
        self.max_pktsize = max_pktsize
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._connections: set[asyncssh.SSHServerConnection] = set()
        # Authenticated connections, each with the fingerprint of the key it was certified for.
        self._keys: dict[asyncssh.SSHServerConnection, str | None] = {}
        # The one client key allowed per session, as the control plane last said.
        self._allowed: dict[str, str] = {}
        # Which published ports each session may reach (cached per engine, briefly).
        self.port_gate = port_gate or PortGate()
        # The environment each session's connections were bound to, and its sync endpoint.
        self._envs: dict[str, Environment] = {}
        self._sync: dict[str, RemoteEndpoint] = {}

    @property
    def port(self) -> int:
        return self._port

    @property
    def host_public_key(self) -> str:
        """The OpenSSH public key line clients pin (the control plane hands it out)."""
        return self._host_key.export_public_key().decode().strip()

    async def start(self) -> None:
        ssh_fastpath.install()
        self._acceptor = await asyncssh.create_server(
            lambda: _Server(self),
            self.host,
            self._port,
            server_host_keys=[self._host_key],
            # Nothing from the host's OpenSSH configuration or files applies.
            config=[],
            authorized_client_keys=None,
            x509_trusted_certs=None,
            gss_host=None,
            password_auth=False,
            kbdint_auth=False,
            host_based_auth=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_scp=False,
            encryption_algs=ENCRYPTION_ALGS,
            compression_algs=None,
            keepalive_interval=self.keepalive_interval,
            keepalive_count_max=self.keepalive_count_max,
            login_timeout=LOGIN_TIMEOUT_S,
            window=self.window,
            max_pktsize=self.max_pktsize,
            reuse_address=True,
        )
        self._port = self._acceptor.get_port()
        log.info("SSH endpoint listening on %s:%s", self.host, self._port)

    def key_allowed(self, session_id: str, fingerprint: str | None) -> bool:
        """Whether a key may serve `session_id` (any key until the control plane names one)."""
        allowed = self._allowed.get(session_id)
        return allowed is None or fingerprint == allowed

    async def set_client_key(self, session_id: str, fingerprint: str | None) -> int:
        """The control plane's word on the one key allowed for `session_id`; connections made
        with another key are closed (a takeover).  Returns how many were closed."""
        if fingerprint is None or self._allowed.get(session_id) == fingerprint:
            return 0
        self._allowed[session_id] = fingerprint
        stale = [
            conn
            for conn, key in self._keys.items()
            if conn.get_extra_info("username") == session_id and key != fingerprint
        ]
        if stale:
            log.info(
                "session %s moved to another client key: closing %d connection(s) of the old one",
                session_id, len(stale),
            )  # fmt: skip
            await self._close_all(stale)
        return len(stale)

    def sync_endpoint(self, env: Environment) -> RemoteEndpoint:
        """The file-sync endpoint of `env`'s mount area (one per environment)."""
        endpoint = self._sync.get(env.id)
        if endpoint is None or (endpoint.mount_area, endpoint.area_owner) != (
            env.mount_area,
            env.area_owner,
        ):
            # What it creates belongs to root in the environment's sandbox (`area_owner`).
            endpoint = self._sync[env.id] = RemoteEndpoint(
                env.mount_area, area_owner=env.area_owner
            )
        return endpoint

    async def disconnect(self, session_id: str) -> int:
        """Close every connection of `session_id` (its environment is going away), and forget
        what was kept for its environment (published ports, sync endpoint)."""
        self._allowed.pop(session_id, None)
        env = self._envs.pop(session_id, None)
        if env is not None:
            self.port_gate.forget(env.engine_socket)
            self._sync.pop(env.id, None)
        conns = [c for c in self._connections if c.get_extra_info("username") == session_id]
        await self._close_all(conns)
        return len(conns)

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
            self._acceptor = None
        await self._close_all(list(self._connections))
        log.info("SSH endpoint on %s:%s stopped", self.host, self._port)

    @staticmethod
    async def _close_all(conns: list[asyncssh.SSHServerConnection]) -> None:
        for conn in conns:
            conn.close()
        await asyncio.gather(*(c.wait_closed() for c in conns), return_exceptions=True)
