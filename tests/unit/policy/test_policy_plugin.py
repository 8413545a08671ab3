"""The plugin's server over a real unix socket, spoken to as dockerd does (no dockerd needed)."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from offload.core.errors import EnvironmentError_
from offload.runner.policy import CONTENT_TYPE, PolicyPlugin


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths must stay under ~100 bytes: pytest's tmp_path can be longer.
    directory = Path(tempfile.mkdtemp(prefix="otu-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def plugin(short_dir: Path) -> AsyncIterator[PolicyPlugin]:
    (short_dir / "area").mkdir()
    plugin = PolicyPlugin("offload-policy-unit", short_dir / "area", plugin_dir=short_dir / "p")
    await plugin.start()
    yield plugin
    await plugin.stop()


def client(plugin: PolicyPlugin) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(uds=str(plugin.socket_path))
    return httpx.AsyncClient(transport=transport, base_url="http://plugin")


def authz_call(uri: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {"RequestMethod": "POST", "RequestUri": uri, "RequestHeaders": {}}
    if body is not None:
        call["RequestBody"] = base64.b64encode(json.dumps(body).encode()).decode()
    return call


async def test_activate_declares_authz(plugin: PolicyPlugin) -> None:
    async with client(plugin) as c:
        response = await c.post("/Plugin.Activate", headers={"Accept": CONTENT_TYPE})
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE
    assert response.json() == {"Implements": ["authz"]}


async def test_requests_are_allowed_and_denied_over_one_kept_alive_connection(
    plugin: PolicyPlugin, caplog: pytest.LogCaptureFixture
) -> None:
    privileged = {"Image": "x", "HostConfig": {"Privileged": True, "PidMode": "host"}}
    async with client(plugin) as c:
        allowed = await c.post("/AuthZPlugin.AuthZReq", json=authz_call("/v1.41/containers/json"))
        # Privileged and host namespaces are the sandbox's business now: allowed.
        privileged_create = await c.post(
            "/AuthZPlugin.AuthZReq", json=authz_call("/v1.41/containers/create", privileged)
        )
        denied = await c.post(
            "/AuthZPlugin.AuthZReq",
            json=authz_call("/v1.23/containers/create?name=x&token=secret", privileged),
        )
        response = await c.post("/AuthZPlugin.AuthZRes", json=authz_call("/v1.41/_ping"))
    assert allowed.json() == {"Allow": True, "Msg": "", "Err": ""}
    assert privileged_create.json() == {"Allow": True, "Msg": "", "Err": ""}
    assert denied.status_code == 200
    assert denied.json() == {
        "Allow": False,
        "Msg": "client version 1.23 is too old. Minimum supported API version is 1.24, "
        "please upgrade your client to a newer version",
        "Err": "",
    }
    assert response.json() == {"Allow": True}
    # The denial is logged with the engine's plugin name and the rule, never the query or body.
    logged = [r.getMessage() for r in caplog.records if "denied" in r.getMessage()]
    assert logged == [
        "policy offload-policy-unit denied POST /v1.23/containers/create (rule api-version-too-old)"
    ]
    assert "secret" not in caplog.text


async def test_an_internal_error_denies(
    plugin: PolicyPlugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("a bug in the rules")

    monkeypatch.setattr("offload.runner.policy.evaluate", broken)
    async with client(plugin) as c:
        answer = await c.post("/AuthZPlugin.AuthZReq", json=authz_call("/v1.41/containers/json"))
    assert answer.status_code == 200
    assert answer.json()["Allow"] is False
    assert "internal error" in answer.json()["Msg"]


async def test_malformed_calls_fail_so_the_engine_refuses(plugin: PolicyPlugin) -> None:
    async with client(plugin) as c:
        empty = await c.post("/AuthZPlugin.AuthZReq", content=b"")
        no_uri = await c.post("/AuthZPlugin.AuthZReq", json={"RequestMethod": "GET"})
        not_object = await c.post("/AuthZPlugin.AuthZReq", json=[1])
        not_json = await c.post("/AuthZPlugin.AuthZReq", content=b'{"RequestMethod": "GET"')
        emptied = await c.post("/AuthZPlugin.AuthZReq", json={})  # dockerd's retry of a call
        odd_uri = await c.post(
            "/AuthZPlugin.AuthZReq", json={"RequestMethod": "GET", "RequestUri": 5}
        )
        unknown = await c.post("/VolumeDriver.Create", json={})
        # The connection still serves after refused calls.
        activate = await c.post("/Plugin.Activate")
    for response in (empty, no_uri, not_object, not_json, emptied, odd_uri):
        assert response.status_code == 400
        assert response.json()["Err"]
    assert unknown.status_code == 404
    assert activate.json() == {"Implements": ["authz"]}


async def test_socket_is_private_and_removed_on_stop(short_dir: Path) -> None:
    plugin = PolicyPlugin("offload-policy-x", short_dir / "area", plugin_dir=short_dir / "p")
    assert plugin.socket_path == short_dir / "p" / "offload-policy-x.sock"
    await plugin.start()
    await plugin.start()  # idempotent
    assert plugin.socket_path.is_socket()
    assert plugin.socket_path.stat().st_mode & 0o777 == 0o600
    await plugin.stop()
    await plugin.stop()  # idempotent
    assert not plugin.socket_path.exists()


async def test_several_plugins_share_one_event_loop(short_dir: Path) -> None:
    plugins = [
        PolicyPlugin(f"offload-policy-{i}", short_dir / f"a{i}", plugin_dir=short_dir / "p")
        for i in range(2)
    ]
    for plugin in plugins:
        await plugin.start()
    try:
        for plugin in plugins:
            async with client(plugin) as c:
                new = await c.post("/AuthZPlugin.AuthZReq", json=authz_call("/v1.41/info"))
                old = await c.post("/AuthZPlugin.AuthZReq", json=authz_call("/v1.12/info"))
            assert new.json()["Allow"] is True
            assert old.json()["Allow"] is False
    finally:
        for plugin in plugins:
            await plugin.stop()


async def test_stop_closes_kept_alive_connections(plugin: PolicyPlugin) -> None:
    async with client(plugin) as c:
        await c.post("/Plugin.Activate")
        await plugin.stop()
        with pytest.raises(httpx.TransportError):
            await c.post("/Plugin.Activate")


async def test_a_stale_socket_is_replaced(short_dir: Path) -> None:
    (short_dir / "p").mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(short_dir / "p" / "offload-policy-s.sock"))
    stale.close()  # the file stays, nobody listens: a runner that died
    plugin = PolicyPlugin("offload-policy-s", short_dir / "area", plugin_dir=short_dir / "p")
    await plugin.start()
    try:
        async with client(plugin) as c:
            assert (await c.post("/Plugin.Activate")).status_code == 200
    finally:
        await plugin.stop()


async def test_a_socket_served_by_someone_else_is_not_taken(plugin: PolicyPlugin) -> None:
    twin = PolicyPlugin(plugin.name, plugin.mount_area, plugin_dir=plugin.plugin_dir)
    with pytest.raises(EnvironmentError_, match="already served"):
        await twin.start()
    async with client(plugin) as c:
        assert (await c.post("/Plugin.Activate")).status_code == 200


async def test_large_responses_pass_through_the_response_hook(plugin: PolicyPlugin) -> None:
    # dockerd hands whole JSON responses to AuthZRes: a big `docker inspect` must not fail.
    big = base64.b64encode(b"x" * (12 * 1024 * 1024)).decode()
    call = {**authz_call("/v1.41/containers/json"), "ResponseBody": big}
    async with client(plugin) as c:
        response = await c.post("/AuthZPlugin.AuthZRes", json=call)
        assert response.json() == {"Allow": True}
        # The connection stays usable after the dropped body.
        assert (await c.post("/Plugin.Activate")).status_code == 200
