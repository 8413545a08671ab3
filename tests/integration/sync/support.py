"""A real SSH link for sync tests and the benchmark: a tiny asyncssh server whose `/sync`
channel runs the runner's sync endpoint on a mount area, and a client connected to it."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import pytest

from offload.core.waiting import async_wait_until, within
from offload.sync.laptop import LaptopSync, OpenStream
from offload.sync.protocol import (
    PROTOCOL_VERSION,
    SYNC_CHANNEL_PATH,
    FrameParser,
    Kind,
    decode_json,
    jframe,
    read_frames,
    read_one,
    small_file_frame,
    split_small_file,
)
from offload.sync.remote import RemoteEndpoint

log = logging.getLogger(__name__)

WAIT = 15.0  # bound of every wait on a condition in these tests


async def until(condition, what: str, timeout: float = WAIT) -> None:  # type: ignore[no-untyped-def]
    """Wait (bounded) until the plain callable `condition` holds."""

    async def check() -> bool:
        return bool(condition())

    await async_wait_until(check, timeout, what, interval=0.01)


WINDOW = 16 * 1024 * 1024
PKTSIZE = 256 * 1024
CIPHERS = ["aes128-gcm@openssh.com"]


class _Server(asyncssh.SSHServer):
    def __init__(self, endpoint: RemoteEndpoint, tasks: set[asyncio.Task[None]]) -> None:
        self._endpoint = endpoint
        self._tasks = tasks

    def begin_auth(self, username: str) -> bool:
        return False  # a test server on loopback: no authentication

    def unix_connection_requested(self, dest_path: str):  # type: ignore[no-untyped-def]
        if dest_path != SYNC_CHANNEL_PATH:
            return False

        async def handler(
            reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]
        ) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                await self._endpoint.serve(reader, writer)
            finally:
                self._tasks.discard(task)

        return handler


@dataclass
class SyncLink:
    mount_area: Path
    endpoint: RemoteEndpoint
    acceptor: asyncssh.SSHAcceptor
    conn: asyncssh.SSHClientConnection
    syncs: list[LaptopSync] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def open_stream(self) -> OpenStream:
        async def open_stream():  # type: ignore[no-untyped-def]
            return await self.conn.open_unix_connection(
                SYNC_CHANNEL_PATH, encoding=None, window=WINDOW, max_pktsize=PKTSIZE
            )

        return open_stream

    async def start_sync(self, laptop: Path, subdir: str = "b0test", **kw) -> LaptopSync:  # type: ignore[no-untyped-def]
        sync = LaptopSync(laptop, subdir, self.open_stream, **kw)
        self.syncs.append(sync)
        await sync.start()
        return sync

    def remote(self, subdir: str = "b0test") -> Path:
        return self.mount_area / subdir

    async def close(self) -> None:
        for sync in self.syncs:
            await sync.close()
        self.conn.close()
        await self.conn.wait_closed()
        self.acceptor.close()
        await self.acceptor.wait_closed()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=10)


async def open_link(mount_area: Path, **endpoint_options) -> SyncLink:  # type: ignore[no-untyped-def]
    endpoint = RemoteEndpoint(mount_area, **endpoint_options)
    tasks: set[asyncio.Task[None]] = set()
    acceptor = await asyncssh.create_server(
        lambda: _Server(endpoint, tasks),
        "127.0.0.1",
        0,
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        config=[],
        encryption_algs=CIPHERS,
        compression_algs=None,
        window=WINDOW,
        max_pktsize=PKTSIZE,
    )
    conn = await asyncssh.connect(
        "127.0.0.1",
        acceptor.get_port(),
        username="sync",
        known_hosts=None,
        config=[],
        client_keys=None,
        agent_path=None,
        encryption_algs=CIPHERS,
        compression_algs=None,
        window=WINDOW,
        max_pktsize=PKTSIZE,
    )
    return SyncLink(mount_area, endpoint, acceptor, conn, tasks=tasks)


# ---- the sandbox's root: an unprivileged host uid that owns the mount area -----------------

IDENTITY = 1900123  # what `Environment.area_owner` names: root inside the engine's sandbox
OWNER = (IDENTITY, IDENTITY)
# A plain interpreter the identity can run (the test's own may sit under a private home).
IDENTITY_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
AS_ROOT = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="acting as another uid needs root and setpriv",
)


def as_identity_argv(script: str, *args: str, uid: int = IDENTITY) -> list[str]:
    """The command line that runs the Python `script` as `uid`, with no supplementary groups."""
    return [
        "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
        IDENTITY_PYTHON, "-c", script, *args,
    ]  # fmt: skip


async def as_identity(script: str, *args: str, uid: int = IDENTITY) -> str:
    """Run `script` as `uid` (what a container of the session does) and return its stdout."""
    proc = await asyncio.create_subprocess_exec(
        *as_identity_argv(script, *args, uid=uid),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await within(proc.communicate(), WAIT)
    assert proc.returncode == 0, err.decode()
    return out.decode()


@contextmanager
def shared_dir() -> Iterator[Path]:
    """A temporary directory the identity can traverse (pytest's tmp_path is root's only)."""
    path = Path(tempfile.mkdtemp(prefix="offload-sync-"))
    try:
        path.chmod(0o711)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def owned_area(base: Path) -> Path:
    """`base/area`, owned by the identity: the mount area as the sandbox sees it."""
    area = base / "area"
    area.mkdir()
    os.chown(area, *OWNER)
    area.chmod(0o755)
    return area


def tree_state(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything under `root` (itself included), links not followed: to compare before/after."""
    state: dict[str, tuple[object, ...]] = {}
    for top, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = os.path.normpath(os.path.join(top, name))
            if name == "." and top != str(root):
                continue
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as fh:
                    content: object = hashlib.sha256(fh.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            else:
                content = sorted(os.listdir(path)) if stat.S_ISDIR(st.st_mode) else None
            state[os.path.relpath(path, root)] = (
                st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                content,
            )  # fmt: skip
    return state


# ---- the laptop's side of the protocol, frame by frame -------------------------------------


class RawLaptop:
    """The laptop's side of one stream, hand-driven; a reader task keeps every frame."""

    def __init__(self, reader, writer) -> None:  # type: ignore[no-untyped-def]
        self.writer = writer
        self.frames: list[tuple[Kind, bytes]] = []
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._seq = 0
        self._task = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader) -> None:  # type: ignore[no-untyped-def]
        async for batch in read_frames(reader):
            for kind, payload in batch:
                self.frames.append((kind, payload))
                if kind == Kind.BARRIER_ACK:
                    fut = self._acks.pop(decode_json(payload)["seq"], None)
                    if fut is not None:
                        fut.set_result(None)
                elif kind == Kind.BARRIER:  # the runner's own changes: say they are applied
                    self.writer.write(jframe(Kind.BARRIER_ACK, decode_json(payload)))

    async def push(self, data: bytes) -> None:
        """Send `data`, then wait (bounded) until the runner applied all of it."""
        self._seq += 1
        fut = self._acks[self._seq] = asyncio.get_running_loop().create_future()
        self.writer.write(data + jframe(Kind.BARRIER, {"seq": self._seq}))
        await within(asyncio.shield(fut), WAIT)

    def errors(self) -> list[dict[str, str]]:
        return [decode_json(p) for k, p in self.frames if k == Kind.ERROR]

    def received_bytes(self) -> bytes:
        """Every byte of file content the runner sent."""
        out = []
        for kind, payload in self.frames:
            if kind == Kind.FILE_SMALL:
                out.append(bytes(split_small_file(payload)[1]))
            elif kind == Kind.FILE_DATA:
                out.append(payload)
        return b"".join(out)

    def files_received(self) -> set[str]:
        return {str(split_small_file(p)[0]["p"]) for k, p in self.frames if k == Kind.FILE_SMALL}

    def hashes(self) -> set[str | None]:
        return {
            h
            for k, p in self.frames
            if k == Kind.HASH_REPLY
            for h in decode_json(p)["hashes"].values()
        }

    async def close(self) -> None:
        self.writer.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def start_raw(link: SyncLink, subdir: str, only: str | None = None) -> RawLaptop:
    """A hand-driven laptop stream syncing `subdir`, past the handshake and the manifest."""
    reader, writer = await link.open_stream()
    hello: dict[str, object] = {"v": PROTOCOL_VERSION, "subdir": subdir, "ignore": []}
    if only is not None:
        hello["only"] = only
    writer.write(jframe(Kind.HELLO, hello))
    parser = FrameParser()
    pending: list[tuple[Kind, bytes]] = []
    kind, _ = await read_one(reader, parser, pending)
    assert kind == Kind.WELCOME
    while (await read_one(reader, parser, pending))[0] != Kind.MANIFEST_END:
        pass
    assert not pending and not parser.buffered
    return RawLaptop(reader, writer)


def small(rel: str, content: bytes, mode: int = 0o644, expect: object = None) -> bytes:
    """A whole file, as the laptop sends one (`expect`: what it believes the runner has)."""
    header = {"p": rel, "mode": mode, "mtime_ns": 1_000_000_000, "expect": expect}
    return small_file_frame(header, content)
