"""Engine answers that name bind sources, rewritten on their way to the client: `ResponseRewriter`
on its own (framings, however the bytes are cut), then through `AgentProxy` with a fake engine
on a keep-alive connection (what docker-py and the Go CLI do)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import h11
import pytest

from offload.agent.bind_sources import BindSources, ResponseKind
from offload.agent.binds import RemoteSource
from offload.agent.proxy import AgentProxy
from offload.agent.responses import MAX_BODY, ResponseRewriter, Step
from offload.core.waiting import within

AREA = "/mnt/area"
REMOTE = f"{AREA}/b0123456789abcdef01234567"
LAPTOP = "/home/me/app"
INSPECT = {
    "Id": "c0ffee",
    "Name": "/web",
    "HostConfig": {"Binds": [f"{REMOTE}:/app:ro"]},
    "Mounts": [{"Type": "bind", "Source": REMOTE, "Destination": "/app", "RW": False}],
}
LISTED = [{"Id": "c0ffee", "Names": ["/web"], "Mounts": [{"Type": "bind", "Source": REMOTE}]}]
NOT_FOUND = b'{"message":"No such container: nope"}\n'


def sources() -> BindSources:
    known = BindSources()
    known.learn(AREA, [RemoteSource(REMOTE, LAPTOP)])
    return known


def body_of(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def response(
    body: bytes, *, status: int = 200, chunked: bool = False, content_type: bytes = b"application/json"
) -> bytes:  # fmt: skip
    reason = {200: b"OK", 404: b"Not Found"}[status]
    head = [b"HTTP/1.1 %d %s" % (status, reason), b"Api-Version: 1.45", b"Content-Type: " + content_type]  # fmt: skip
    head += [b"Date: Thu, 02 May 2024 09:14:11 GMT", b"Docker-Experimental: false"]
    if chunked:
        head.append(b"Transfer-Encoding: chunked")
        half = len(body) // 2
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:half], body[half:]) if p)
        return b"\r\n".join(head) + b"\r\n\r\n" + framed + b"0\r\n\r\n"
    head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def parse(raw: bytes) -> tuple[h11.Response, bytes]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"d")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    head, body = None, b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        assert event is not h11.NEED_DATA, "an incomplete response"
        if isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
    assert head is not None and conn.trailing_data[0] == b""
    return head, body


def feed(
    raw: bytes, step: int, transform: Callable[[bytes], bytes] | None = None
) -> tuple[bytes, list[Step]]:
    if transform is None:
        known = sources()
        transform = lambda body: known.restore(ResponseKind.INSPECT, body)  # noqa: E731
    rewriter = ResponseRewriter(transform)
    out, steps = bytearray(), []
    for i in range(0, len(raw), step):
        steps.append(s := rewriter.feed(raw[i : i + step]))
        out += s.out
        if s.done or s.raw:
            out += raw[i + step :]  # what follows is not the rewriter's
            break
    return bytes(out), steps


# ---- the rewriter on its own ------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("step", [1, 3, 64, 100_000])
def test_a_json_answer_is_rewritten_with_its_new_length(chunked: bool, step: int) -> None:
    raw = response(body_of(INSPECT), chunked=chunked)
    out, steps = feed(raw, step)
    assert steps[-1].done and not steps[-1].raw
    assert all(s.out == b"" for s in steps[:-1])  # held until complete
    head, body = parse(out)
    doc = json.loads(body)
    assert doc["Mounts"][0]["Source"] == LAPTOP
    assert doc["HostConfig"]["Binds"] == [f"{LAPTOP}:/app:ro"]
    names = [n for n, _ in head.headers]
    assert b"transfer-encoding" not in names and names.count(b"content-length") == 1
    assert dict(head.headers)[b"content-length"] == b"%d" % len(body)
    assert head.headers.raw_items()[0] == (b"Api-Version", b"1.45")  # the engine's own spelling


@pytest.mark.parametrize("chunked", [False, True])
def test_an_answer_with_nothing_to_change_is_the_engines_bytes(chunked: bool) -> None:
    raw = response(body_of({"Id": "x", "Mounts": []}), chunked=chunked)
    assert feed(raw, 5)[0] == raw


@pytest.mark.parametrize(
    "raw",
    [
        response(NOT_FOUND, status=404),
        response(NOT_FOUND, status=404, chunked=True),
        response(body_of(INSPECT), content_type=b"text/plain"),
    ],
    ids=["404", "404-chunked", "not-json"],
)
def test_errors_and_other_bodies_go_on_as_they_come(raw: bytes) -> None:
    out, steps = feed(raw, 7, transform=lambda body: pytest.fail("transformed"))  # type: ignore[arg-type,return-value]
    assert out == raw
    assert steps[-1].done
    assert any(s.out for s in steps[:-1])  # passed on at once, not held


def test_what_follows_the_answer_is_not_its_own() -> None:
    raw = response(body_of(INSPECT))
    rewriter = ResponseRewriter(lambda body: body)
    step = rewriter.feed(raw + b"HTTP/1.1 200 OK\r\n")
    assert step.done and step.out == raw and step.rest == b"HTTP/1.1 200 OK\r\n"


def test_a_body_read_until_close_is_given_up() -> None:
    raw = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + body_of(INSPECT)
    step = ResponseRewriter(lambda body: b"changed").feed(raw)
    assert step.raw and step.out == raw


def test_what_is_not_http_is_given_up() -> None:
    step = ResponseRewriter(lambda body: b"changed").feed(b"\x00\x01 not http\r\n\r\n")
    assert step.raw and step.out == b"\x00\x01 not http\r\n\r\n"


def test_a_huge_answer_is_passed_on_as_it_is() -> None:
    body = b"[" + b" " * (MAX_BODY + 100) + b"]"
    raw = response(body)
    out, steps = feed(raw, 1024 * 1024, transform=lambda b: b"changed")
    assert out == raw and steps[-1].done


def test_an_engine_gone_mid_answer_gets_what_was_held() -> None:
    raw = response(body_of(INSPECT))
    rewriter = ResponseRewriter(lambda body: body)
    assert rewriter.feed(raw[:-10]).out == b""
    assert rewriter.abandon() == raw[:-10]


# ---- through the proxy, on one keep-alive connection ------------------------------------------


class FakeEngine:
    """The far end of every channel: answers requests as dockerd would."""

    def __init__(self, *, chunked: bool) -> None:
        self.chunked = chunked
        self.targets: list[bytes] = []

    def answer(self, request: h11.Request) -> bytes:
        self.targets.append(request.target)
        path = request.target.split(b"?")[0]
        if path.endswith(b"/containers/web/json"):
            return response(body_of(INSPECT), chunked=self.chunked)
        if path.endswith(b"/containers/json"):
            return response(body_of(LISTED), chunked=self.chunked)
        if path.endswith(b"/containers/web/top"):  # names the source too: not rewritten
            return response(body_of({"Titles": [REMOTE]}), chunked=self.chunked)
        if path.endswith(b"/_ping"):
            return response(b"OK", content_type=b"text/plain; charset=utf-8")
        return response(NOT_FOUND, status=404, chunked=self.chunked)


class FakeChannel:
    def __init__(self, engine: FakeEngine, session: Any) -> None:
        self._engine, self._session = engine, session
        self._conn = h11.Connection(h11.SERVER)
        self.closed = False

    def write(self, data: bytes) -> None:
        self._conn.receive_data(data)
        while isinstance(event := self._conn.next_event(), h11.Request | h11.EndOfMessage):
            if isinstance(event, h11.Request):
                answer = self._engine.answer(event)
                # Cut in two, as a channel may deliver it.
                for piece in (answer[:40], answer[40:]):
                    asyncio.get_running_loop().call_soon(self._session.data_received, piece, None)
            else:  # the next request on this connection
                rest, self._conn = self._conn.trailing_data[0], h11.Connection(h11.SERVER)
                if rest:  # h11 reads empty data as the end of the connection
                    self._conn.receive_data(rest)

    def write_eof(self) -> None:
        asyncio.get_running_loop().call_soon(self._session.eof_received)

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class FakeTunnel:
    connected = True
    failed = None
    last_error = None
    reconnecting = False

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.opened = 0

    def kick(self) -> None: ...

    async def open_engine_session(self, factory: Callable[[], Any]) -> FakeChannel:
        self.opened += 1
        return FakeChannel(self.engine, factory())


@pytest.fixture(params=[False, True], ids=["content-length", "chunked"])
async def proxy(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AgentProxy]:
    engine = FakeEngine(chunked=request.param)
    proxy = AgentProxy(tmp_path / "docker.sock", FakeTunnel(engine), responses=sources())  # type: ignore[arg-type]
    await proxy.start()
    yield proxy
    await proxy.stop()


class Client:
    """One keep-alive connection to the proxy's socket, one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h11.Connection(h11.CLIENT)

    async def get(self, target: bytes) -> tuple[h11.Response, bytes]:
        headers = [(b"Host", b"api.moby.localhost"), (b"User-Agent", b"docker-sdk-python/7.1.0")]
        self.writer.write(self.conn.send(h11.Request(method=b"GET", target=target, headers=headers)))  # fmt: skip
        self.writer.write(self.conn.send(h11.EndOfMessage()) or b"")
        head, body = None, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await within(self.reader.read(65536), 10))
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.conn.start_next_cycle()
                assert head is not None
                return head, body
            else:
                pytest.fail(f"unexpected {event!r}")


