"""The SSH certificate authority: signs each session's client key for a short time.

Laptops never hold a long-lived credential for a runner: the agent's key is certified for one
session (principal = session id) and a short validity, and the runner trusts only this CA.
"""

from __future__ import annotations

import functools
import os
from datetime import datetime, timedelta
from pathlib import Path

import asyncssh

from offload.core.errors import InvalidInput

CA_KEY_FILENAME = "ca_ed25519"
# Accept certificates a little before "now": laptop and runner clocks are never exactly equal.
CLOCK_SKEW_S = 60

PUBLIC_KEY_FIX = (
    "Send the agent's OpenSSH public key as one line, like `ssh-ed25519 AAAA… comment` "
    "(`ssh-keygen -y -f KEYFILE` prints it); `offload start` does this for you."
)


def parse_public_key(line: str) -> asyncssh.SSHKey:
    """The key in an OpenSSH public key line, or InvalidInput saying how to send one."""
    try:
        return asyncssh.import_public_key(line.strip())
    except (asyncssh.KeyImportError, ValueError, TypeError):
        raise InvalidInput(
            "The client public key is not an OpenSSH public key.", PUBLIC_KEY_FIX
        ) from None


def _load_or_create_key(path: Path) -> asyncssh.SSHKey:
    try:
        return asyncssh.read_private_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = asyncssh.generate_private_key("ssh-ed25519", comment="offload-session-ca")
    # O_EXCL: two processes starting at once must not overwrite each other's key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return asyncssh.read_private_key(path)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.export_private_key("openssh"))
    return key


class CertificateAuthority:
    def __init__(self, key: asyncssh.SSHKey) -> None:
        self._key = key

    @classmethod
    def load_or_create(cls, data_dir: Path) -> CertificateAuthority:
        """The CA key at `data_dir/ca_ed25519` (mode 0600), generated on first use."""
        return cls(_load_or_create_key(data_dir / CA_KEY_FILENAME))

    def public_key_line(self) -> str:
        """The CA's OpenSSH public key line, which runners trust for session certificates."""
        return self._key.export_public_key("openssh").decode().strip()

    def sign_session_certificate(
        self,
        user_key: asyncssh.SSHKey,
        session_id: str,
        now: datetime,
        valid_for_s: int,
    ) -> tuple[str, datetime]:
        """A user certificate for the session's client key (as `parse_public_key` made it);
        returns (OpenSSH text, valid_before)."""
        valid_before = now + timedelta(seconds=valid_for_s)
        cert = self._key.generate_user_certificate(
            user_key,
            key_id=f"offload session {session_id}",
            principals=[session_id],
            valid_after=now - timedelta(seconds=CLOCK_SKEW_S),
            valid_before=valid_before,
            # Port forwarding covers the direct-streamlocal channel to the engine and published
            # ports; nothing else (no pty, X11, agent forwarding or user rc) is ever needed.
            permit_x11_forwarding=False,
            permit_agent_forwarding=False,
            permit_port_forwarding=True,
            permit_pty=False,
            permit_user_rc=False,
            comment=session_id,
        )
        return cert.export_certificate("openssh").decode().strip(), valid_before


@functools.lru_cache(maxsize=4096)  # every heartbeat's answer shows each session's key
def key_fingerprint(public_key_line: str) -> str | None:
    """`SHA256:…` of an OpenSSH public key line (what asyncssh and ssh-keygen -l print)."""
    try:
        return str(parse_public_key(public_key_line).get_fingerprint("sha256"))
    except InvalidInput:
        return None
