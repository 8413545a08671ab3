"""Framing: every frame comes back whole, whatever the stream splits it into."""

from __future__ import annotations

import asyncio
import socket

import pytest

from offload.sync.protocol import (
    MAX_PAYLOAD,
    Entry,
    FrameParser,
    Kind,
    ProtocolError,
    frame,
    jframe,
    read_frames,
    small_file_frame,
    split_small_file,
)


def test_frames_survive_any_split() -> None:
    stream = (
        jframe(Kind.HELLO, {"v": 1}) + frame(Kind.FILE_DATA, b"x" * 70000) + frame(Kind.BARRIER)
    )
    for step in (1, 7, 4096, len(stream)):
        parser = FrameParser()
        frames = []
        for i in range(0, len(stream), step):
            frames += parser.feed(stream[i : i + step])
        assert [k for k, _ in frames] == [Kind.HELLO, Kind.FILE_DATA, Kind.BARRIER]
        assert frames[1][1] == b"x" * 70000
        assert parser.buffered == 0


def test_oversized_and_unknown_frames_are_refused() -> None:
    with pytest.raises(ProtocolError):
        FrameParser().feed((MAX_PAYLOAD + 1).to_bytes(4, "big") + b"\x01")
    with pytest.raises(ProtocolError):
        FrameParser().feed(b"\x00\x00\x00\x00\xee")
    with pytest.raises(ProtocolError):
        frame(Kind.FILE_DATA, b"x" * (MAX_PAYLOAD + 1))


def test_small_file_frame_carries_header_and_bytes() -> None:
    data = small_file_frame({"p": "a/b", "mode": 0o755}, b"\x00binary\xff")
    [(kind, payload)] = FrameParser().feed(data)
    header, content = split_small_file(payload)
    assert kind == Kind.FILE_SMALL
    assert header == {"p": "a/b", "mode": 0o755}
    assert bytes(content) == b"\x00binary\xff"


def test_entry_sameness() -> None:
    f = Entry("f", 3, 10, 0o644)
    assert f.same(Entry("f", 3, 10, 0o644))
    assert not f.same(Entry("f", 3, 11, 0o644))
    assert not f.same(Entry("f", 3, 10, 0o755))  # the executable bit is content
    assert Entry("d", mode=0o755).same(Entry("d", 0, 99, 0o755))  # a directory's mtime is not
    assert not Entry("l", target="a").same(Entry("l", target="b"))
    assert Entry.from_wire(f.to_wire()) == f
    with pytest.raises(ProtocolError):
        Entry.from_wire(["x", 1, 2, 3, None])


async def test_frames_over_a_socketpair() -> None:
    left, right = socket.socketpair()
    reader, left_writer = await asyncio.open_unix_connection(sock=left)
    _, writer = await asyncio.open_unix_connection(sock=right)
    sent = [jframe(Kind.BARRIER, {"seq": i}) for i in range(1000)]
    writer.write(b"".join(sent))
    await writer.drain()
    writer.close()
    got = [f async for batch in read_frames(reader) for f in batch]
    assert [k for k, _ in got] == [Kind.BARRIER] * 1000
    assert got[-1][1] == b'{"seq":999}'
    left_writer.close()
