"""The API clients against an HTTPS control plane (the real app under uvicorn with TLS, as an
operator serves it): the certificate is checked against the trust store httpx uses (certifi, or
SSL_CERT_FILE for a company CA), and one TLS context serves every client of a process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI

from offload.core import api_client
from offload.core.api_client import UserClient
from offload.core.errors import Unreachable
from offload.core.waiting import wait_until
from tests.support.net import free_port
from tests.support.pki import CertificateAuthority


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "ca")


@pytest.fixture
def https_url(app: FastAPI, ca: CertificateAuthority) -> Iterator[str]:
    issued = ca.issue("control-plane", "127.0.0.1")
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning",
        ssl_certfile=str(issued.cert), ssl_keyfile=str(issued.key),
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    # uvicorn's own flag: the socket is listening (a thread that died ends the wait at once)
    wait_until(lambda: server.started or not thread.is_alive(), 30, "uvicorn to start")
    assert server.started, "uvicorn did not start"
    yield f"https://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


@pytest.fixture(autouse=True)
def fresh_tls_context() -> Iterator[None]:
    api_client._shared_tls.cache_clear()  # each test sets its own trust store
    yield
    api_client._shared_tls.cache_clear()


async def test_a_server_signed_by_a_trusted_ca_answers(
    https_url: str, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert_file))
    async with UserClient(https_url, None) as first, UserClient(https_url, None) as second:
        assert (await first.version()).server_version
        assert (await second.version()).server_version
    assert api_client._shared_tls.cache_info().misses == 1  # one context for both clients


async def test_an_untrusted_certificate_is_refused(
    https_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # certifi's bundle: not the test CA
    async with UserClient(https_url, None) as client:
        with pytest.raises(Unreachable, match="certificate this machine does not trust") as refused:
            await client.version()
    assert "SSL_CERT_FILE" in str(refused.value.fix)


def test_plain_http_builds_no_tls_context() -> None:
    UserClient("http://127.0.0.1:1", None)
    assert api_client._shared_tls.cache_info().misses == 0
