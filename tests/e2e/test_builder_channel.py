"""The builder channel attacked as the laptop's owner would: raw bytes over the user's own SSH
connection (the session's key and certificate) to `/builder.sock`, not the agent's idea of a
build. Only build requests may reach the organisation's builder; whatever else is sent, however
it is spelled, smuggled or malformed, is refused there and never reaches its engine.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from offload.core.schemas import BUILDER_CHANNEL_PATH, Role
from offload.runner.builders import builder_id
from tests.e2e.conftest import Deployment, User
from tests.e2e.isolation_support import (
    API,
    RawEngine,
    Response,
    request_bytes,
    ssh_connect,
)

pytestmark = pytest.mark.slow

TOO_OLD = "client version 1.23 is too old. Minimum supported API version is 1.24"


@pytest_asyncio.fixture
async def attacker(make_user) -> AsyncIterator[tuple[User, str]]:  # type: ignore[no-untyped-def]
    org = f"raw-{uuid.uuid4().hex[:6]}"
    user = make_user(org, Role.MEMBER)
    user.docker("offload", "start", "--timeout", "300s")
    yield user, org


async def _builder(deployment: Deployment, user: User) -> tuple[RawEngine, object]:
    conn = await ssh_connect(deployment, user)

    async def opener():  # type: ignore[no-untyped-def]
        return await conn.open_unix_connection(BUILDER_CHANNEL_PATH, encoding=None)

    return RawEngine("builder", opener), conn


def _builder_socket(deployment: Deployment, org: str) -> Path:
    return deployment.run_dir / builder_id(org) / "sock" / "docker.sock"


def _builder_state(deployment: Deployment, org: str) -> tuple[int, int, int]:
    """(containers, images, volumes) of the organisation's builder, read by the runner host."""
    transport = httpx.HTTPTransport(uds=str(_builder_socket(deployment, org)))
    with httpx.Client(transport=transport, base_url="http://docker", timeout=30) as engine:
        containers = engine.get("/containers/json", params={"all": "1"}).json()
        images = engine.get("/images/json").json()
        volumes = engine.get("/volumes").json()["Volumes"] or []
    return len(containers), len(images), len(volumes)


def _refused(responses: list[Response], what: str) -> None:
    assert len(responses) == 1, (what, responses)
    (answer,) = responses
    assert answer.status == 403, (what, answer)
    assert "only build requests go to the organisation's builder" in answer.json()["message"]


async def test_only_build_requests_reach_the_builder(
    deployment: Deployment, attacker: tuple[User, str]
) -> None:
    user, org = attacker
    builder, conn = await _builder(deployment, user)
    try:
        ping = await builder.call("GET", "/_ping")  # what clients send first: allowed
        assert ping.status == 200 and ping.body == b"OK"
        before = _builder_state(deployment, org)
        bind_root = {"Image": "hello", "Binds": ["/:/host"], "HostConfig": None}
        for method, target, body in [
            ("GET", f"{API}/containers/json", None),
            ("POST", f"{API}/containers/create", bind_root),
            ("POST", "/containers/create", {"Image": "hello", "HostConfig": {"Privileged": True}}),
            ("GET", f"{API}/images/json", None),
            ("POST", f"{API}/volumes/create", {"Name": "x"}),
            ("POST", f"{API}/swarm/init", {}),
            ("GET", f"{API}/build", None),  # a build is POST
            ("POST", f"{API}/grpc", None),  # buildx's gRPC, prune included
            ("POST", f"{API}//build", None),
            ("POST", f"{API}/build/../containers/create", bind_root),
            ("POST", "/v1.41/build/../../containers/create", bind_root),
            ("POST", f"{API}/%62uild", None),
            ("POST", f"{API}/BUILD", None),
            ("POST", f"{API}/build%2f..%2fcontainers%2fcreate", bind_root),
            ("GET", "/offload/builder/../../containers/json", None),
        ]:
            _refused(await builder.send(request_bytes(method, target, body)), f"{method} {target}")
        # A member may not prune the organisation's cache, in any spelling of the path.
        for target in ("/build/prune?all=1", f"{API}/build/prune", "/v1.30/build/prune"):
            (answer,) = await builder.send(request_bytes("POST", target))
            assert answer.status == 403 and "only an owner of" in answer.json()["message"], target
        assert _builder_state(deployment, org) == before
    finally:
        conn.close()  # type: ignore[attr-defined]


async def test_smuggled_pipelined_and_malformed_requests_never_reach_the_builder(
    deployment: Deployment, attacker: tuple[User, str]
) -> None:
    user, org = attacker
    builder, conn = await _builder(deployment, user)
    # What would show a smuggled request got through: a new volume on the builder, its info.
    create = request_bytes("POST", f"{API}/volumes/create", {"Name": f"smuggled-{org}"})
    listing = request_bytes("GET", f"{API}/info")
    try:
        await builder.call("GET", "/_ping")  # the builder is up
        before = _builder_state(deployment, org)
        keep_alive = b"HEAD /_ping HTTP/1.1\r\nHost: docker\r\n\r\n"
        # Pipelined behind an allowed request.
        responses = await builder.send(keep_alive + listing)
        assert [r.status for r in responses] == [200, 403], responses
        # Behind a /session that dockerd refuses (no Upgrade: h2c), where a relay that turned
        # raw after the request line would hand the rest to the engine as a new request.
        session = b"POST /session HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\n\r\n"
        data = await builder.exchange(session + create)
        assert b"smuggled-" not in data, data
        data = await builder.exchange(session + listing)
        assert b'"ServerVersion"' not in data, data
        # Both framings at once (the classic smuggling shape), a bare LF head, garbage, an
        # oversized head: closed without an answer from the builder.
        both = (
            f"POST {API}/build HTTP/1.1\r\nHost: docker\r\nContent-Length: 4\r\n"
            "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ).encode() + listing
        for raw in (
            both,
            f"GET {API}/containers/json HTTP/1.1\nHost: docker\n\n".encode(),
            b"\x16\x03\x01\x00\xa5garbage\r\n\r\n",
            b"GET /_ping HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n" + listing,
        ):
            data = await builder.exchange(raw)
            assert b'"ServerVersion"' not in data and b"HTTP/1.1 200" not in data, data[:300]
        # An old API version reaches dockerd's legacy code: the builder's policy refuses it.
        (old,) = await builder.send(request_bytes("POST", "/v1.23/build"))
        assert old.status == 403 and TOO_OLD in old.text, old  # an authorization refusal
        assert _builder_state(deployment, org) == before
    finally:
        conn.close()  # type: ignore[attr-defined]
