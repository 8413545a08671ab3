"""The runner's SSH endpoint, attacked with real credentials of real sessions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncssh
import pytest

from offload.agent.state import SessionFile, read_model
from offload.core.schemas import ENGINE_CHANNEL_PATH
from tests.e2e.conftest import Deployment, User, environment_sockets, started

PING = b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n"


def _session(user: User) -> SessionFile:
    session = read_model(user.offload_home / "session.json", SessionFile)
    assert session is not None
    return session


async def _connect(
    deployment: Deployment, username: str, key_path: str, certificate: str, host_key: str
) -> asyncssh.SSHClientConnection:
    key = asyncssh.read_private_key(key_path)
    cert = asyncssh.import_certificate(certificate)
    known = asyncssh.import_known_hosts(f"[127.0.0.1]:{deployment.ssh_port} {host_key}\n")
    return await asyncssh.connect(
        "127.0.0.1",
        deployment.ssh_port,
        username=username,
        client_keys=[(key, cert)],
        known_hosts=known,
        agent_path=None,
        config=None,
    )


async def _ping(conn: asyncssh.SSHClientConnection, path: str) -> bytes:
    reader, writer = await conn.open_unix_connection(path)
    writer.write(PING)
    writer.write_eof()
    return await reader.read()


@pytest.mark.asyncio
async def test_certificate_opens_only_its_own_session_engine(
    deployment: Deployment, make_user, hello_context: Path
) -> None:
    alice = started(make_user(), hello_context)
    bob = started(make_user(), hello_context)
    a, b = _session(alice), _session(bob)
    assert a.session.runner is not None
    host_key = a.session.runner.host_key

    # Alice's own credentials open Alice's engine.
    conn = await _connect(deployment, a.session.id, a.private_key_path, _cert(alice), host_key)
    async with conn:
        assert b"200 OK" in await _ping(conn, ENGINE_CHANNEL_PATH)
        # ...and nothing else: not Bob's engine socket, not any real path on the runner.
        for path in environment_sockets(deployment):
            with pytest.raises(asyncssh.ChannelOpenError):
                await _ping(conn, str(path))
        with pytest.raises((asyncssh.ChannelOpenError, asyncssh.Error)):
            await conn.run("id", check=True)

    # Alice's certificate presented as Bob's session: refused at authentication.
    with pytest.raises(asyncssh.PermissionDenied):
        await _connect(deployment, b.session.id, a.private_key_path, _cert(alice), host_key)


def _cert(user: User) -> str:
    cert = _session(user).session.certificate
    if cert is None:  # the agent may have renewed it into its own file
        raise AssertionError("session file lacks the certificate")
    return cert


@pytest.mark.asyncio
async def test_expired_or_foreign_certificates_are_refused(
    deployment: Deployment, make_user, hello_context: Path
) -> None:
    alice = started(make_user(), hello_context)
    a = _session(alice)
    assert a.session.runner is not None
    user_key = asyncssh.read_private_key(a.private_key_path)
    ca = asyncssh.read_private_key(str(deployment.data_dir / "server" / "ca_ed25519"))
    now = datetime.now(UTC)
    expired = ca.generate_user_certificate(
        user_key,
        "expired",
        principals=[a.session.id],
        valid_after=now - timedelta(hours=2),
        valid_before=now - timedelta(hours=1),
    )
    foreign_ca = asyncssh.generate_private_key("ssh-ed25519")
    foreign = foreign_ca.generate_user_certificate(
        user_key, "foreign", principals=[a.session.id], valid_before=now + timedelta(hours=1)
    )
    for cert in (expired, foreign):
        with pytest.raises(asyncssh.PermissionDenied):
            await _connect(
                deployment,
                a.session.id,
                a.private_key_path,
                cert.export_certificate().decode(),
                a.session.runner.host_key,
            )
