"""The runner's endpoint writes only inside its mount area: a laptop (or anyone holding the
session's SSH channel) sending `..` or absolute paths is refused and logged, symlinks are written
as links (whatever their target) and never followed, and symlinks a container plants are never
written or read through; nothing outside the area changes. (Swaps racing the runner, for real:
test_swap_attack.)"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from offload.sync.protocol import (
    PROTOCOL_VERSION,
    SYNC_CHANNEL_PATH,
    Entry,
    FrameParser,
    Kind,
    decode_json,
    jframe,
    read_one,
    small_file_frame,
)

from .support import SyncLink, until


class Raw:
    """A hand-driven sync stream, speaking the protocol frame by frame."""

    def __init__(self, reader, writer) -> None:  # type: ignore[no-untyped-def]
        self.reader, self.writer = reader, writer
        self.parser, self.pending = FrameParser(), []  # type: ignore[var-annotated]

    async def next(self) -> tuple[Kind, object]:
        kind, payload = await read_one(self.reader, self.parser, self.pending)
        return kind, decode_json(payload) if payload else None

    async def until_ack(self, seq: int) -> list[tuple[Kind, object]]:
        self.writer.write(jframe(Kind.BARRIER, {"seq": seq}))
        seen = []
        while True:
            kind, msg = await self.next()
            if kind == Kind.BARRIER_ACK:
                assert msg == {"seq": seq}
                return seen
            seen.append((kind, msg))


async def raw_session(link: SyncLink, subdir: str = "b0raw") -> Raw:
    reader, writer = await link.open_stream()
    raw = Raw(reader, writer)
    hello = {"v": PROTOCOL_VERSION, "subdir": subdir, "read_only": False, "ignore": []}
    writer.write(jframe(Kind.HELLO, hello))
    assert (await raw.next())[0] == Kind.WELCOME
    while (await raw.next())[0] != Kind.MANIFEST_END:
        pass
    return raw


def outside_untouched(tmp_path: Path, before: set[str]) -> bool:
    return {str(p) for p in tmp_path.rglob("*") if "area" not in p.parts} == before


def snapshot(tmp_path: Path) -> set[str]:
    return {str(p) for p in tmp_path.rglob("*") if "area" not in p.parts}


async def test_escaping_paths_are_refused_and_links_written_as_they_are(
    link: SyncLink, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    (tmp_path / "outside").mkdir()
    before = snapshot(tmp_path)
    raw = await raw_session(link)
    frames = [
        small_file_frame({"p": "../../outside/evil", "mode": 0o644, "mtime_ns": 1}, b"x"),
        small_file_frame({"p": "/tmp/evil-abs", "mode": 0o644, "mtime_ns": 1}, b"x"),
        jframe(Kind.MKDIR, {"p": "a/../../evil", "mode": 0o755}),
        # Links are links: their targets are the container's business, never followed here.
        jframe(Kind.SYMLINK, {"p": "out", "target": "../../outside"}),
        jframe(Kind.SYMLINK, {"p": "abs", "target": "/etc"}),
        jframe(Kind.SYMLINK, {"p": "sneaky", "target": "d/../.."}),
        jframe(Kind.SYMLINK, {"p": "nul", "target": "a\u0000b"}),
        jframe(Kind.DELETE, {"p": "../outside"}),
        # A big file to a refused path: its data frames are skipped, the stream goes on.
        jframe(Kind.FILE_BEGIN, {"p": "../big"}),
        jframe(Kind.FILE_DATA, {"x": 1}),
        jframe(Kind.FILE_END, {"mode": 0o644, "mtime_ns": 1}),
        # Written through the links, if they were followed:
        small_file_frame({"p": "out/evil", "mode": 0o644, "mtime_ns": 1}, b"x"),
        jframe(Kind.MKDIR, {"p": "abs/evil", "mode": 0o755}),
        small_file_frame({"p": "fine.txt", "mode": 0o644, "mtime_ns": 1}, b"ok"),
    ]
    raw.writer.write(b"".join(frames))
    replies = await raw.until_ack(1)
    errors = [msg["p"] for kind, msg in replies if kind == Kind.ERROR]  # type: ignore[index]
    assert errors == [
        "../../outside/evil",
        "/tmp/evil-abs",
        "a/../../evil",
        "nul",
        "../outside",
        "../big",
        "out/evil",
        "abs/evil",
    ]
    remote = link.remote("b0raw")
    assert (remote / "fine.txt").read_bytes() == b"ok"
    assert os.readlink(remote / "out") == "../../outside"
    assert os.readlink(remote / "abs") == "/etc"
    assert os.readlink(remote / "sneaky") == "d/../.."
    assert not os.path.lexists(remote / "nul")
    assert not os.path.exists("/tmp/evil-abs") and not os.path.exists("/etc/evil")
    assert outside_untouched(tmp_path, before)
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) >= 8
    raw.writer.close()


async def test_a_symlink_planted_by_the_container_is_never_written_through(
    link: SyncLink, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    raw = await raw_session(link)
    remote = link.remote("b0raw")
    os.symlink(outside, remote / "planted")  # what a container could do inside its mount
    os.symlink(outside / "secret", remote / "leak")
    before = snapshot(tmp_path)
    raw.writer.write(
        small_file_frame({"p": "planted/new", "mode": 0o644, "mtime_ns": 1}, b"x")
        + jframe(Kind.MKDIR, {"p": "planted/dir", "mode": 0o755})
        + jframe(Kind.DELETE, {"p": "planted/secret", "expect": Entry("f", 11, 0, 0o644).to_wire()})
        + jframe(Kind.HASH_REQ, {"paths": ["leak", "planted/secret"]})
    )
    replies = await raw.until_ack(1)
    errors = [msg["p"] for kind, msg in replies if kind == Kind.ERROR]  # type: ignore[index]
    assert errors == ["planted/new", "planted/dir", "planted/secret"]
    hashes = next(msg for kind, msg in replies if kind == Kind.HASH_REPLY)
    assert hashes == {"hashes": {"leak": None, "planted/secret": None}}  # nothing read through
    assert outside_untouched(tmp_path, before)
    assert (outside / "secret").read_text() == "host secret"
    raw.writer.close()


async def test_the_container_cannot_make_the_runner_read_outside(
    link: SyncLink, laptop: Path, tmp_path: Path
) -> None:
    """A symlink the container plants travels as a symlink, its target text unchanged (as on a
    local bind mount); what it points to is never read."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    sync = await link.start_sync(laptop)
    remote = link.remote()
    os.symlink(outside / "secret", remote / "leak")
    (remote / "marker").write_text("after the link")
    await until(lambda: (laptop / "marker").exists(), "the container's later change")
    await until(lambda: os.path.islink(laptop / "leak"), "the container's link")
    assert os.readlink(laptop / "leak") == str(outside / "secret")
    assert not sync.status().errors


@pytest.mark.parametrize("subdir", ["../up", ".offload-conflicts", "a/b", "", "x" * 200])
async def test_bad_sync_directories_are_refused(
    link: SyncLink, subdir: str, tmp_path: Path
) -> None:
    reader, writer = await link.open_stream()
    writer.write(jframe(Kind.HELLO, {"v": PROTOCOL_VERSION, "subdir": subdir}))
    parser = FrameParser()
    kind, payload = await read_one(reader, parser, [])
    assert kind == Kind.ERROR and "refused" in decode_json(payload)["message"]
    assert sorted(os.listdir(link.mount_area)) == []
    writer.close()


def test_channel_path_is_separate_from_the_engine() -> None:
    from offload.core.schemas import ENGINE_CHANNEL_PATH

    assert SYNC_CHANNEL_PATH != ENGINE_CHANNEL_PATH
