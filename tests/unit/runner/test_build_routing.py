"""Pieces of the build path that need no engine: finding the image id in a build's answer,
BuildKit's progress message, layer chain ids, tags, and the agent's per-request routes."""

from __future__ import annotations

import base64
import hashlib
import json

from offload.agent.intercept import RequestScanner, Route
from offload.runner.builder_proxy import DISK_FULL_FIX, BuildStream, buildkit_step
from offload.runner.image_transfer import chain_ids, split_tag

ID = "sha256:" + "ab" * 32


def _stream(*messages: dict) -> bytes:
    return b"".join(json.dumps(m).encode() + b"\r\n" for m in messages)


def test_image_id_from_legacy_buildkit_and_quiet_answers_split_anywhere() -> None:
    answers = [
        _stream({"stream": "Step 1/1 : FROM scratch\n"}, {"aux": {"ID": ID}}, {"stream": "ok\n"}),
        _stream(
            {"id": "moby.buildkit.trace", "aux": "CgQ="}, {"id": "moby.image.id", "aux": {"ID": ID}}
        ),
        _stream({"stream": ID + "\n"}),
    ]
    for answer in answers:
        for cut in range(1, len(answer)):
            found = BuildStream()
            sent = found.feed(answer[:cut]) + found.feed(answer[cut:]) + found.flush()
            assert found.id == ID, (answer, cut)
            assert sent == answer  # passed on unchanged, whatever the cut
    nothing = BuildStream()
    nothing.feed(_stream({"stream": "sha256:short\n"}, {"aux": {"ID": "not-an-id"}}))
    assert nothing.id is None


def test_a_full_disk_error_says_what_to_do_and_other_errors_pass_unchanged() -> None:
    full = "failed to copy files: write /var/lib/docker/x: no space left on device"
    answer = _stream({"stream": "step\n"}, {"errorDetail": {"message": full}, "error": full})
    stream = BuildStream()
    sent = stream.feed(answer[:7]) + stream.feed(answer[7:]) + stream.flush()
    messages = [json.loads(line) for line in sent.splitlines() if line.strip()]
    assert messages[0] == {"stream": "step\n"}
    assert messages[1]["error"] == messages[1]["errorDetail"]["message"]
    assert messages[1]["error"] == f"{full}\n{DISK_FULL_FIX}"
    other = _stream({"errorDetail": {"message": "exit code 1"}, "error": "exit code 1"})
    plain = BuildStream()
    assert plain.feed(other) + plain.flush() == other
    # A RUN step's own tool says something else ("exit code 1"): the full disk tells.
    on_full_disk = BuildStream(disk_full=lambda: True)
    said = json.loads(on_full_disk.feed(other) + on_full_disk.flush())
    assert said["error"] == f"exit code 1\n{DISK_FULL_FIX}"


def _fields(data: bytes) -> list[tuple[int, int, bytes | int]]:
    """A minimal protobuf reader: (field, wire type, value)."""
    out, i = [], 0

    def varint() -> int:
        nonlocal i
        value, shift = 0, 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while i < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, wire, varint()))
        else:
            length = varint()
            out.append((number, wire, data[i : i + length]))
            i += length
    return out


def test_buildkit_step_is_a_status_response_with_one_finished_vertex() -> None:
    raw = base64.b64decode(
        buildkit_step("Offload: moved 1 of 4 layers", 1700000000.25, 1700000001.5)
    )
    ((number, wire, vertex),) = _fields(raw)
    assert (number, wire) == (1, 2)  # StatusResponse.vertexes
    fields = {n: v for n, _, v in _fields(vertex)}  # type: ignore[arg-type]
    assert fields[3] == b"Offload: moved 1 of 4 layers"  # Vertex.name
    assert str(fields[1]).startswith("b'sha256:")  # Vertex.digest
    started = dict((n, v) for n, _, v in _fields(fields[5]))  # type: ignore[arg-type]
    completed = dict((n, v) for n, _, v in _fields(fields[6]))  # type: ignore[arg-type]
    assert started == {1: 1700000000, 2: 250000000}
    assert completed == {1: 1700000001, 2: 500000000}


def test_chain_ids_follow_the_image_spec() -> None:
    a, b = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    expected = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert chain_ids([a, b]) == [a, expected]
    assert chain_ids([]) == []


def test_tags_keep_registry_ports() -> None:
    assert split_tag("app") == ("app", "latest")
    assert split_tag("app:1") == ("app", "1")
    assert split_tag("reg:5000/team/app") == ("reg:5000/team/app", "latest")
    assert split_tag("reg:5000/team/app:2") == ("reg:5000/team/app", "2")


def _routes(scanner: RequestScanner, data: bytes) -> list[tuple[Route, bytes]]:
    """Feed `data`; which bytes went to which route, switching as the scanner says."""
    sent: list[tuple[Route, bytes]] = []
    while True:
        scan = scanner.feed(data)
        if scan.forward:
            sent.append(
                (scanner.route if scan.switch is None else _other(scan.switch), scan.forward)
            )
        if scan.switch is None:
            return sent
        data = scan.rest


def _other(route: Route) -> Route:
    return Route.ENGINE if route is Route.BUILDER else Route.BUILDER


def test_the_agent_sends_builds_to_the_builder_and_the_rest_to_the_engine() -> None:
    scanner = RequestScanner()
    scanner.routes = True
    ping = b"HEAD /_ping HTTP/1.1\r\nHost: docker\r\n\r\n"
    build = b"POST /v1.41/build?t=app HTTP/1.1\r\nHost: docker\r\nContent-Length: 3\r\n\r\nabc"
    create = (
        b"POST /v1.41/containers/create HTTP/1.1\r\nHost: docker\r\nContent-Length: 2\r\n\r\n{}"
    )
    sent = _routes(scanner, ping + build)
    assert sent == [(Route.ENGINE, ping), (Route.BUILDER, build)]
    # A ping stays where the connection is; a create goes back to the engine.
    assert _routes(scanner, ping) == [(Route.BUILDER, ping)]
    scan = scanner.feed(create)
    assert scan.switch is Route.ENGINE and scan.forward == b"" and scan.rest == create
    off = RequestScanner()  # routing off (no builder channel): everything stays
    assert off.feed(build).switch is None
