"""Which certificate authorities the sandboxed engines trust when they speak TLS to registries.

An engine's root is private (sandbox_init.sh), so it has its own `/etc/ssl/certs`: a copy of the
runner host's, with `ca-certificates.crt` replaced by the bundle built here, the host's system
bundle followed by the operator's extra CAs (`OFFLOAD_RUNNER_REGISTRY_CA`, e.g. a company
registry's). Go's crypto/x509 reads that file first, so dockerd's pulls and pushes and the
BuildKit inside it trust the same set. The pull cache gets the same bundle (`SSL_CERT_FILE`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from offload.core.errors import EnvironmentError_

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SETTING = "OFFLOAD_RUNNER_REGISTRY_CA"


def load_extra_cas(path: Path) -> bytes:
    """The operator's CA file, checked: PEM text holding at least one CA certificate."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EnvironmentError_(
            f"{SETTING}={path} cannot be read: {exc.strerror or exc}.",
            "Point it at a readable PEM file of the registries' CA certificates.",
        ) from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise EnvironmentError_(
            f"{SETTING}={path} holds no PEM certificate.",
            "Give a file of '-----BEGIN CERTIFICATE-----' blocks (the CA, not a server key).",
        )
    for certificate in certificates:
        if not _is_ca(certificate):
            raise EnvironmentError_(
                f"{SETTING}={path}: {certificate.subject.rfc4514_string()} is not a CA "
                "certificate (basicConstraints CA:FALSE or missing).",
                "List the certificate authority that signed the registry's certificate.",
            )
    return data if data.endswith(b"\n") else data + b"\n"


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return False
    return constraints.value.ca


def engine_bundle(extra: Path | None, system: Path = SYSTEM_BUNDLE) -> bytes | None:
    """The bundle the engines get, or None with no extra CAs (the host's copy stands)."""
    if extra is None:
        return None
    try:
        base = system.read_bytes()
    except FileNotFoundError:
        base = b""
    if base and not base.endswith(b"\n"):
        base += b"\n"
    return base + load_extra_cas(extra)


@dataclass(frozen=True)
class EngineRegistries:
    """What each engine of this runner gets for registries: mirrors first, then trust."""

    mirrors: tuple[str, ...] = ()
    ca_bundle: bytes | None = None