async def test_one_connection_gets_every_answer_rewritten_or_not(proxy: AgentProxy) -> None:
    client = Client(*await asyncio.open_unix_connection(str(proxy.socket_path)))
    try:
        head, body = await client.get(b"/v1.45/containers/web/json")
        assert head.status_code == 200 and json.loads(body)["Mounts"][0]["Source"] == LAPTOP
        assert json.loads(body)["HostConfig"]["Binds"] == [f"{LAPTOP}:/app:ro"]

        head, body = await client.get(b"/v1.45/containers/nope/json")  # the engine's 404
        assert head.status_code == 404 and body == NOT_FOUND

        head, body = await client.get(b"/v1.45/containers/web/top?ps_args=-ef")
        assert json.loads(body) == {"Titles": [REMOTE]}  # not an answer naming bind sources

        head, body = await client.get(b"/v1.45/containers/json?all=1")
        assert json.loads(body)[0]["Mounts"][0]["Source"] == LAPTOP

        head, body = await client.get(b"/_ping")
        assert body == b"OK"

        head, body = await client.get(b"/containers/web/json")  # again, unversioned
        assert json.loads(body)["Mounts"][0]["Source"] == LAPTOP
    finally:
        client.writer.close()
    tunnel = proxy.tunnel
    assert isinstance(tunnel, FakeTunnel) and tunnel.opened == 1  # all on one channel
    assert len(tunnel.engine.targets) == 6


