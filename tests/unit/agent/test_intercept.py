"""`RequestScanner`: container creates found and held in a client's byte stream, everything else
handed on unchanged and at once, however the bytes are cut."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offload.agent.bind_sources import ResponseKind
from offload.agent.binds import stable_id
from offload.agent.intercept import MAX_CREATE_BODY, CreateBinds, CreateRequest, RequestScanner

PING = b"HEAD /_ping HTTP/1.1\r\nHost: api.moby.localhost\r\n\r\n"
BODY = json.dumps({"Image": "x", "HostConfig": {"Binds": ["/home/me/app:/app"]}}).encode()
CREATE = (
    b"POST /v1.41/containers/create?name=web HTTP/1.1\r\nHost: api.moby.localhost\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)
) + BODY
CHUNKED_CREATE = (
    b"POST /containers/create HTTP/1.1\r\nHost: docker\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"%x\r\n" % len(BODY)
    + BODY
    + b"\r\n0\r\n\r\n"
)
BUILD = (
    b"POST /v1.41/build HTTP/1.1\r\nHost: docker\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n"
)
UPLOAD = b"PUT /v1.41/containers/c/archive?path=/ HTTP/1.1\r\nHost: d\r\nContent-Length: 9\r\n\r\n123456789"
ATTACH = (
    b"POST /v1.41/containers/abc/attach?stream=1&stdin=1 HTTP/1.1\r\nHost: docker\r\n"
    b"Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
)


def run(
    stream: bytes, step: int, rewrite: bytes | None = None
) -> tuple[bytes, list[CreateRequest]]:
    """Feed `stream` in pieces of `step` bytes as the proxy does; what reaches the engine."""
    scanner, out, creates = RequestScanner(), bytearray(), []
    chunks = [stream[i : i + step] for i in range(0, len(stream), step)]
    while chunks:
        scan = scanner.feed(chunks.pop(0))
        out += scan.forward
        if scan.create is not None:
            creates.append(scan.create)
            out += scan.create.encode(rewrite if rewrite is not None else scan.create.body)
            if scan.rest:
                chunks.insert(0, scan.rest)
    return bytes(out), creates


@pytest.mark.parametrize("step", [1, 2, 7, 64, 100_000])
def test_keep_alive_requests_pass_unchanged_and_the_create_is_held(step: int) -> None:
    stream = PING + BUILD + UPLOAD + CREATE + PING + CHUNKED_CREATE + PING
    out, creates = run(stream, step)
    assert out == stream
    assert [c.body for c in creates] == [BODY, BODY]
    assert creates[0].request.target == b"/v1.41/containers/create?name=web"


def test_a_rewritten_create_gets_its_new_length() -> None:
    new_body = json.dumps({"Image": "x", "HostConfig": {"Binds": ["/area/b1:/app"]}}).encode()
    out, _ = run(PING + CHUNKED_CREATE + PING, 5, rewrite=new_body)
    head, _, rest = out[len(PING) :].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /containers/create HTTP/1.1\r\n")
    assert b"Transfer-Encoding" not in head
    assert f"Content-Length: {len(new_body)}".encode() in head
    assert rest == new_body + PING


def test_other_requests_are_handed_on_in_the_same_call() -> None:
    """No added latency: whatever arrives of a non-create request goes on at once."""
    scanner = RequestScanner()
    for piece in (b"GET /v1.41/containers/json", b"?all=1 HTTP/1.1\r\nHo", b"st: d\r\n\r\n"):
        scan = scanner.feed(piece)
        if piece.startswith(b"GET"):
            assert scan.forward == b""  # the request line is not complete yet
        else:
            assert scan.create is None and scan.forward
    scan = scanner.feed(UPLOAD)
    assert scan.forward == UPLOAD


def test_after_a_hijack_everything_is_raw() -> None:
    after = b"stdin bytes that look like " + CREATE
    out, creates = run(PING + ATTACH + after, 3)
    assert out == PING + ATTACH + after and creates == []
    scanner = RequestScanner()
    scanner.feed(ATTACH)
    assert scanner.raw


def test_exec_start_without_upgrade_headers_is_a_hijack_too() -> None:
    start = b"POST /exec/e1/start HTTP/1.1\r\nHost: d\r\nContent-Length: 2\r\n\r\n{}"
    scanner = RequestScanner()
    assert scanner.feed(start + CREATE).forward == start + CREATE
    assert scanner.raw


def test_what_is_not_http_is_handed_on() -> None:
    junk = b"\x16\x03\x01 not http at all\r\n\r\nmore"
    out, creates = run(junk + CREATE, 4)
    assert out == junk + CREATE and creates == []


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_huge_create_is_passed_on_as_it_is(framing: str) -> None:
    body = b"{" + b" " * (MAX_CREATE_BODY + 200_000) + b"}"
    if framing == "chunked":
        chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
        create = (
            b"POST /containers/create HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        out, creates = run(create + chunked + PING, 65536)
        assert out == create + chunked + PING and creates == []
        return
    create = b"POST /containers/create HTTP/1.1\r\nHost: d\r\nContent-Length: %d\r\n\r\n" % len(
        body
    )
    out, creates = run(create + body + PING, 65536)
    assert out == create + body + PING and creates == []


def test_a_create_waiting_for_100_continue_is_not_held() -> None:
    head = (
        b"POST /containers/create HTTP/1.1\r\nHost: d\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % len(BODY)
    )
    scanner = RequestScanner()
    assert scanner.feed(head).forward == head


# ---- answers that name bind sources ---------------------------------------------------------


def marks(stream: bytes, step: int) -> list[ResponseKind]:
    scanner, found = RequestScanner(), []
    chunks = [stream[i : i + step] for i in range(0, len(stream), step)]
    while chunks:
        scan = scanner.feed(chunks.pop(0))
        found += scan.responses
        if scan.rest:  # after a create
            chunks.insert(0, scan.rest)
    return found


@pytest.mark.parametrize("step", [1, 7, 100_000])
def test_inspect_and_list_requests_are_marked_in_order(step: int) -> None:
    inspect = b"GET /v1.45/containers/web/json?size=1 HTTP/1.1\r\nHost: d\r\n\r\n"
    listing = b"GET /containers/json?all=1&filters=%7B%7D HTTP/1.1\r\nHost: d\r\n\r\n"
    top = b"GET /v1.45/containers/web/top HTTP/1.1\r\nHost: d\r\n\r\n"
    head = b"HEAD /v1.45/containers/web/json HTTP/1.1\r\nHost: d\r\n\r\n"
    stream = PING + inspect + UPLOAD + top + head + listing + CREATE + inspect
    assert marks(stream, step) == [ResponseKind.INSPECT, ResponseKind.LIST, ResponseKind.INSPECT]
    assert run(stream, step)[0] == stream  # marking changes no byte


def test_nothing_is_marked_after_a_hijack() -> None:
    inspect = b"GET /containers/web/json HTTP/1.1\r\nHost: d\r\n\r\n"
    assert marks(ATTACH + inspect, 1000) == []


async def test_a_prepared_create_remembers_its_laptop_sources(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()

    class Sync:
        async def ready(self, timeout: float) -> None: ...

        async def flush(self) -> None: ...

    class Manager:
        async def mount_area(self) -> str:
            return "/area"

        async def ensure(self, *args: object, **kwargs: object) -> Sync:
            return Sync()

    creates = CreateBinds(Manager())  # type: ignore[arg-type]
    body = json.dumps({"HostConfig": {"Binds": [f"{project}/:/app"]}}).encode()
    rewritten = json.loads(await creates.prepare(body))["HostConfig"]["Binds"][0]
    remote = rewritten.split(":")[0]
    assert remote == f"/area/{stable_id(str(project))}"
    assert creates.sources.laptop_source(remote) == str(project)


@pytest.mark.parametrize("step", [1, 13, 100_000])
def test_network_creates_are_held_too_and_told_apart(step: int) -> None:
    body = b'{"Name":"app_default","Driver":"bridge"}'
    network = (
        b"POST /v1.41/networks/create HTTP/1.1\r\nHost: docker\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    listing = b"GET /v1.41/networks HTTP/1.1\r\nHost: docker\r\n\r\n"
    stream = PING + network + listing + CREATE + PING
    out, held = run(stream, step)
    assert out == stream
    assert [(c.network, c.body) for c in held] == [(True, body), (False, BODY)]
