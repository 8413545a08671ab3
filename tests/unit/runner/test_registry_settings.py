"""The runner's registry settings: trusted CAs, the pull cache's config, engines' mirrors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from offload.core.config import RunnerSettings
from offload.core.errors import EnvironmentError_
from offload.runner.daemon import start_pull_cache
from offload.runner.environment import engine_config
from offload.runner.pull_cache import check_address, render_config
from offload.runner.registry_trust import engine_bundle, load_extra_cas
from tests.support.pki import CertificateAuthority
from tests.support.secrets_search import needles


def test_extra_cas_are_appended_to_the_system_bundle(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    system = tmp_path / "system.crt"
    system.write_bytes(b"-----BEGIN CERTIFICATE-----\nsystem\n-----END CERTIFICATE-----")
    bundle = engine_bundle(ca.cert_file, system)
    assert bundle is not None
    assert bundle.startswith(system.read_bytes() + b"\n")
    assert bundle.endswith(ca.cert_file.read_bytes())
    assert engine_bundle(None, system) is None  # the host's own copy stands


def test_a_server_certificate_is_not_a_ca(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    server = ca.issue("registry", "198.51.100.10")
    with pytest.raises(EnvironmentError_, match="is not a CA certificate") as caught:
        load_extra_cas(server.cert)
    assert "certificate authority that signed" in str(caught.value)


@pytest.mark.parametrize(
    "content", [b"", b"not a certificate\n", b"-----BEGIN CERTIFICATE-----\nxx"]
)
def test_a_file_without_certificates_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ca.pem"
    path.write_bytes(content)
    with pytest.raises(EnvironmentError_, match="holds no PEM certificate"):
        load_extra_cas(path)


def test_a_missing_ca_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentError_, match="OFFLOAD_RUNNER_REGISTRY_CA=.*cannot be read"):
        load_extra_cas(tmp_path / "absent.pem")


def test_cache_config_for_a_token_upstream_keeps_the_account_in_proxy_fields() -> None:
    text = render_config("192.0.2.2", 5055, Path("/c"), "https://registry-1.docker.io", "op", "s3")
    config = json.loads(text)
    assert config["proxy"] == {
        "remoteurl": "https://registry-1.docker.io", "username": "op", "password": "s3",
    }  # fmt: skip
    assert config["http"]["addr"] == "192.0.2.2:5055"
    assert "auth" not in config  # never asks clients for credentials


def test_cache_config_for_a_basic_upstream_puts_the_account_in_the_url() -> None:
    text = render_config("fd00::2", 5055, Path("/c"), "https://h:5000", "op@x", "p/w:", True)
    config = json.loads(text)
    assert config["proxy"] == {"remoteurl": "https://op%40x:p%2Fw%3A@h:5000"}
    assert config["http"]["addr"] == "[fd00::2]:5055"


def test_anonymous_cache_config_has_no_account() -> None:
    config = json.loads(render_config("192.0.2.2", 1, Path("/c"), "https://h", "", "", True))
    assert config["proxy"] == {"remoteurl": "https://h"}


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "0.0.0.0", "::"])
def test_the_cache_address_must_be_reachable_from_sandboxes(address: str) -> None:
    with pytest.raises(EnvironmentError_, match="cannot reach the runner's loopback"):
        check_address(address)


def test_the_pull_cache_is_the_engines_first_mirror() -> None:
    operator = json.dumps({"registry-mirrors": ["https://mirror.example", "http://192.0.2.2:1"]})
    config = engine_config("env-1", operator, ("http://192.0.2.2:1",))
    assert config["registry-mirrors"] == ["http://192.0.2.2:1", "https://mirror.example"]
    assert "registry-mirrors" not in engine_config("env-1", "{}")


async def test_an_unreachable_upstream_leaves_the_runner_without_a_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = RunnerSettings(data_dir=tmp_path, pull_cache_upstream="http://127.0.0.1:9")
    with caplog.at_level(logging.WARNING):
        assert await start_pull_cache(settings) is None
    assert "pull cache not started, engines pull directly" in caplog.text
    assert "http://127.0.0.1:9 does not answer" in caplog.text


def test_needles_find_a_password_inside_any_base64() -> None:
    import base64

    password = "pw-0123456789abcdef"
    found = needles(password)
    for prefix in (b"", b"{", b'{"u":"acme","password":"'):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(prefix + password.encode() + b'"}')
            assert any(needle in encoded for needle in found), (prefix, encode)
    other = base64.b64encode(b'{"password":"pw-fedcba9876543210"}')
    assert not any(needle in other for needle in found)
