"""What the agent counts as activity, fed the bytes docker clients and engines really exchange,
and when its reporter speaks (docs/activity.md)."""

from __future__ import annotations

import asyncio

import pytest

from offload.agent.activity import ActivityReporter, ActivityTracker, RequestKind, classify
from offload.core.schemas import ActivityReport
from offload.core.waiting import async_wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (b"HEAD /_ping HTTP/1.1", RequestKind.PING),
        (b"GET /v1.41/_ping HTTP/1.1", RequestKind.PING),
        (b"GET /v1.41/containers/json HTTP/1.1", RequestKind.CALL),
        (b"POST /v1.41/build?t=hello HTTP/1.1", RequestKind.BUILD),
        (b"POST /session HTTP/1.1", RequestKind.BUILD),
        (b"POST /v1.41/build/prune HTTP/1.1", RequestKind.CALL),
        (b"GET /v1.41/_ping/x HTTP/1.1", RequestKind.CALL),
        (b"\x16\x03\x01 not http", None),
    ],
)
def test_request_lines(line: bytes, kind: RequestKind | None) -> None:
    assert classify(line) is kind


OK_PING = b"HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nContent-Length: 2\r\n\r\nOK"
JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n"


def test_ping_then_call_on_one_keep_alive_connection() -> None:
    clock = Clock()
    tracker = ActivityTracker(clock)
    watch = tracker.opened()
    watch.client_bytes(b"HEAD /_ping HTTP/1.1\r\nHost: api.moby.localhost\r\n\r\n")
    watch.engine_bytes(b"HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nContent-Length: 2\r\n\r\n")
    assert tracker.take() is None  # a ping alone is not activity
    watch.client_bytes(b"GET /v1.41/containers/json HTTP/1.1\r\nHost: x\r\n\r\n")
    assert watch.busy
    watch.engine_bytes(JSON_HEAD + b"[]")
    watch.engine_bytes(b"\n" + b" " * 10)  # the rest of the body, in another chunk
    assert not watch.busy  # answered: an idle keep-alive connection is no stream
    clock.now += 60
    assert tracker.take() == ActivityReport(api_calls=1)
    assert tracker.open_streams() == 0


def test_request_line_split_across_chunks() -> None:
    tracker = ActivityTracker(Clock())
    watch = tracker.opened()
    watch.client_bytes(b"GET /_pi")
    watch.client_bytes(b"ng HTTP/1.1\r\n\r\n")
    watch.engine_bytes(OK_PING)
    assert tracker.take() is None


def test_streams_count_once_open_long_enough_and_end_with_the_connection() -> None:
    clock = Clock()
    tracker = ActivityTracker(clock, stream_after_s=2)
    logs = tracker.opened()
    logs.client_bytes(b"GET /v1.41/containers/x/logs?follow=1&stdout=1 HTTP/1.1\r\n\r\n")
    logs.engine_bytes(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.multiplexed-stream\r\n\r\n"
    )
    logs.engine_bytes(b"\x01\x00\x00\x00\x00\x00\x00\x05line\n")
    assert tracker.take() == ActivityReport(api_calls=1)
    clock.now += 3
    assert tracker.take() == ActivityReport(open_streams=1)
    logs.closed()
    assert tracker.take() is None


def test_chunked_answer_completes_on_its_last_chunk() -> None:
    clock = Clock()
    tracker = ActivityTracker(clock, stream_after_s=2)
    events = tracker.opened()
    events.client_bytes(b"GET /v1.41/events HTTP/1.1\r\n\r\n")
    events.engine_bytes(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    events.engine_bytes(b'b\r\n{"x": "0"}\n\r\n')
    clock.now += 5
    assert tracker.open_streams() == 1  # events keep flowing: a stream
    events.engine_bytes(b"0\r\n")
    events.engine_bytes(b"\r\n")
    assert not events.busy and tracker.open_streams() == 0


def test_hijacked_connection_is_a_stream_until_closed_and_stdin_is_activity() -> None:
    clock = Clock()
    tracker = ActivityTracker(clock, stream_after_s=2)
    attach = tracker.opened()
    attach.client_bytes(
        b"POST /v1.41/containers/x/attach?stream=1 HTTP/1.1\r\nUpgrade: tcp\r\n\r\n"
    )
    attach.engine_bytes(b"HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
    tracker.take()
    attach.client_bytes(b"ls\n")  # typed input is activity (and never parsed as a request)
    clock.now += 10
    assert tracker.take() == ActivityReport(api_calls=1, open_streams=1)


def test_build_is_reported_while_it_runs() -> None:
    clock = Clock()
    tracker = ActivityTracker(clock)
    build = tracker.opened()
    build.client_bytes(b"POST /v1.41/build?t=x HTTP/1.1\r\nContent-Type: application/x-tar\r\n\r\n")
    build.client_bytes(b"GET / HTTP/1.1\r\n" + b"\0" * 100)  # tar bytes, whatever they contain
    assert tracker.take() == ActivityReport(api_calls=1, building=True)
    assert tracker.building()
    build.engine_bytes(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
    build.engine_bytes(b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert not tracker.building()


def test_reporter_cadence_on_a_clock() -> None:
    clock = Clock()
    tracker = ActivityTracker(clock, stream_after_s=2)
    reporter = ActivityReporter(tracker, _never, min_interval_s=2, keepalive_s=5, clock=clock)
    assert reporter.due_in() is None  # nothing happened: nothing to send
    watch = tracker.opened()
    watch.client_bytes(b"GET /v1.41/containers/x/logs?follow=1 HTTP/1.1\r\n\r\n")
    assert reporter.due_in() == 0  # the first activity after quiet goes at once
    reporter.last_sent = clock.now
    tracker.take()
    watch.client_bytes(b"more input")
    clock.now += 0.5
    assert reporter.due_in() == pytest.approx(1.5)  # at most every 2 s
    tracker.take()
    assert reporter.due_in() == pytest.approx(4.5)  # in flight: at least every 5 s
    watch.closed()
    assert reporter.due_in() is None


async def _never(report: ActivityReport) -> None:
    raise AssertionError(f"no report expected: {report}")


def test_reporter_sums_what_happened_and_goes_quiet() -> None:
    async def scenario() -> tuple[list[ActivityReport], list[bool]]:
        tracker = ActivityTracker()
        sent: list[ActivityReport] = []
        quiet: list[bool] = []
        delivered = asyncio.Event()

        async def send(report: ActivityReport) -> None:
            sent.append(report)
            delivered.set()

        reporter = ActivityReporter(tracker, send, min_interval_s=0.05, keepalive_s=1)
        reporter.on_quiet = quiet.append
        task = asyncio.create_task(reporter.run())
        for _ in range(3):
            watch = tracker.opened()
            watch.client_bytes(b"GET /v1.41/info HTTP/1.1\r\n\r\n")
            watch.engine_bytes(JSON_HEAD + b"{}" + b" " * 11)
            watch.closed()
        await asyncio.wait_for(delivered.wait(), 10)
        await async_wait_until(_quiet(reporter), 10, "the reporter to go quiet")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return sent, quiet

    sent, quiet = asyncio.run(scenario())
    assert sum(report.api_calls for report in sent) == 3
    assert quiet[0] is False and quiet[-1] is True


def _quiet(reporter: ActivityReporter):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return reporter.quiet

    return check