class ReconnectingTunnel(FakeTunnel):
    """Dropped a moment ago and trying again: the outcome comes when the test says."""

    connected = False
    reconnecting = True
    last_error = "the connection to the runner was lost"

    def __init__(self, engine: FakeEngine) -> None:
        super().__init__(engine)
        self.outcome = asyncio.Event()
        self.waiting = asyncio.Event()

    async def next_change(self, timeout: float) -> None:
        self.waiting.set()
        await self.outcome.wait()


@pytest.mark.parametrize("comes_back", [True, False], ids=["reconnects", "stays-down"])
async def test_a_request_during_a_reconnect_waits_for_its_outcome(
    tmp_path: Path, comes_back: bool
) -> None:
    engine = FakeEngine(chunked=False)
    tunnel = ReconnectingTunnel(engine)
    proxy = AgentProxy(tmp_path / "docker.sock", tunnel, responses=sources())  # type: ignore[arg-type]
    await proxy.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "docker.sock"))
        if comes_back:  # keep-alive, as SDKs send it
            answer = asyncio.create_task(Client(reader, writer).get(b"/v1.41/_ping"))
        else:  # the refusal closes the connection: read to the end
            writer.write(b"GET /v1.41/_ping HTTP/1.1\r\nHost: docker\r\n\r\n")
            answer = asyncio.create_task(reader.read())
        await within(tunnel.waiting.wait(), 10)  # held, not refused
        assert not answer.done() and tunnel.opened == 0
        if comes_back:
            tunnel.connected, tunnel.reconnecting, tunnel.last_error = True, False, None
        else:
            tunnel.last_error = "cannot connect to the runner; retrying"
        tunnel.outcome.set()
        said = await within(answer, 10)
        if comes_back:
            head, body = said
            assert (head.status_code, body, tunnel.opened) == (200, b"OK", 1)
        else:
            assert said.startswith(b"HTTP/1.1 5"), said
            assert b"cannot connect to the runner; retrying" in said and tunnel.opened == 0
        writer.close()
    finally:
        await proxy.stop()
